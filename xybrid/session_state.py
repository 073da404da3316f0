"""Session state: save the KV cache of a conversation and restore it later.

A :class:`SessionState` holds llama.cpp's sequence state (the KV cache or
recurrent state of the backend's sequence, from ``llama_state_seq_get_data``)
together with the token record of the prefix cache, so a restored backend
plans the next call exactly as the one that saved it would, and continues
identically. A fingerprint of the model guards against restoring a state
into another model, whose cache layout would be garbage (or crash llama.cpp).

On disk a session is one self-describing file: a magic string, a JSON header
(format version, fingerprint, tokens) and the raw state bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xybrid.errors import SessionStateError
from xybrid.prefix_cache import PrefixCacheState

__all__ = ["SessionState", "model_fingerprint", "capture_state", "restore_state",
           "write_session_file", "read_session_file"]

_MAGIC = b"XYBRIDSESSION\x00"
_VERSION = 1


@dataclass(frozen=True)
class SessionState:
    """One sequence's cache and the tokens it holds.

    ``fingerprint`` names the model it belongs to (:func:`model_fingerprint`);
    ``tokens`` are the token ids recorded in the cache, ``prefix_hit`` the
    prefix-cache telemetry at save time, ``data`` llama.cpp's state bytes.
    """

    fingerprint: str
    tokens: tuple[int, ...]
    prefix_hit: int | None
    data: bytes

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def model_fingerprint(model: Any, path: str | os.PathLike[str]) -> str:
    """A digest identifying the model: file size, vocabulary and embedding
    sizes, layer and parameter counts, architecture and every metadata entry."""
    meta = model.metadata()
    facts = {
        "file_size": os.path.getsize(path),
        "n_vocab": int(model.n_vocab),
        "n_embd": int(model.n_embd),
        "n_layer": int(model.n_layer),
        "n_params": int(model.n_params),
        "architecture": model.architecture,
        "metadata": hashlib.sha256(
            json.dumps(sorted(meta.items()), ensure_ascii=False).encode("utf-8")).hexdigest(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()


def capture_state(fingerprint: str, context: Any, cache: PrefixCacheState, seq_id: int) -> SessionState:
    """The state of ``seq_id`` now (the caller holds the backend's lock)."""
    return SessionState(fingerprint, tuple(cache.cached_tokens), cache.last_prefix_hit,
                        context.seq_state_get(seq_id))


def restore_state(state: SessionState, fingerprint: str, context: Any, cache: PrefixCacheState,
                  seq_id: int) -> None:
    """Replace ``seq_id``'s cache with ``state`` and restore the prefix-cache
    record. A state from another model, or one that does not fit, raises
    :class:`SessionStateError` and leaves the sequence empty."""
    if not isinstance(state, SessionState):
        raise SessionStateError(f"load_state() needs a SessionState, got {type(state).__name__}")
    if state.fingerprint != fingerprint:
        raise SessionStateError(
            "this session state was saved from a different model (fingerprint "
            f"{state.fingerprint[:12]}..., the loaded model is {fingerprint[:12]}...)")
    n_ctx = int(context.n_ctx)
    if len(state.tokens) >= n_ctx:
        raise SessionStateError(
            f"the session holds {len(state.tokens)} tokens but the context window is {n_ctx}")
    context.memory_clear()
    cache.reset()
    if not state.data:
        return
    try:
        context.seq_state_set(state.data, seq_id)
    except Exception as exc:
        context.memory_clear()
        raise SessionStateError(f"llama.cpp could not restore the session state: {exc}") from exc
    tokens = list(state.tokens)
    hit = state.prefix_hit if state.prefix_hit is not None and state.prefix_hit <= len(tokens) else 0
    cache.commit(tokens, hit)


def write_session_file(path: str | os.PathLike[str], state: SessionState) -> None:
    """Write ``state`` to ``path`` (replaced atomically)."""
    header = json.dumps({"version": _VERSION, "fingerprint": state.fingerprint,
                         "tokens": list(state.tokens), "prefix_hit": state.prefix_hit}).encode()
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_MAGIC)
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        fh.write(state.data)
    os.replace(tmp, target)


def read_session_file(path: str | os.PathLike[str]) -> SessionState:
    """Read a file written by :func:`write_session_file`."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
    except OSError as exc:
        raise SessionStateError(f"cannot read the session file {os.fspath(path)!r}: {exc}") from exc
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 8:
        raise SessionStateError(f"{os.fspath(path)!r} is not an xybrid session file")
    (n,) = struct.unpack_from("<Q", blob, len(_MAGIC))
    start = len(_MAGIC) + 8
    try:
        header = json.loads(blob[start:start + n].decode("utf-8"))
        if header.get("version") != _VERSION:
            raise SessionStateError(
                f"session file format {header.get('version')!r} is not supported (expected {_VERSION})")
        tokens = tuple(int(t) for t in header["tokens"])
        fingerprint = str(header["fingerprint"])
        hit = header.get("prefix_hit")
    except (ValueError, KeyError, TypeError) as exc:
        raise SessionStateError(f"the session file {os.fspath(path)!r} is damaged: {exc}") from exc
    return SessionState(fingerprint, tokens, None if hit is None else int(hit), blob[start + n:])
