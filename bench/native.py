"""Compile bench/native_loop.c against the llama.cpp that xybrid installed.

The program is linked with ``-Wl,-rpath`` to the folder of the installed
``xybrid/_native/lib*.so``, so it runs exactly the libraries xybrid runs. The
headers come from the pinned llama.cpp source tree that those libraries were
built from. The binary is cached in ``bench/.cache`` under a name derived from
the source, the libraries and the compiler flags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "native_loop.c"
CFLAGS = ["-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra"]


def build(lib_dir: Path, llama_cpp_dir: Path, cache_dir: Path) -> tuple[Path | None, str, list[str]]:
    """Returns (binary, "", command) or (None, reason, command)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler found (set CC)", []
    includes = [llama_cpp_dir / "include", llama_cpp_dir / "ggml" / "include"]
    for inc in includes:
        if not (inc / ("llama.h" if inc.parent == llama_cpp_dir else "ggml.h")).is_file():
            return None, f"llama.cpp headers not found in {inc}", []
    libs = ["llama", "ggml", "ggml-base"]
    for name in libs:
        if not (lib_dir / f"lib{name}.so").is_file():
            return None, f"lib{name}.so not found in {lib_dir}", []
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join([cc, *CFLAGS, str(lib_dir)]).encode())
    for name in libs:
        st = (lib_dir / f"lib{name}.so").stat()
        digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    digest.update((llama_cpp_dir / "include" / "llama.h").read_bytes())
    binary = cache_dir / f"native_loop-{digest.hexdigest()[:12]}"
    cmd = [cc, *CFLAGS, *(f"-I{inc}" for inc in includes), str(SOURCE), "-o", str(binary),
           f"-L{lib_dir}", *(f"-l{name}" for name in libs), f"-Wl,-rpath,{lib_dir}", "-lpthread"]
    if binary.is_file():
        return binary, "", cmd
    cache_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"compiling native_loop.c failed:\n{proc.stderr[-2000:]}", cmd
    return binary, "", cmd
