#!/usr/bin/env python3
"""Build the llama.cpp shared libraries that xybrid links against.

Called by meson as a custom target. It configures CMake once per build
directory (again only when the options change), builds just the targets we
need (llama, ggml backends, mtmd) and copies the resulting libraries into
meson's output folder, touching a file only when its bytes changed so that an
unchanged llama.cpp does not relink the extension.

All libraries are built with an RPATH of ``$ORIGIN`` and without versioned
SONAMEs, so the installed package loads the copies that sit beside the
extension and never a system libllama.

A portable build (``--native false``, the wheel profile) builds ggml's CPU
backend once per CPU generation (``GGML_CPU_ALL_VARIANTS``) as modules that
ggml loads at run time (``GGML_BACKEND_DL``); the engine then loads the best
one for the CPU it runs on from its own folder.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def cmake_args(
    source: Path, native: bool, cuda: bool, build_type: str, cuda_architectures: str = "",
    rpc: bool = False,
) -> list[str]:
    args = [
        f"-DCMAKE_BUILD_TYPE={build_type}",
        "-DBUILD_SHARED_LIBS=ON",
        # Only the libraries: no tools, tests, server or the common helpers.
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_MTMD=ON",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_SUBPROCESS=OFF",
        f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
        # Portable: every CPU variant as a run-time loaded module.
        f"-DGGML_BACKEND_DL={'OFF' if native else 'ON'}",
        f"-DGGML_CPU_ALL_VARIANTS={'OFF' if native else 'ON'}",
        f"-DGGML_CUDA={'ON' if cuda else 'OFF'}",
        # The RPC backend over plain TCP: RDMA would link libibverbs, which a
        # wheel cannot assume on the machine it is installed on.
        f"-DGGML_RPC={'ON' if rpc else 'OFF'}",
        "-DGGML_RPC_RDMA=OFF",
        # ggml's own thread pool instead of OpenMP: each xybrid Context owns a
        # pool, so decode speed does not depend on which thread calls
        # llama_decode (libgomp slows down once a second thread has decoded;
        # see xy_threadpool_new in xybrid/_native/engine_support.h).
        "-DGGML_OPENMP=OFF",
        # Plain libfoo.so names and $ORIGIN lookups: the libraries find each
        # other (and the extension finds them) in the folder they are installed to.
        "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        "-DCMAKE_INSTALL_RPATH_USE_LINK_PATH=OFF",
    ]
    if shutil.which("ccache"):
        args.append("-DGGML_CCACHE=ON")
    else:
        args.append("-DGGML_CCACHE=OFF")
    if cuda:
        # Explicit architectures for a distributable build ("75;80;86;89;90");
        # otherwise the GPU of this machine for a native build, and llama.cpp's
        # own list of common architectures for a portable one.
        if cuda_architectures:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}")
        elif native:
            args.append("-DCMAKE_CUDA_ARCHITECTURES=native")
    return args


def configure(source: Path, build: Path, args: list[str], generator: str | None) -> None:
    stamp = build / "xybrid-configure.json"
    wanted = {"source": str(source), "args": args}
    if stamp.is_file() and (build / "CMakeCache.txt").is_file():
        if json.loads(stamp.read_text()) == wanted:
            return
    build.mkdir(parents=True, exist_ok=True)
    cmd = ["cmake", "-S", str(source), "-B", str(build), *args]
    if generator and not (build / "CMakeCache.txt").is_file():
        cmd += ["-G", generator]
    subprocess.run(cmd, check=True)
    stamp.write_text(json.dumps(wanted))


def ccache_base_dir(source: Path, build: Path) -> None:
    """Let ccache reuse objects across checkouts and unpacked sdists.

    ccache keys on the compiler's command line, which CMake fills with
    absolute paths; with a base_dir above both the source and the build
    folder it rewrites them relative to the build folder, so two trees with
    the same layout (a checkout and the next one, or the same sdist unpacked
    into two temporary folders) share their objects. Objects are unaffected
    but for __FILE__, which becomes a relative path. An explicit
    CCACHE_BASEDIR is kept.
    """
    common = os.path.commonpath([source, build])
    if "CCACHE_BASEDIR" not in os.environ and common != os.path.dirname(common):  # not "/"
        os.environ["CCACHE_BASEDIR"] = common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--native", choices=["true", "false"], default="true")
    parser.add_argument("--cuda", choices=["true", "false"], default="false")
    parser.add_argument("--rpc", choices=["true", "false"], default="false")
    parser.add_argument("--cuda-architectures", default="",
                        help="CMAKE_CUDA_ARCHITECTURES ('' = native, or llama.cpp's list when portable)")
    parser.add_argument("--build-type", default="Release")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("libs", nargs="+", help="library file names to deliver")
    opts = parser.parse_args()

    source = opts.source.resolve()
    build = opts.build.resolve()
    args = cmake_args(source, opts.native == "true", opts.cuda == "true", opts.build_type,
                      opts.cuda_architectures, rpc=opts.rpc == "true")
    generator = "Ninja" if shutil.which("ninja") else None
    if shutil.which("ccache"):
        ccache_base_dir(source, build)
    configure(source, build, args, generator)

    targets = ["llama", "mtmd"]
    if opts.rpc == "true":
        # Linked into libggml in a native build, but a module of its own
        # (loaded at run time) in a portable one: name it either way.
        targets.append("ggml-rpc")
    jobs = opts.jobs or os.cpu_count() or 2
    subprocess.run(
        ["cmake", "--build", str(build), "--parallel", str(jobs), "--target", *targets],
        check=True,
    )

    # The CPU variants meson declared must be exactly the ones llama.cpp
    # built: a new llama.cpp pin with another list must update meson.build.
    built_variants = {p.name for p in (build / "bin").glob("libggml-cpu-*.so")}
    declared_variants = {n for n in opts.libs if n.startswith("libggml-cpu-")}
    if opts.native == "false" and built_variants != declared_variants:
        print(f"build_llama_cpp: llama.cpp built the CPU variants {sorted(built_variants)}, "
              f"meson.build declares {sorted(declared_variants)}", file=sys.stderr)
        return 1

    opts.out.mkdir(parents=True, exist_ok=True)
    for name in opts.libs:
        built = build / "bin" / name
        if not built.is_file():
            print(f"build_llama_cpp: expected {built} after the build", file=sys.stderr)
            return 1
        target = opts.out / name
        if target.is_file() and filecmp.cmp(built, target, shallow=False):
            continue
        shutil.copy2(built, target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
