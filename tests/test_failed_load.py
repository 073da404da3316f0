"""A load that fails after the context exists frees the context, then the
model, whatever the cyclic GC does; repeated failed loads neither crash nor
grow the process.

The failure is a broken chat template, inside the GGUF or given in the
config: it is found after the model and its context were created. The
exception's traceback keeps the failing frame (and so the model and the
context) alive in a reference cycle that only the cyclic GC frees. The GC
must not let the model go first: the context's reference to its model is
never cleared by the GC (``@cython.no_gc_clear``), so the context's own
deallocation frees it and then releases the model. Runs in a child process,
so a use-after-free that aborts is seen as a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gguf_mutation import encode_value, rebuild
from xybrid.gguf_check import ValueType, read_gguf

BROKEN = "{% for m in messages %}{{ m.content "

CHILD = textwrap.dedent('''
    import ctypes, ctypes.util, gc, json, sys
    import psutil
    from xybrid import LlamaCppBackend, LlmConfig, XybridError
    from xybrid._native import _engine
    from xybrid.chat_templates import resolve_chat_template

    broken, plain, template = sys.argv[1], sys.argv[2], sys.argv[3]
    trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim

    def rss():
        gc.collect()
        trim(0)
        return psutil.Process().memory_info().rss

    def backend_gguf_template():
        try:
            LlamaCppBackend(LlmConfig(broken, context_length=256, n_threads=1))
        except XybridError as e:
            return e
        raise SystemExit("the broken template in the GGUF was accepted")

    def backend_given_template():
        try:
            LlamaCppBackend(LlmConfig(plain, context_length=256, n_threads=1, chat_template=template))
        except XybridError as e:
            return e
        raise SystemExit("the broken template in the config was accepted")

    def engine_frame_in_a_cycle():
        # The caller keeps the exception, whose traceback keeps this frame
        # (model, ctx, sampler) alive until the cyclic GC runs.
        model = _engine.Model(broken)
        ctx = _engine.Context(model, n_ctx=256, n_threads=1)
        sampler = _engine.Sampler(model)
        try:
            resolve_chat_template(None, model.chat_template(), model.architecture)
        except XybridError as e:
            e.keep = e.__traceback__  # a cycle: exception -> traceback -> frame -> exception
            return e
        raise SystemExit("the broken template was accepted")

    report = {}
    for name, step in (("backend_gguf_template", backend_gguf_template),
                       ("backend_given_template", backend_given_template),
                       ("engine_frame_in_a_cycle", engine_frame_in_a_cycle)):
        kept = []
        for _ in range(8):  # warm-up: allocator pools, compute buffers
            kept.append(step())
        kept.clear()
        before = rss()
        for i in range(40):
            kept.append(step())
            if i % 4 == 3:  # several failed loads wait for each collection
                kept.clear()
                gc.collect()
        kept.clear()
        report[name] = rss() - before
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def broken_template_model(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Path:
    data = tiny_llama_path.read_bytes()
    out = tmp_path_factory.mktemp("broken-template") / "model.gguf"
    out.write_bytes(rebuild(data, {"tokenizer.chat_template": encode_value(ValueType.STRING, BROKEN)},
                            f=read_gguf(tiny_llama_path)))
    assert read_gguf(out).get("tokenizer.chat_template") == BROKEN
    return out


def test_failed_loads_free_context_before_model_and_keep_rss_flat(
        broken_template_model: Path, tiny_llama_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "failed_loads.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(broken_template_model), str(tiny_llama_path), BROKEN],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-1000:]}{proc.stderr[-3000:]}"
    growth = json.loads(proc.stdout.splitlines()[-1])
    assert set(growth) == {"backend_gguf_template", "backend_given_template", "engine_frame_in_a_cycle"}
    # 40 failed loads, each of which allocated a model and a context: a leak
    # of either per load would add up to far more than this.
    for name, grown in growth.items():
        assert grown < 12 * 2**20, f"{name}: RSS grew by {grown / 2**20:.1f} MiB over 40 failed loads"
