"""Smoke checks of an installed xybrid: what a wheel must do on a new machine.

``scripts/build_wheel.sh`` (and so CI) runs these, ``pytest -m smoke``, in a
fresh virtual environment holding only the repaired wheel and pytest, with no
compiler on PATH and no network. They run in the normal suite as well. Each
is fast and real: the default model, the real CLI, the CPU backend that the
build actually loaded.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import xybrid
from xybrid import _build_info
from xybrid._native import _engine

pytestmark = pytest.mark.smoke

# llama.cpp's x86-64 CPU variants (GGML_CPU_ALL_VARIANTS in
# ggml/src/CMakeLists.txt) and the instruction sets each is compiled for.
_HASWELL = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + ("AVX512",),
    "cannonlake": _HASWELL + ("AVX512", "AVX512_VBMI"),
    "cascadelake": _HASWELL + ("AVX512", "AVX512_VNNI"),
    "icelake": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": _HASWELL + ("AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": _HASWELL + ("AVX_VNNI",),
    "sapphirerapids": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
                                  "AMX_TILE", "AMX_INT8"),
}
# The /proc/cpuinfo flags each instruction set needs.
CPUINFO_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",), "AVX": ("avx",), "F16C": ("f16c",), "FMA": ("fma",),
    "AVX2": ("avx2",), "BMI2": ("bmi2",), "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",), "AMX_TILE": ("amx_tile",), "AMX_INT8": ("amx_int8",),
}
# How ggml ranks a usable variant (ggml_backend_cpu_x86_score in
# ggml-cpu/arch/x86/cpu-feats.cpp): one bit per instruction set, newer
# sets weigh more than all the older ones together.
SCORE_BITS = {"FMA": 0, "F16C": 1, "SSE42": 2, "BMI2": 3, "AVX": 4, "AVX2": 5, "AVX_VNNI": 6,
              "AVX512": 7, "AVX512_VBMI": 8, "AVX512_BF16": 9, "AVX512_VNNI": 10, "AMX_INT8": 11}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo has no flags line")


def cpu_has(feature: str, flags: set[str]) -> bool:
    return all(f in flags for f in CPUINFO_FLAGS[feature])


def best_variant(installed: list[str], flags: set[str]) -> str:
    usable = [v for v in installed if all(cpu_has(f, flags) for f in X86_VARIANTS[v])]
    assert usable, f"none of {installed} runs on this CPU"
    return max(usable, key=lambda v: sum(1 << SCORE_BITS[f] for f in X86_VARIANTS[v] if f in SCORE_BITS))


def xybrid_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("xybrid")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "xybrid"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file(),
                    reason="the variant table is llama.cpp's x86-64 one")
def test_cpu_backend_is_the_best_for_this_cpu() -> None:
    backend = _engine.cpu_backend()
    flags = cpu_flags()
    assert backend["library"] is not None and os.path.isfile(backend["library"])
    native_dir = Path(_engine.__file__).resolve().parent
    assert Path(backend["library"]).resolve().parent == native_dir, "loaded from outside the package"
    reported = {name for name, value in backend["features"].items() if value == "1"}
    if _build_info.BACKEND_DL:
        installed = sorted(p.name[len("libggml-cpu-"):-len(".so")]
                           for p in native_dir.glob("libggml-cpu-*.so"))
        assert set(installed) == set(X86_VARIANTS), installed
        assert backend["variant"] == best_variant(installed, flags)
        # What it was compiled for is what it says it was, and this CPU has it all.
        expected = {f for f in X86_VARIANTS[backend["variant"]] if f in SCORE_BITS and f != "SSE42"}
        assert expected <= reported
    else:
        # A native build has one CPU backend, compiled for every instruction
        # set this CPU has.
        assert backend["variant"] is None
        for feature in ("AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI", "AVX512",
                        "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"):
            assert (feature in reported) == cpu_has(feature, flags), feature


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def greedy_text() -> str:
    """Eight greedy tokens of the default model, through the Python backend."""
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig, default_model_path

    backend = LlamaCppBackend()
    backend.load(LlmConfig(default_model_path(), context_length=512, n_threads=1))
    try:
        config = GenerationConfig(max_tokens=8, temperature=0.0)
        out = backend.generate_raw(PROMPT, config)
        again = backend.generate_raw(PROMPT, config)
    finally:
        backend.unload()
    assert out.tokens_generated == 8 and out.finish_reason == "length"
    assert out.text.strip()
    assert again.text == out.text  # greedy: the same tokens every time
    return out.text


def test_generate_on_the_default_model(greedy_text: str) -> None:
    assert len(greedy_text.split()) >= 2, greedy_text


def test_cli_version_and_generate(tmp_path: Path, greedy_text: str) -> None:
    proc = xybrid_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    variant = _engine.cpu_backend()["variant"] or "built-in"
    assert f"cpu={variant}" in proc.stdout
    assert xybrid.__version__ in proc.stdout and xybrid.__llama_cpp_commit__ in proc.stdout

    # The CLI, in a process of its own, echoes the prompt and writes what the
    # backend generated here.
    proc = xybrid_cli("generate", PROMPT, "--max-tokens", "8", "--temperature", "0",
                      "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + greedy_text + "\n"


def test_rpc_backend_splits_the_default_model(tmp_path: Path) -> None:
    """The RPC backend is in the package (a module of its own in a portable
    build), carries xybrid's patch, and a model runs across a server."""
    from rpc_server import RpcServer

    assert _build_info.RPC and _engine.supports_rpc() and _engine.rpc_recovers()
    server = RpcServer(tmp_path).start()
    try:
        proc = xybrid_cli("generate", PROMPT, "--max-tokens", "8", "--temperature", "0",
                          "--threads", "1", "--rpc", server.endpoint, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(PROMPT) and len(proc.stdout) > len(PROMPT) + 2
    finally:
        server.kill()
