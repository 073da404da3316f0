"""The peer contestant's environment: llama-cpp-python built from source.

llama-cpp-python 0.3.36 vendors the same llama.cpp commit that xybrid pins, so
the only differences between the two are the bindings. It is installed once
into ``bench/.cache/venv-llama-cpp-python`` (git-ignored) and reused; a stamp
file records the version and CMake flags it was built with, and a changed
stamp triggers a rebuild.

The build avoids pip's build isolation: isolation would fetch the ``cmake``
*sdist* named in the package's build requirements and compile CMake itself.
Instead the build tools (scikit-build-core, the ``cmake`` and ``ninja``
binary wheels) go into the venv first and the package is built with
``--no-build-isolation``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEER_VERSION = "0.3.36"
BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
VENV_DIR = CACHE_DIR / "venv-llama-cpp-python"
STAMP = VENV_DIR / "xybrid-bench-stamp.json"
LOG = CACHE_DIR / "llama-cpp-python-build.log"

# The same CPU tuning as xybrid's own llama.cpp build (scripts/build_llama_cpp.py):
# native instructions, release build, CPU backend only.
CMAKE_ARGS = "-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF"


def peer_python() -> Path:
    return VENV_DIR / "bin" / "python"


# The server extra: `python -m bench server` runs llama-cpp-python's own
# OpenAI server (llama_cpp.server) as a contestant.
EXTRAS = "server"


def _wanted_stamp() -> dict[str, str]:
    return {"version": PEER_VERSION, "cmake_args": CMAKE_ARGS, "python": sys.version.split()[0],
            "extras": EXTRAS}


def is_ready() -> bool:
    if not peer_python().is_file() or not STAMP.is_file():
        return False
    try:
        return bool(json.loads(STAMP.read_text()) == _wanted_stamp())
    except ValueError:
        return False


def ensure(log=print) -> tuple[Path | None, str]:
    """Build the venv if needed. Returns (python, "") or (None, reason)."""
    if is_ready():
        return peer_python(), ""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    log(f"[bench] building llama-cpp-python {PEER_VERSION} from source into {VENV_DIR} "
        f"(once; a few minutes on 2 cores; log: {LOG})")
    t0 = time.monotonic()
    env = dict(os.environ)
    env.update(
        CMAKE_ARGS=CMAKE_ARGS,
        FORCE_CMAKE="1",
        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    py = str(peer_python())
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV_DIR)],
        [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "--quiet", "--only-binary", ":all:",
         "scikit-build-core[pyproject]>=0.10", "cmake>=3.21", "ninja",
         "numpy", "typing-extensions", "diskcache", "jinja2", "psutil"],
        [py, "-m", "pip", "install", "--verbose", "--no-build-isolation", "--no-cache-dir",
         "--no-binary", "llama-cpp-python", f"llama-cpp-python[{EXTRAS}]=={PEER_VERSION}"],
    ]
    with LOG.open("w") as out:
        for cmd in steps:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            # The venv's bin first on PATH: its cmake and ninja wheels are used.
            env["PATH"] = str(VENV_DIR / "bin") + os.pathsep + os.environ.get("PATH", "")
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                tail = LOG.read_text(errors="replace").splitlines()[-15:]
                return None, (f"building llama-cpp-python {PEER_VERSION} failed "
                              f"(`{' '.join(cmd[2:5])} ...` exited {rc}); see {LOG}:\n  "
                              + "\n  ".join(tail))
    STAMP.write_text(json.dumps(_wanted_stamp()))
    log(f"[bench] llama-cpp-python built in {time.monotonic() - t0:.0f} s")
    return peer_python(), ""


if __name__ == "__main__":
    python, reason = ensure()
    print(python or reason)
    sys.exit(0 if python else 1)
