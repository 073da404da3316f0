"""Run the server: command-line flags, logging, uvicorn, signals.

SIGINT/SIGTERM stop admitting (the listening socket closes), give running
streams ``shutdown_timeout_s`` to finish, cancel what is left, unload the
model and exit 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from xybrid.server.settings import ServerSettings, env_default

__all__ = ["add_serve_args", "serve", "settings_from_args"]

_D = ServerSettings()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``xybrid serve``; each defaults to $XYBRID_<FLAG> when set."""
    def opt(flag: str, field: str, kind: Any, help: str, *short: str) -> None:
        default = env_default(field, getattr(_D, field))
        shown = ("set" if default else "none") if field == "api_key" else default  # no secrets
        if field == "model" and default is None:
            shown = "SmolLM2-135M-Instruct, the default chat model"
        p.add_argument(*short, flag, dest=field, type=kind, default=default,
                       help=f"{help} (env XYBRID_{field.upper()}; default: {shown})")

    opt("--model", "model", str, "GGUF file or folder", "-m")
    opt("--host", "host", str, "address to bind")
    opt("--port", "port", int, "TCP port")
    opt("--parallel", "parallel", int, "requests decoded together (slots)", "-np")
    opt("--max-queued", "max_queued", int, "requests waiting for a slot before 429")
    opt("--ctx-size", "ctx_size", int, "context length in tokens (shared by the slots)", "-c")
    opt("--threads", "threads", int, "CPU threads (0 = all)", "-t")
    opt("--gpu-layers", "gpu_layers", int, "layers to offload to the GPU (-1 = all)", "-ngl")
    opt("--rpc", "rpc", str, "HOST:PORT,... of `xybrid rpc-server` processes to put layers on "
        "(no authentication or encryption: trusted networks only)")
    opt("--tensor-split", "tensor_split", str, "with --rpc: one weight per remote device, e.g. 3,1")
    opt("--api-key", "api_key", str, "require 'Authorization: Bearer KEY'")
    opt("--alias", "alias", str, "model id to report and accept")
    opt("--mmproj", "mmproj", str, "multimodal projector GGUF")
    opt("--embedding-model", "embedding_model", str,
        "GGUF for /v1/embeddings (default: the main model)")
    opt("--chat-template", "chat_template", str, "chatml, gemma, llama2 or a Jinja template")
    opt("--max-body-bytes", "max_body_bytes", int, "largest request body")
    opt("--max-messages", "max_messages", int, "messages per chat request")
    opt("--max-n", "max_n", int, "choices per request (n)")
    opt("--max-tokens-limit", "max_tokens_limit", int, "largest max_tokens a request may ask")
    opt("--max-tools", "max_tools", int, "tools per request")
    opt("--default-max-tokens", "default_max_tokens", int, "max_tokens when a chat omits it")
    opt("--shutdown-timeout", "shutdown_timeout_s", float,
        "seconds running streams get to finish at shutdown")
    p.add_argument("--no-log-requests", dest="log_requests", action="store_false",
                   default=env_default("log_requests", True),
                   help="do not log one line per request")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    fields = ServerSettings.__dataclass_fields__
    return ServerSettings(**{k: v for k, v in vars(args).items() if k in fields})


def serve(settings: ServerSettings) -> int:
    import uvicorn

    from xybrid.server.app import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    exit_code = 0

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its shutdown, which would end
            # the process by SIGTERM; a requested stop is a clean exit here.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit)
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def load_failed(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(settings, on_load_failed=load_failed)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)))
    server = Server(config)
    logging.getLogger("xybrid.server").info(
        "xybrid serve: listening on http://%s:%d (model loading)", settings.host, settings.port)
    server.run()
    return exit_code
