#!/usr/bin/env python3
"""Put the pinned llama.cpp source into xybrid's sdist (a meson dist script).

``meson dist`` packs only the files git tracks, and llama.cpp is fetched, not
committed. This copies the parts of it that the build uses into the dist tree
as ``llama.cpp/``, with the pin file, so ``fetch_llama_cpp.py`` finds it
current and a build from the sdist needs no network. Left out: models,
docs, examples, tests and the tools other than mtmd (four fifths of the bytes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_llama_cpp import PATCH_STAMP, PIN_FILE, is_current  # noqa: E402

# What CMake reads with the options of build_llama_cpp.py (CUDA and the other
# GPU backends included, so an sdist can still build them).
KEEP_FILES = ["CMakeLists.txt", "LICENSE", PIN_FILE, PATCH_STAMP]
KEEP_DIRS = ["cmake", "ggml", "include", "licenses", "src", "vendor", "tools/mtmd"]
# Sample media of mtmd's own tests.
SKIP = shutil.ignore_patterns("test-*.jpeg", "test-*.mp3", "test-*.mp4", "__pycache__")


def copy_subset(source: Path, dest: Path) -> int:
    if not is_current(source):
        raise SystemExit(f"{source} is not the pinned llama.cpp (no current {PIN_FILE})")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP_FILES:
        shutil.copy2(source / name, dest / name)
    for name in KEEP_DIRS:
        shutil.copytree(source / name, dest / name, ignore=SKIP, symlinks=True)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the llama.cpp folder")
    parser.add_argument("--dist-root", type=Path, default=None,
                        help="the unpacked sdist (default: $MESON_DIST_ROOT)")
    args = parser.parse_args()
    root = args.dist_root or Path(os.environ["MESON_DIST_ROOT"])
    size = copy_subset(args.source.resolve(), root / "llama.cpp")
    print(f"dist_llama_cpp: llama.cpp source in the sdist: {size / 2**20:.1f} MiB unpacked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
