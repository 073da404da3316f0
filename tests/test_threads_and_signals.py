"""Streams moved between threads, calls made while a stream is open, Ctrl-C
and asyncio timeouts: each ends promptly with a clear outcome and leaves the
backend usable (issue "Hardening", class "threads and signals").

Every wait is bounded: a regression shows up as a failed join, not a hung
suite.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig, XybridError
from interrupt import interrupt_when_ready

GREEDY = GenerationConfig(max_tokens=24, temperature=0)


@pytest.fixture
def backend(tiny_llama_path: Path) -> Any:
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=4096, n_threads=1)) as b:
        yield b


def _run(target: Any, timeout: float = 30.0) -> list[Any]:
    """Run ``target`` on a thread; its result or exception, or fail if it hangs."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{target} did not return within {timeout} s"
    return out


def test_a_stream_finished_on_another_thread_releases_the_backend(backend: Any) -> None:
    want = backend.generate_raw("hello", GREEDY).text
    stream = backend.stream_raw("hello", GREEDY)
    first = next(stream)
    (rest,) = _run(lambda: [p.text for p in stream])
    assert not isinstance(rest, BaseException), rest
    assert first.text + "".join(rest) == want
    (again,) = _run(lambda: backend.generate_raw("hello", GREEDY).text)
    assert again == want


def test_a_stream_closed_on_another_thread_releases_the_backend(backend: Any) -> None:
    want = backend.generate_raw("hello", GREEDY).text
    stream = backend.stream_raw("hello", GREEDY)
    next(stream)
    (closed,) = _run(stream.close)
    assert closed is None
    (again,) = _run(lambda: backend.generate_raw("hello", GREEDY).text)
    assert again == want


def test_another_thread_waits_for_an_open_stream_then_runs(backend: Any) -> None:
    stream = backend.stream_raw("hello", GREEDY)
    next(stream)
    results: list[str] = []
    waiter = threading.Thread(target=lambda: results.append(
        backend.generate_raw("other", GREEDY).text), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert not results  # waiting for the lock the stream holds
    list(stream)
    waiter.join(30)
    assert not waiter.is_alive() and results


def test_load_while_a_stream_is_open_on_this_thread_refuses_and_changes_nothing(
        backend: Any, tiny_llama_path: Path) -> None:
    want = backend.generate_raw("hello", GREEDY).text
    stream = backend.stream_raw("hello", GREEDY)
    first = next(stream)
    model = backend.model
    with pytest.raises(XybridError, match="already running on this backend in this thread"):
        backend.load(LlmConfig(tiny_llama_path, context_length=512, n_threads=1))
    with pytest.raises(XybridError, match="already running"):
        backend.unload()
    assert backend.model is model
    assert first.text + "".join(p.text for p in stream) == want
    assert backend.generate_raw("hello", GREEDY).text == want


def test_a_callback_calling_its_own_backend_is_refused(backend: Any) -> None:
    errors: list[BaseException] = []

    def on_token(piece: Any) -> bool:
        try:
            backend.generate_raw("nested", GREEDY)
        except XybridError as exc:
            errors.append(exc)
        return False

    out = backend.generate_raw("hello", GREEDY, on_token=on_token)
    assert out.finish_reason == "cancelled"
    assert errors and "already running" in str(errors[0])
    assert backend.generate_raw("hello", GREEDY).text


def test_an_asyncio_timeout_cancels_during_prefill(tiny_llama_path: Path) -> None:
    """A small n_batch makes the prefill of a long prompt many decode steps;
    the timeout must end it at the next one, not after the whole prefill."""
    cfg = LlmConfig(tiny_llama_path, context_length=8192, n_batch=16, n_ubatch=16, n_threads=1)
    prompt = " hello world" * 2500
    one = GenerationConfig(max_tokens=1, temperature=0)
    with LlamaCppBackend(cfg) as b:
        t0 = time.monotonic()
        b.generate_raw(prompt, one)
        b.reset_cache()
        full = time.monotonic() - t0

        async def first() -> Any:
            async for piece in b.astream_raw(prompt, one):
                return piece

        async def main() -> float:
            t = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(first(), full / 20)
            return time.monotonic() - t

        took = asyncio.run(main())
        assert took < full / 2, f"the timeout took {took:.2f} s of a {full:.2f} s prefill"
        assert b.generate_raw("hello", GREEDY).text


SIGINT_CHILD = textwrap.dedent("""
    import sys, time
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
    b = LlamaCppBackend(LlmConfig(sys.argv[1], context_length=8192, n_threads=1))
    print("ready", flush=True)
    try:
        # Seed 1 runs the whole 8,000 tokens (no end token), some seconds.
        b.generate_raw("Once upon a time", GenerationConfig(max_tokens=8000, temperature=1.0,
                                                             min_p=0, top_k=0, top_p=1.0, seed=1))
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("again", len(b.generate_raw("hello", GenerationConfig(max_tokens=4)).token_ids) > 0,
          flush=True)
""")


def test_ctrl_c_stops_a_running_generate(tiny_llama_path: Path, tmp_path: Path) -> None:
    code, out, err = interrupt_when_ready(
        [sys.executable, "-c", SIGINT_CHILD, str(tiny_llama_path)], cwd=tmp_path)
    assert code == 0, err
    assert out.split() == ["interrupted", "again", "True"]
