"""``python -m bench.variant_probe``: is the wheel's gap to native in its compiler flags?

The portable wheel loads one CPU variant (say ``zen4``) built with ggml's list
of ``-m`` flags; the native build compiles the same kernels with
``-march=native``. This probe rebuilds only the variant the wheel picks, with
``--flags`` (default ``-march=native``) added to every compile line, swaps it
into a copy of the wheel's environment, and runs ``bench.wheel_vs_native``
against that copy. If the copy matches native where the real wheel did not, the
flags are the cause; if it does not, the gap lies elsewhere (loading, the other
libraries).

    python -m bench.variant_probe --wheel-python build/wheel-chain/smoke/bin/python \\
        --rounds 3 --workloads compute

The variant is built from this checkout's ``llama.cpp/`` with the wheel's own
CMake options (scripts/build_llama_cpp.py) into ``bench/.cache/variant-probe``;
ccache makes a second run quick. Nothing outside that folder is changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import wheel_vs_native

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".cache" / "variant-probe"


def load_build_script() -> Any:
    """scripts/build_llama_cpp.py, the wheel build's own CMake options (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("build_llama_cpp", REPO / "scripts" / "build_llama_cpp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.variant_probe", description=__doc__.splitlines()[0])
    p.add_argument("--wheel-python", required=True, type=os.path.abspath,
                   help="python of an environment with the portable wheel")
    p.add_argument("--flags", default="-march=native", help="compiler flags added to the variant's")
    p.add_argument("--rounds", default="3")
    p.add_argument("--workloads", default="compute")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    opts = p.parse_args(argv)

    facts = wheel_vs_native.build_facts(opts.wheel_python)
    variant, library = facts["cpu"], Path(facts["library"])
    if not variant:
        raise SystemExit(f"{opts.wheel_python} is not a portable build (no CPU variant)")
    source = REPO / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        raise SystemExit(f"no llama.cpp source in {source}: run ./scripts/setup.sh first")

    # 1. The variant, rebuilt with the extra flags.
    build = WORK / "build"
    build_llama_cpp = load_build_script()
    args = build_llama_cpp.cmake_args(source, native=False, cuda=False, build_type="Release", rpc=True)
    args += [f"-DCMAKE_C_FLAGS={opts.flags}", f"-DCMAKE_CXX_FLAGS={opts.flags}"]
    build_llama_cpp.configure(source, build, args, "Ninja" if shutil.which("ninja") else None)
    target = f"ggml-cpu-{variant}"
    subprocess.run(["cmake", "--build", str(build), "--parallel", str(opts.jobs), "--target", target], check=True)
    built = build / "bin" / library.name
    if not built.exists():
        raise SystemExit(f"the build did not produce {built}")

    # 2. A copy of the wheel's environment with that variant swapped in.
    env_src = Path(opts.wheel_python).parent.parent
    env_copy = WORK / "env"
    shutil.rmtree(env_copy, ignore_errors=True)
    shutil.copytree(env_src, env_copy, symlinks=True)
    swapped = env_copy / library.relative_to(env_src)
    shutil.copy2(built, swapped)
    probe_python = env_copy / "bin" / "python"
    print(f"[variant-probe] {variant} rebuilt with {opts.flags!r} -> {swapped}", flush=True)

    # 3. Native against the copy, the usual way.
    return wheel_vs_native.main(["--wheel-python", str(probe_python), "--rounds", opts.rounds,
                                 "--workloads", opts.workloads])


if __name__ == "__main__":
    raise SystemExit(main())
