"""Continuous batching: many requests on one backend, decoded together.

Most checks run on a tiny random-weight model with F32 weights, where
llama.cpp's results do not depend on the shape of the batch, so each request
must give exactly the tokens it gives alone. Gemma 3 270M (Q4_K_M) is not
batch-invariant: its measured divergence is checked and documented below.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from pathlib import Path

import pytest

from xybrid import (
    ChatMessage,
    ContextOverflowError,
    GenerationConfig,
    GrammarError,
    LlamaCppBackend,
    LlmConfig,
    OverloadedError,
)
from xybrid._native import _engine
from near_tie import assert_diverges_only_at_near_ties
from xybrid.errors import ModelNotLoadedError

GREEDY = GenerationConfig(max_tokens=24, temperature=0)
PROMPTS = [f"Sample {i}: the weather on day {i} was" for i in range(8)]


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    from xybrid.testing.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-f32") / "tiny-f32.gguf",
                            dtype="f32", llama_cpp_dir=llama_cpp_dir)


def config(path: Path, **kw: object) -> LlmConfig:
    base: dict[str, object] = dict(context_length=2048, n_threads=1, n_batch=256,
                                   chat_template="chatml")
    base.update(kw)
    return LlmConfig(path, **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def solo(f32_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(config(f32_path)) as b:
        yield b


@pytest.fixture(scope="module")
def batched(f32_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(config(f32_path, parallel=8)) as b:
        yield b


def alone(solo: LlamaCppBackend, prompt: str, cfg: GenerationConfig = GREEDY) -> tuple[int, ...]:
    solo.reset_cache()
    return solo.generate_raw(prompt, cfg).token_ids


def test_eight_concurrent_greedy_requests_match_their_solo_runs(
        solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    want = [alone(solo, p) for p in PROMPTS]
    got: list[tuple[int, ...] | None] = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        got[i] = batched.generate_raw(PROMPTS[i], GREEDY).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    stats = batched.stats()
    assert stats["parallel"] == 8
    assert stats["running"] == 0 and stats["queued"] == 0
    # They really shared steps: more than one sequence per decode on average.
    assert stats["batch_occupancy"] > 1.5


def test_generate_batch_keeps_input_order_and_matches_solo(
        solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    prompts = PROMPTS * 3  # more requests than slots: the rest wait in the queue
    outs = batched.generate_batch(prompts, GREEDY, raw=True)
    want = {p: alone(solo, p) for p in PROMPTS}
    assert [o.token_ids for o in outs] == [want[p] for p in prompts]
    assert all(o.finish_reason == "length" for o in outs)


def test_generate_batch_per_request_configs_and_errors(batched: LlamaCppBackend) -> None:
    cfgs = [GenerationConfig(max_tokens=n, temperature=0) for n in (3, 5, 7)]
    outs = batched.generate_batch(PROMPTS[:3], cfgs, raw=True)
    assert [o.tokens_generated for o in outs] == [3, 5, 7]
    bad = GenerationConfig(max_tokens=4, grammar='root ::= "a" (')
    with pytest.raises(GrammarError):
        batched.generate_batch(PROMPTS[:2], [GREEDY, bad], raw=True)
    mixed = batched.generate_batch(PROMPTS[:2], [GREEDY, bad], raw=True, return_exceptions=True)
    assert mixed[0].tokens_generated == GREEDY.max_tokens
    assert isinstance(mixed[1], GrammarError)
    with pytest.raises(ValueError):
        batched.generate_batch(PROMPTS[:2], [GREEDY], raw=True)


def test_parallel_one_behaves_as_the_single_sequence_path(solo: LlamaCppBackend) -> None:
    assert solo.parallel == 1
    outs = solo.generate_batch(PROMPTS[:2], GREEDY, raw=True)
    assert [o.token_ids for o in outs] == [alone(solo, p) for p in PROMPTS[:2]]
    assert solo.stats()["parallel"] == 1


def test_mixed_load_leaves_every_other_output_untouched(
        f32_path: Path, solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    """Different lengths, samplers, stops and a grammar run at once, beside one
    request cancelled half-way and one that overflows the context."""
    seeded = GenerationConfig(max_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    cases = [
        (PROMPTS[0], GenerationConfig(max_tokens=5, temperature=0)),
        (PROMPTS[1], GenerationConfig(max_tokens=40, temperature=0)),
        (PROMPTS[2], seeded),
        (PROMPTS[3], GenerationConfig(max_tokens=30, temperature=0,
                                      repetition_penalty=1.3, presence_penalty=0.5)),
        (PROMPTS[4], GenerationConfig(max_tokens=24, temperature=0,
                                      grammar='root ::= [a-z ]+ "."')),
    ]
    want = [solo.generate_raw(p, c) for p, c in cases]
    stop_text = want[1].text[5:9]
    cases.append((PROMPTS[1], GenerationConfig(max_tokens=40, temperature=0,
                                               stop_sequences=(stop_text,))))
    want.append(solo.generate_raw(*cases[-1]))
    assert want[-1].finish_reason == "stop"

    results: dict[object, object] = {}

    def run(i: int) -> None:
        results[i] = batched.generate_raw(*cases[i])

    def run_cancelled() -> None:
        pieces = batched.stream_raw(PROMPTS[5], GenerationConfig(max_tokens=400, temperature=0))
        for n, _ in enumerate(pieces):
            if n == 3:
                pieces.close()  # dropping the stream half-way cancels it
                break
        results["cancelled"] = n

    def run_too_long() -> None:
        try:
            batched.generate_raw("word " * 3000, GREEDY)
        except ContextOverflowError as exc:
            results["too long"] = exc

    def run_overflowing() -> None:
        # Fits as a prompt, then runs into the end of the context window.
        results["overflowing"] = batched.generate_raw(
            "word " * 1900, GenerationConfig(max_tokens=400, temperature=0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    threads += [threading.Thread(target=f) for f in (run_cancelled, run_too_long, run_overflowing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, w in enumerate(want):
        out = results[i]
        assert out.token_ids == w.token_ids, f"case {i} changed"  # type: ignore[attr-defined]
        assert out.text == w.text  # type: ignore[attr-defined]
        assert out.finish_reason == w.finish_reason  # type: ignore[attr-defined]
    assert results["cancelled"] == 3
    assert isinstance(results["too long"], ContextOverflowError)
    overflowing = results["overflowing"]
    assert overflowing.finish_reason == "length"  # type: ignore[attr-defined]
    assert overflowing.tokens_generated < 400  # type: ignore[attr-defined]
    assert batched.stats()["running"] == 0


def test_a_multimodal_request_batches_beside_text_requests(
        tmp_path: Path, llama_cpp_dir: Path) -> None:
    from xybrid.testing.tiny_models import write_tiny_llama, write_tiny_mmproj_vision

    model = write_tiny_llama(tmp_path / "model.gguf", dtype="f32", llama_cpp_dir=llama_cpp_dir)
    mmproj = write_tiny_mmproj_vision(tmp_path / "mmproj.gguf", text_model_n_embd=64)
    image = llama_cpp_dir / "tools" / "mtmd" / "test-1.jpeg"
    chat = [ChatMessage.user("Describe it.", images=[image])]
    cfg = GenerationConfig(max_tokens=12, temperature=0)
    with LlamaCppBackend(config(model, mmproj_path=mmproj)) as one:
        want_media = one.generate(chat, cfg)
        want_text = [one.generate_raw(p, cfg).token_ids for p in PROMPTS[:3]]
    assert want_media.media_tokens > 0
    with LlamaCppBackend(config(model, mmproj_path=mmproj, parallel=4)) as many:
        results: dict[str, object] = {}
        threads = [threading.Thread(target=lambda: results.__setitem__("m", many.generate(chat, cfg)))]
        for i, p in enumerate(PROMPTS[:3]):
            threads.append(threading.Thread(
                target=lambda i=i, p=p: results.__setitem__(i, many.generate_raw(p, cfg).token_ids)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        media = results["m"]
        assert media.token_ids == want_media.token_ids  # type: ignore[attr-defined]
        assert media.media_tokens == want_media.media_tokens  # type: ignore[attr-defined]
        assert [results[i] for i in range(3)] == want_text


def test_threads_and_asyncio_at_once_without_a_thread_per_stream(
        solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    want = [alone(solo, p) for p in PROMPTS]
    chat_want = solo.generate([ChatMessage.user("Hi")], GREEDY).text
    thread_results: list[tuple[int, ...]] = []

    def worker() -> None:
        thread_results.append(batched.generate_raw(PROMPTS[0], GREEDY).token_ids)

    async def one(i: int) -> tuple[tuple[int, ...], str]:
        text = ""
        final = None
        async for piece in batched.astream_raw(PROMPTS[i], GREEDY):
            text += piece.text
            final = piece
        assert final is not None and final.output is not None
        assert final.output.text == text
        return final.output.token_ids, text

    async def chat() -> str:
        pieces = [p async for p in batched.astream([ChatMessage.user("Hi")], GREEDY)]
        return pieces[-1].output.text  # type: ignore[union-attr]

    async def main() -> list[object]:
        before = threading.active_count()
        tasks = [asyncio.ensure_future(one(i)) for i in range(6)] + [asyncio.ensure_future(chat())]
        await asyncio.sleep(0.01)
        during = threading.active_count()
        out = await asyncio.gather(*tasks)
        return [before, during, *out]

    t = threading.Thread(target=worker)
    t.start()
    before, during, *outs = asyncio.run(main())
    t.join(60)
    # astream on a batched backend uses no helper thread per stream.
    assert during <= before + 1
    for i, (tokens, _text) in enumerate(outs[:6]):  # type: ignore[misc]
        assert tokens == want[i]
    assert outs[6] == chat_want
    assert thread_results == [want[0]]


def test_an_abandoned_astream_cancels_its_request(batched: LlamaCppBackend) -> None:
    async def main() -> None:
        agen = batched.astream_raw(PROMPTS[0], GenerationConfig(max_tokens=2000, temperature=0))
        async for _ in agen:
            break
        await agen.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while batched.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.stats()["running"] == 0


def test_overload_is_a_typed_error_at_once(f32_path: Path) -> None:
    with LlamaCppBackend(config(f32_path, parallel=2, max_queued=1)) as b:
        long = GenerationConfig(max_tokens=1500, temperature=0)
        streams = [b.stream_raw(p, long) for p in PROMPTS[:2]]
        for s in streams:
            next(s)  # both slots running
        waiting: list[object] = []
        t = threading.Thread(target=lambda: waiting.append(b.generate_raw(PROMPTS[2], GREEDY)))
        t.start()
        deadline = time.monotonic() + 10
        while b.stats()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert b.stats()["queued"] == 1
        t0 = time.monotonic()
        with pytest.raises(OverloadedError, match="queue"):
            b.generate_raw(PROMPTS[3], GREEDY)
        assert time.monotonic() - t0 < 5
        for s in streams:
            s.close()
        t.join(30)
        assert waiting[0].tokens_generated == GREEDY.max_tokens  # type: ignore[attr-defined]
        # It waited for a slot, and says how long.
        assert waiting[0].queued_ms > 0  # type: ignore[attr-defined]
        assert waiting[0].to_dict()["queued_ms"] == waiting[0].queued_ms  # type: ignore[attr-defined]
        # The refusal harmed nothing: the backend serves the next request.
        assert b.generate_raw(PROMPTS[3], GREEDY).tokens_generated == GREEDY.max_tokens


def test_a_slow_consumer_is_parked_and_never_holds_the_others(f32_path: Path) -> None:
    model = _engine.Model(str(f32_path))
    ctx = _engine.Context(model, n_ctx=2048, n_batch=64, n_threads=1, n_seq_max=2)
    sched = _engine.Scheduler(ctx)
    prompt = model.tokenize(PROMPTS[0])
    want = sched.submit(prompt, _engine.Sampler(model), max_tokens=300, streaming=False).wait()
    # A one-byte buffer: the sequence is parked as soon as its unread text
    # passes a byte, and its consumer now stops reading.
    slow = sched.submit(prompt, _engine.Sampler(model), max_tokens=300, buffer_limit=1)
    first = next(slow)
    other = sched.submit(model.tokenize(PROMPTS[1]), _engine.Sampler(model), max_tokens=200,
                         streaming=False).wait()
    assert len(other.tokens) == 200
    assert sched.stats()["running"] == 1  # the slow one waits, parked
    rest = "".join(slow)  # it resumes and completes as its consumer reads
    assert first + rest == want.text
    assert slow.result.tokens == want.tokens
    sched.close()
    ctx.close()


def test_multi_turn_requests_return_to_their_slot_and_share_prefixes(
        f32_path: Path, solo: LlamaCppBackend) -> None:
    with LlamaCppBackend(config(f32_path, parallel=4)) as b:
        system = ChatMessage.system("You are a careful assistant. " * 20)
        first = b.generate([system, ChatMessage.user("Question one?")], GREEDY)
        assert first.cached_prompt_tokens == 0
        # The conversation's next turn goes back to its slot and reuses its
        # prompt (and the part of the reply that tokenizes the same).
        turn = [system, ChatMessage.user("Question one?"), ChatMessage.assistant(first.text),
                ChatMessage.user("And then?")]
        second = b.generate(turn, GREEDY)
        assert second.cached_prompt_tokens >= first.prompt_tokens - 1
        assert b.last_cached_prefix_len() == second.cached_prompt_tokens
        # While that slot is busy, another conversation with the same long
        # system prompt gets a free slot and shares the system prompt's cells
        # with llama_memory_seq_cp instead of decoding them again.
        busy = b.stream(turn, GenerationConfig(max_tokens=2000, temperature=0))
        next(busy)
        other = b.generate([system, ChatMessage.user("Another question?")], GREEDY)
        busy.close()
        assert other.cached_prompt_tokens > 100
        assert b.stats()["prompt_tokens_shared"] > 100
        solo.reset_cache()
        assert other.token_ids == solo.generate(
            [system, ChatMessage.user("Another question?")], GREEDY).token_ids
        b.reset_cache()
        assert b.generate(turn, GREEDY).cached_prompt_tokens == 0


def test_a_full_kv_cache_ends_only_the_sequences_that_cannot_continue(f32_path: Path) -> None:
    # 4 slots sharing 256 cells: four 120-token replies cannot all fit.
    with LlamaCppBackend(config(f32_path, parallel=4, context_length=256, n_batch=64)) as b:
        cfg = GenerationConfig(max_tokens=120, temperature=0)
        outs = b.generate_batch(PROMPTS[:4], cfg, raw=True, return_exceptions=True)
        finished = [o.finish_reason for o in outs]  # type: ignore[union-attr]
        assert all(not isinstance(o, BaseException) for o in outs)
        assert finished.count("length") == 4
        # Some ran to max_tokens; the ones that could not go on ended early.
        lengths = sorted(o.tokens_generated for o in outs)  # type: ignore[union-attr]
        assert lengths[-1] == 120 and lengths[0] < 120
        assert b.stats()["ended_by_full_cache"] >= 1
        # Afterwards the backend is whole.
        assert b.generate_raw(PROMPTS[0], GREEDY).tokens_generated == GREEDY.max_tokens


def test_bad_requests_fail_alone(batched: LlamaCppBackend, solo: LlamaCppBackend) -> None:
    want = alone(solo, PROMPTS[0])
    with pytest.raises(GrammarError):
        batched.generate_raw(PROMPTS[0], GenerationConfig(grammar="root ::= nothing"))
    with pytest.raises(ContextOverflowError):
        batched.generate_raw([1] * 5000, GREEDY)
    with pytest.raises(ValueError):
        batched.generate_raw([10**9], GREEDY)

    def boom(piece: object) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        batched.generate_raw(PROMPTS[0], GREEDY, on_token=boom)
    assert batched.generate_raw(PROMPTS[0], GREEDY).token_ids == want
    pieces: list[str] = []
    out = batched.generate_raw(PROMPTS[0], GREEDY, on_token=lambda p: pieces.append(p.text))
    assert "".join(pieces) == out.text and out.token_ids == want
    stopped = batched.generate_raw(PROMPTS[0], GenerationConfig(max_tokens=200, temperature=0),
                                   on_token=lambda p: False)
    assert stopped.finish_reason == "cancelled"


def test_unload_with_requests_in_flight_cancels_them(f32_path: Path) -> None:
    b = LlamaCppBackend(config(f32_path, parallel=4))
    long = GenerationConfig(max_tokens=5000, temperature=0)
    outs: list[object] = []

    def run(p: str) -> None:
        try:
            outs.append(b.generate_raw(p, long).finish_reason)
        except ModelNotLoadedError as exc:  # arrived after the unload
            outs.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS[:6]]
    for t in threads:
        t.start()
    time.sleep(0.3)
    b.unload()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(outs) == 6
    assert all(o == "cancelled" or isinstance(o, ModelNotLoadedError) for o in outs)
    with pytest.raises(ModelNotLoadedError):
        b.generate_raw(PROMPTS[0], GREEDY)


def test_cancel_stops_every_request_of_the_backend(f32_path: Path) -> None:
    with LlamaCppBackend(config(f32_path, parallel=3)) as b:
        long = GenerationConfig(max_tokens=5000, temperature=0)
        streams = [b.stream_raw(p, long) for p in PROMPTS[:3]]
        for s in streams:
            next(s)
        assert b.cancel()
        finals = [list(s)[-1] for s in streams]
        assert all(f.finish_reason == "cancelled" for f in finals)
        assert not b.cancel()


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_recurrent_and_hybrid_models_batch_from_empty_sequences(
        kind: str, tiny_recurrent_path: Path, tiny_hybrid_path: Path) -> None:
    path = tiny_recurrent_path if kind == "recurrent" else tiny_hybrid_path
    cfg = GenerationConfig(max_tokens=12, temperature=0)
    with LlamaCppBackend(config(path)) as one:
        want = [one.generate_raw(p, cfg).token_ids for p in PROMPTS[:4]]
    with LlamaCppBackend(config(path, parallel=4)) as many:
        outs = many.generate_batch(PROMPTS[:4], cfg, raw=True)
        again = many.generate_batch(PROMPTS[:4], cfg, raw=True)
    assert [o.token_ids for o in outs] == want
    assert [o.token_ids for o in again] == want
    assert all(o.cached_prompt_tokens == 0 for o in again)


def test_random_start_cancel_abandon_close_stress_finishes(f32_path: Path) -> None:
    """Bounded in count and time: starts, cancels, abandons and closes at
    random from several threads, then checks nothing is left running."""
    rng = random.Random(1234)
    b = LlamaCppBackend(config(f32_path, parallel=4, max_queued=4))
    errors: list[BaseException] = []
    deadline = time.monotonic() + 20

    def client(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(15):
            if time.monotonic() > deadline:
                return
            cfg = GenerationConfig(max_tokens=r.randint(1, 60), temperature=r.choice([0, 0.8]),
                                   seed=r.randint(0, 1000))
            action = r.choice(["generate", "stream", "abandon", "cancel"])
            try:
                if action == "generate":
                    b.generate_raw(r.choice(PROMPTS), cfg)
                elif action == "stream":
                    list(b.stream_raw(r.choice(PROMPTS), cfg))
                elif action == "abandon":
                    s = b.stream_raw(r.choice(PROMPTS), cfg)
                    next(s)
                    del s
                else:
                    b.cancel()
            except (OverloadedError, ModelNotLoadedError):
                pass
            except BaseException as exc:  # anything else is a failure
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(rng.randint(0, 10**6),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a client deadlocked"
    gc.collect()
    assert not errors, errors
    stats = b.stats()
    assert stats["running"] == 0 and stats["queued"] == 0
    b.unload()


@pytest.mark.slow
def test_rss_stays_flat_over_2000_batched_requests(f32_path: Path) -> None:
    import ctypes

    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    # Freed heap memory stays in RSS until glibc gives it back, in steps of
    # tens of MiB depending on which arena a thread used: trim before each
    # reading so that what is left is what is still allocated.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)

    def rss() -> int:
        gc.collect()
        if trim is not None:
            trim(0)
        return int(proc.memory_info().rss)

    cfg = GenerationConfig(max_tokens=4, temperature=0.7, seed=1)
    with LlamaCppBackend(config(f32_path, parallel=8, context_length=1024)) as b:
        for _ in range(3):  # warm up allocators, thread arenas and caches
            b.generate_batch(PROMPTS * 25, cfg, raw=True)
        readings = [rss()]
        for half in range(2):
            for _ in range(5):
                b.generate_batch(PROMPTS * 25, cfg, raw=True)
            readings.append(rss())
    # A leak grows with every request, in both halves of the 2,000; glibc can
    # still step RSS up once when a thread's arena grows, which a suite that
    # has run for minutes makes likelier: one half may hold such a step.
    halves = [readings[1] - readings[0], readings[2] - readings[1]]
    assert min(halves) < 4 * 1024 * 1024, (
        f"RSS grew in both halves of 2,000 requests: {[round(h / 2**20, 1) for h in halves]} MiB")


def test_engine_scheduler_refuses_misuse(f32_path: Path) -> None:
    model = _engine.Model(str(f32_path))
    ctx = _engine.Context(model, n_ctx=512, n_batch=64, n_threads=1, n_seq_max=2)
    sched = _engine.Scheduler(ctx, max_queued=0)
    with pytest.raises(Exception, match="generation is already running|busy|already"):
        ctx.generate([1, 2, 3], _engine.Sampler(model))
    other = _engine.Model(str(f32_path))
    with pytest.raises(ValueError, match="another model"):
        sched.submit([1, 2], _engine.Sampler(other))
    with pytest.raises(ValueError, match="empty"):
        sched.submit([], _engine.Sampler(model))
    g = sched.submit(model.tokenize("hello"), _engine.Sampler(model), max_tokens=3,
                     streaming=False)
    assert len(g.wait().tokens) == 3
    assert g.result.t_submit_ns <= g.result.t_start_ns
    sched.close()
    with pytest.raises(Exception, match="closed"):
        sched.submit([1, 2], _engine.Sampler(model))
    # Closed: the context is the caller's again.
    assert len(ctx.generate(model.tokenize("hello"), _engine.Sampler(model), max_tokens=2).tokens) == 2
    ctx.close()


def test_ctrl_c_cancels_a_batched_generate_and_the_backend_stays_usable(
        f32_path: Path, tmp_path: Path) -> None:
    import sys

    from interrupt import interrupt_when_ready

    script = tmp_path / "interrupt.py"
    script.write_text(f"""
import sys, time
from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
b = LlamaCppBackend(LlmConfig({str(f32_path)!r}, context_length=8192, n_threads=1, parallel=2))
print("ready", flush=True)
try:
    b.generate_raw("Once", GenerationConfig(max_tokens=8000, temperature=0))
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", b.stats()["running"], flush=True)
out = b.generate_raw("Once", GenerationConfig(max_tokens=4, temperature=0))
print("after", out.tokens_generated, flush=True)
b.unload()
""")
    code, out, _ = interrupt_when_ready([sys.executable, str(script)], timeout=30)
    assert out.split("\n")[:2] == ["interrupted 0", "after 4"], out
    assert code == 0


def test_gemma_q4_batched_greedy_matches_alone_or_diverges_at_a_near_tie(
        gemma_path: Path) -> None:
    """Gemma 3 270M Q4_K_M is not batch-invariant: llama.cpp's quantized
    kernels group rows, so a token's logits move slightly with what else is
    in its batch. A batched greedy request must give the tokens it gives
    alone, or leave them only where the two best tokens were nearly tied."""
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
               "The three primary colours are", "In 1969, the first", "Water boils at"]
    cfg = GenerationConfig(max_tokens=24, temperature=0)
    with LlamaCppBackend(LlmConfig(gemma_path, context_length=1024, n_threads=2)) as one:
        want = []
        for p in prompts:
            one.reset_cache()
            want.append(one.generate_raw(p, cfg).token_ids)
        with LlamaCppBackend(LlmConfig(gemma_path, context_length=2048, n_threads=2,
                                       parallel=len(prompts))) as many:
            got = [o.token_ids for o in many.generate_batch(prompts, cfg, raw=True)]
        # How many match depends on how the scheduler happened to group the
        # prompts into steps, so only where they part is checked.
        assert_diverges_only_at_near_ties(one.model, prompts, want, got)


def test_batched_requests_report_logprobs_like_solo_runs(
        solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    cfg = GenerationConfig(max_tokens=8, temperature=0, logprobs=3)
    solo.reset_cache()
    want = solo.generate_raw(PROMPTS[0], cfg)
    outs = batched.generate_batch([PROMPTS[0], PROMPTS[1]], cfg, raw=True)
    got = outs[0]
    assert got.token_ids == want.token_ids
    assert want.logprobs is not None and got.logprobs is not None
    assert len(got.logprobs) == len(got.token_ids)
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert [[t for t, _ in alts] for alts in got.top_logprobs] == \
        [[t for t, _ in alts] for alts in want.top_logprobs]
    with pytest.raises(Exception, match="parallel=1"):
        batched.save_state()


def test_cancelled_asyncio_tasks_free_their_slots(batched: LlamaCppBackend) -> None:
    async def consume(p: str) -> None:
        async for _ in batched.astream_raw(p, GenerationConfig(max_tokens=3000, temperature=0)):
            pass

    async def main() -> None:
        tasks = [asyncio.ensure_future(consume(p)) for p in PROMPTS]
        await asyncio.sleep(0.3)
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while batched.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.stats()["running"] == 0 and batched.stats()["queued"] == 0
    assert batched.generate_raw(PROMPTS[0], GREEDY).tokens_generated == GREEDY.max_tokens


def test_sliding_window_models_reuse_a_prefix_only_where_its_window_is_held(
        tmp_path: Path, llama_cpp_dir: Path) -> None:
    """Batched contexts keep only the window of sliding-window layers (as
    llama.cpp's tools do; gemma2 here, window 32). A slot's cache is reused
    only where the window before the cut is still held; either way every
    reply is the one the single-sequence path (every position kept) gives.
    llama.cpp drops old positions only when it needs their cells: n_ubatch=32
    makes that cache 256 cells, which the 340-token prompt overruns."""
    from xybrid.testing.tiny_models import write_tiny_transformer

    path = write_tiny_transformer(tmp_path / "gemma2.gguf", "gemma2", dtype="f32",
                                  llama_cpp_dir=llama_cpp_dir)
    cfg = GenerationConfig(max_tokens=40, temperature=0)
    shared = list(range(300, 340))
    first, other = shared + [500] + list(range(600, 900)), shared + [501]
    with LlamaCppBackend(config(path, n_ubatch=32)) as one:
        def fresh(prompt: list[int]) -> tuple[int, ...]:
            one.reset_cache()
            return one.generate_raw(prompt, cfg).token_ids
        reply = fresh(first)
        # The next turn: everything the slot decoded (the prompt and the
        # reply but its last token, which was sampled, not decoded) and more.
        follow = first + list(reply) + [502, 503]
        want = {tuple(p): fresh(p) for p in (other, follow)}
    with LlamaCppBackend(config(path, parallel=2, n_ubatch=32)) as many:
        assert many.generate_raw(first, cfg).token_ids == reply
        # The shared tokens end 340 positions before the end of that slot's
        # cache: their window is gone, so nothing is reused.
        b = many.generate_raw(other, cfg)
        assert b.token_ids == want[tuple(other)]
        assert b.cached_prompt_tokens == 0
        # A conversation's next turn extends everything its slot decoded:
        # the window before the cut is held, and the cache is reused.
        many.reset_cache()
        assert many.generate_raw(first, cfg).token_ids == reply
        c = many.generate_raw(follow, cfg)
        assert c.token_ids == want[tuple(follow)]
        assert c.cached_prompt_tokens >= len(first) + len(reply) - 1
