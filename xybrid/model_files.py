"""Finding model files on disk."""

from __future__ import annotations

import os
from pathlib import Path

from xybrid.errors import InvalidInputError, ModelNotFoundError

__all__ = ["resolve_model_path"]


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The GGUF file that ``path`` names.

    A file is returned as it is. A directory must hold at least one ``.gguf``
    file; the first in name order is chosen, skipping multimodal projectors
    (``mmproj*``) when another file is there.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"model path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        return _resolve(Path(path).expanduser())
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        # A name past the OS limits (ENAMETOOLONG), a NUL byte, a folder
        # that cannot be listed (EACCES), a special file, a symlink loop:
        # the path does not lead to a model we can open.
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        shown = os.fspath(path)
        if len(shown) > 200:
            shown = shown[:200] + f"... ({len(shown)} characters)"
        raise ModelNotFoundError(f"model path cannot be used: {shown!r}: {detail}") from None


def _resolve(p: Path) -> Path:
    if not p.exists():
        raise ModelNotFoundError(f"model path not found: {p}")
    if p.is_file():
        with open(p, "rb"):  # unreadable (EACCES) is OSError, reported by the caller
            pass
        return p
    if not p.is_dir():
        raise ModelNotFoundError(f"model path is neither a file nor a directory: {p}")
    candidates = sorted(q for q in p.iterdir() if q.suffix.lower() == ".gguf" and q.is_file())
    if not candidates:
        raise ModelNotFoundError(f"no .gguf files found in {p}")
    models = [q for q in candidates if not q.name.lower().startswith("mmproj")]
    return (models or candidates)[0]
