"""No leaks: resident memory stays flat across repeated loads and generations.

RSS is read with psutil after a warm-up (allocator pools, lazily mapped code
and the first compute buffers settle in the first few iterations), then
compared with the end of the run. Every iteration allocates and frees
megabytes (a model, a context with its KV cache and compute buffers), so a
per-iteration leak of even a small fraction of that would add up to well over
the allowed noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest

from xybrid._native._engine import Context, Model, Sampler

psutil = pytest.importorskip("psutil")

MiB = 2**20


try:  # glibc: hand freed heap pages back to the OS before each reading, so
    # that RSS follows what is allocated rather than the allocator's whims
    # (without it, RSS wanders by +-20 MB between identical iterations).
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None


def rss() -> int:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return psutil.Process().memory_info().rss


def measure(step, iterations: int, warmup: int) -> tuple[int, int, list[int]]:
    samples = []
    for i in range(iterations):
        step(i)
        samples.append(rss())
    return samples[warmup - 1], samples[-1], samples


def test_load_and_free_tiny_llama_30_times(tiny_llama_path):
    path = str(tiny_llama_path)
    outputs = set()

    def step(i: int) -> None:
        model = Model(path)
        ctx = Context(model, n_ctx=256, n_batch=64, n_threads=1)
        sampler = Sampler(model, temperature=0.0)
        result = ctx.generate(model.tokenize("Hello world"), sampler, max_tokens=4, stop=["zzz"])
        outputs.add(tuple(result.tokens))
        ctx.close()
        model.close()

    start, end, samples = measure(step, 30, warmup=5)
    assert len(outputs) == 1  # every fresh load generates the same thing
    assert end - start < 2 * MiB, [s // MiB for s in samples]


def test_load_and_free_gemma(gemma_path):
    """The real model: 250 MB of mmapped weights, a context and a generation
    per iteration (10 iterations keep the suite fast; a leak of the weights
    or the KV cache would add tens of MB each time)."""
    path = str(gemma_path)
    outputs = set()

    def step(i: int) -> None:
        with Model(path) as model:
            with Context(model, n_ctx=256, n_batch=32, n_threads=1) as ctx:
                result = ctx.generate(model.tokenize("Hi"), Sampler(model, temperature=0.0), max_tokens=2)
                outputs.add(tuple(result.tokens))

    start, end, samples = measure(step, 10, warmup=3)
    assert len(outputs) == 1
    assert end - start < 4 * MiB, [s // MiB for s in samples]


@pytest.mark.parametrize("streaming", [False, True], ids=["inline", "streamed"])
def test_200_generations_on_one_context(tiny_llama_path, streaming):
    model = Model(str(tiny_llama_path))
    ctx = Context(model, n_ctx=256, n_batch=64, n_threads=1)
    sampler = Sampler(model, temperature=0.0)
    prompt = model.tokenize("Once upon a time")
    texts = set()

    def step(i: int) -> None:
        ctx.memory_clear()
        if streaming:
            chunks: list[str] = []
            result = ctx.generate(prompt, sampler, max_tokens=12, stop=["qq", "xyz"], on_text=chunks.append)
            assert "".join(chunks) == result.text
        else:
            result = ctx.generate(prompt, sampler, max_tokens=12, stop=["qq", "xyz"])
        texts.add(result.text)

    try:
        start, end, samples = measure(step, 200, warmup=20)
    finally:
        ctx.close()
        model.close()
    assert len(texts) == 1
    assert end - start < 2 * MiB, [s // MiB for s in samples[::20]]


def test_abandoned_streams_do_not_leak(tiny_llama_path):
    """Iterators dropped mid-way (their worker is cancelled and joined, their
    buffers freed) 100 times."""
    model = Model(str(tiny_llama_path))
    ctx = Context(model, n_ctx=256, n_batch=64, n_threads=1)
    sampler = Sampler(model, temperature=0.0)
    prompt = model.tokenize("Once upon a time")

    def step(i: int) -> None:
        ctx.memory_clear()
        gen = ctx.stream(prompt, sampler, max_tokens=200)
        next(gen)
        del gen

    try:
        start, end, samples = measure(step, 100, warmup=10)
    finally:
        ctx.close()
        model.close()
    assert end - start < 2 * MiB, [s // MiB for s in samples[::10]]


def test_each_context_owns_its_worker_threads(tiny_llama_path):
    """A context runs on its own ggml thread pool: n_threads - 1 workers
    (the decoding thread is the first), started with the context and joined
    when it closes, so repeated contexts leave no threads behind."""
    proc = psutil.Process()
    model = Model(str(tiny_llama_path))
    try:
        base = proc.num_threads()
        for n_threads in (1, 3, 2, 4):
            ctx = Context(model, n_ctx=128, n_threads=n_threads, n_threads_batch=1)
            ctx.generate(model.tokenize("Hello"), Sampler(model), max_tokens=2)
            assert proc.num_threads() == base + n_threads - 1
            ctx.close()
            assert proc.num_threads() == base
        for _ in range(20):
            with Context(model, n_ctx=128, n_threads=2) as ctx:
                ctx.generate(model.tokenize("Hello"), Sampler(model), max_tokens=2)
        assert proc.num_threads() == base
    finally:
        model.close()
