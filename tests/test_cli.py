"""The ``xybrid`` command line, run as a real subprocess on the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import xybrid

PROMPT = "The capital of France is"
# One compute thread: the test machines are small and shared (see conftest).
GEN_ARGS = ["--temperature", "0", "--max-tokens", "16", "--threads", "1"]


def xybrid_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("xybrid")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "xybrid"]


def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # cwd is a temporary folder: `python -m xybrid` run from the repository
    # root would import the uncompiled source tree instead of the install.
    return subprocess.run(xybrid_cmd() + args, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def engine_reference(gemma_gen_ctx, gemma_model, gemma_greedy):
    """What the engine itself generates for PROMPT (BOS added, greedy, 16 tokens)."""
    gemma_gen_ctx.memory_clear()
    result = gemma_gen_ctx.generate(gemma_model.tokenize(PROMPT), gemma_greedy, max_tokens=16)
    gemma_gen_ctx.memory_clear()
    return result


@pytest.fixture(scope="module")
def generate_run(workdir, gemma_path):
    return run(["generate", PROMPT, "--model", str(gemma_path), *GEN_ARGS, "--stats"], workdir)


def test_generate_prints_prompt_and_continuation(generate_run, engine_reference):
    proc = generate_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT)
    continuation = proc.stdout[len(PROMPT):]
    assert continuation.strip()
    assert continuation == engine_reference.text + "\n"


def test_generate_stats_json(generate_run, gemma_model):
    proc = generate_run
    last = proc.stderr.strip().splitlines()[-1]
    stats = json.loads(last)
    for key in ("prompt_tokens", "generated_tokens", "ttft_ms", "prefill_tps", "decode_tps"):
        assert key in stats, stats
    assert stats["prompt_tokens"] == len(gemma_model.tokenize(PROMPT))
    assert stats["generated_tokens"] == 16
    assert stats["stop_reason"] == "length"
    assert stats["ttft_ms"] > 0
    assert stats["prefill_tps"] > 0
    assert stats["decode_tps"] > 0
    assert "Traceback" not in proc.stderr


def test_generate_default_model(workdir, engine_reference):
    """No --model: the default (Gemma 3 270M) is used."""
    proc = run(["generate", PROMPT, *GEN_ARGS], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + engine_reference.text + "\n"
    assert proc.stderr.strip() == ""  # no --stats, no log noise


def test_generate_stop(workdir, gemma_path, engine_reference):
    text = engine_reference.text
    stop = text.split()[3]
    expected = text[:text.find(stop)]
    proc = run(["generate", PROMPT, "--model", str(gemma_path), *GEN_ARGS, "--stop", "zzz",
                "--stop", stop, "--stats"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + expected + "\n"
    assert stop not in proc.stdout[len(PROMPT):]
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["stop_reason"] == "stop"
    assert stats["generated_tokens"] < 16


def test_version_mentions_llama_cpp_commit(workdir):
    proc = run(["--version"], workdir)
    assert proc.returncode == 0
    commit = xybrid.__llama_cpp_commit__
    assert commit and len(commit) >= 7
    assert commit in proc.stdout
    assert "llama.cpp" in proc.stdout
    assert xybrid.__version__ in proc.stdout


def test_info(workdir, gemma_path, gemma_model):
    proc = run(["info", str(gemma_path)], workdir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "architecture" in out and "gemma3" in out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert str(gemma_model.n_ctx_train) in lines["context length"]
    assert "chat template" in lines
    assert lines["chat template"].split()[-1] == "False"  # the base model has none

    proc = run(["info", str(gemma_path), "--json"], workdir)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["architecture"] == "gemma3"
    assert facts["context_length"] == gemma_model.n_ctx_train == 32768
    assert facts["chat_template"] is False
    assert facts["vocab_size"] == gemma_model.n_vocab
    assert xybrid.__llama_cpp_commit__ in facts["version"]


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "not-gguf"])
def test_bad_model_path(workdir, kind):
    if kind == "missing":
        path = workdir / "does" / "not" / "exist.gguf"
        expect = "not found"
    elif kind == "empty-dir":
        path = workdir / "empty-models"
        path.mkdir(exist_ok=True)
        expect = "no .gguf"
    else:
        path = workdir / "fake.gguf"
        path.write_text("definitely not a model")
        expect = "not a GGUF file"
    for args in (["generate", "hi", "--model", str(path)], ["info", str(path)]):
        proc = run(args, workdir)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("xybrid: error:"), proc.stderr
        assert expect in proc.stderr
        assert str(path) in proc.stderr


def test_model_directory_is_resolved(workdir, tiny_llama_path):
    folder = workdir / "tiny-model"
    folder.mkdir(exist_ok=True)
    target = folder / "tiny.gguf"
    if not target.exists():
        target.symlink_to(tiny_llama_path)
    proc = run(["info", str(folder), "--json"], workdir)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["architecture"] == "llama"
    assert facts["path"] == str(target)
