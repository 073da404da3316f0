"""``xybrid serve``: an OpenAI-compatible HTTP server on the xybrid engine.

``create_app(ServerSettings(...))`` builds the ASGI app (FastAPI);
``serve(settings)`` runs it with uvicorn. Both need the ``server`` extra
(``pip install xybrid[server]``); importing this package alone does not.
"""

from __future__ import annotations

from typing import Any

from xybrid.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    from xybrid.server.app import create_app as make

    return make(*args, **kwargs)


def serve(settings: ServerSettings) -> int:
    from xybrid.server.run import serve as run

    return run(settings)
