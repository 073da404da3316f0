"""Settings of ``xybrid serve``: every default and limit in one place.

Each setting has a command-line flag (``--port``) and an environment variable
(``XYBRID_PORT``); the flag wins. Limits bound what one request may ask for,
so no client can make the server allocate or compute without bound.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerSettings", "env_default"]


@dataclass(frozen=True)
class ServerSettings:
    """What the server loads and how much it admits."""

    model: str | None = None  # None: the default chat model
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8080
    parallel: int = 4  # slots decoded together
    max_queued: int = 64  # requests waiting for a slot; more get 429
    ctx_size: int = 4096
    threads: int = 0  # 0: llama.cpp picks
    gpu_layers: int = 0
    rpc: str | None = None  # "host:port,...": layers on `xybrid rpc-server` processes
    tensor_split: str | None = None  # "3,1": one weight per remote device
    api_key: str | None = None
    alias: str | None = None  # model id reported and accepted; default: the file name
    mmproj: str | None = None
    embedding_model: str | None = None  # None: embed with the main model
    chat_template: str | None = None
    # Limits of one request.
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 256
    max_n: int = 8
    max_tokens_limit: int = 4096
    max_tools: int = 64
    max_stop: int = 16
    max_prompts: int = 16  # prompts in one /v1/completions call
    max_embedding_inputs: int = 256  # texts in one /v1/embeddings call
    default_max_tokens: int = 512
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0
    log_requests: bool = True

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)


def env_default(name: str, default: Any) -> Any:
    """``XYBRID_<NAME>`` from the environment, typed like ``default``."""
    raw = os.environ.get("XYBRID_" + name.upper())
    if raw is None or raw == "":
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
