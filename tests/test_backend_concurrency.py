"""One LlamaCppBackend used from several threads, and the GIL during a run.

The thread test runs on the tiny llama model, whose kernels are batch
invariant: whichever conversation last filled the KV cache, a reply is
bit-identical to one computed from an empty cache (see
test_backend_llamacpp.py), so any difference from the single-threaded
reference would be corruption, not rounding.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.types import ChatMessage, GenerationConfig, LlmConfig

SYSTEM = ChatMessage.system("You are terse.")
CONVERSATIONS = [
    ["Hello there", "How are you?", "Tell me a joke.", "Thanks!"],
    ["What is two plus two?", "And three plus three?", "Why?", "OK."],
    ["Name a colour.", "Another one.", "And a third.", "Bye."],
    ["Write a haiku.", "Shorter.", "In French.", "Merci."],
]
METHODS = ["generate", "callback", "stream", "generate"]


def run_conversation(b: LlamaCppBackend, turns: list[str], method: str,
                     cfg: GenerationConfig) -> list[tuple[str, str, tuple[int, ...] | None]]:
    history = [SYSTEM]
    replies = []
    for user in turns:
        history.append(ChatMessage.user(user))
        if method == "generate":
            out = b.generate(history, cfg)
            reply = (out.text, out.finish_reason, out.token_ids)
        elif method == "callback":
            pieces = []
            out = b.generate_streaming(history, cfg, pieces.append)
            assert pieces[-1].cumulative_text == out.text
            reply = (out.text, out.finish_reason, out.token_ids)
        else:
            pieces = list(b.stream(history, cfg))
            reply = (pieces[-1].cumulative_text, pieces[-1].finish_reason, None)
        replies.append(reply)
        history.append(ChatMessage.assistant(reply[0]))
    return replies


def test_four_threads_on_one_backend(tiny_llama_path: Path) -> None:
    config = LlmConfig(tiny_llama_path, context_length=2048, n_threads=1, chat_template="chatml")
    cfg = GenerationConfig.greedy(max_tokens=24)
    with LlamaCppBackend(config) as ref:
        expected = [run_conversation(ref, turns, "generate", cfg) for turns in CONVERSATIONS]
    with LlamaCppBackend(config) as shared:
        start = threading.Barrier(len(CONVERSATIONS))

        def worker(i: int, rounds: int = 2) -> list[list[tuple[str, str, tuple[int, ...] | None]]]:
            start.wait()
            return [run_conversation(shared, CONVERSATIONS[i], METHODS[i], cfg)
                    for _ in range(rounds)]

        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
            futures = [pool.submit(worker, i) for i in range(len(CONVERSATIONS))]
            results = [f.result(timeout=120) for f in futures]
        for i, rounds in enumerate(results):
            for got in rounds:
                assert len(got) == len(expected[i])
                for (text, finish, ids), (etext, efinish, eids) in zip(got, expected[i]):
                    assert (text, finish) == (etext, efinish), f"conversation {i}"
                    if ids is not None:
                        assert ids == eids, f"conversation {i}"
        assert isinstance(shared.last_cached_prefix_len(), int)
        # Still consistent after the storm.
        assert run_conversation(shared, CONVERSATIONS[0], "generate", cfg) == expected[0]


def _counting_rate(action, counter: list[int]) -> float:  # type: ignore[no-untyped-def]
    c0, t0 = counter[0], time.perf_counter()
    action()
    return (counter[0] - c0) / (time.perf_counter() - t0)


def test_gil_is_released_while_generating(gemma_backend: LlamaCppBackend) -> None:
    """A pure-Python thread keeps counting while a generation runs: the
    native loop does not hold the GIL (were it held, the counter would stall
    for the whole call)."""
    b = gemma_backend
    msgs = [ChatMessage.user("Write a short poem about the sea.")]
    cfg = GenerationConfig.greedy(max_tokens=24)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            counter[0] = n

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    outputs = []
    try:
        time.sleep(0.05)
        solo_before = _counting_rate(lambda: time.sleep(0.4), counter)
        during_generate = _counting_rate(lambda: outputs.append(b.generate(msgs, cfg)), counter)
        b.reset_cache()
        during_stream = _counting_rate(lambda: outputs.append(list(b.stream(msgs, cfg))), counter)
        solo_after = _counting_rate(lambda: time.sleep(0.4), counter)
    finally:
        stop.set()
        thread.join()
    assert outputs[0].tokens_generated == 24
    assert outputs[1][-1].cumulative_text == outputs[0].text
    solo = (solo_before + solo_after) / 2
    assert solo > 0
    # Generous (the machine is shared, and the counter shares the cores with
    # the generation); a GIL held through the call would give about 0.
    assert during_generate > 0.25 * solo, (during_generate, solo_before, solo_after)
    assert during_stream > 0.25 * solo, (during_stream, solo_before, solo_after)
