"""Fuzz suite: the sizes of our own contexts and batches.

Hypothesis draws ``LlmConfig`` sizes (``context_length``, ``n_batch``,
``n_ubatch``, ``parallel``, ``n_threads``, ``max_queued``), a ``max_tokens``
against that context, a prompt length and a ``generate_batch`` size; the tiny
model is loaded with them and generates, in a child process
(tests/sizes_fuzz_child.py), since llama.cpp asserts abort the process. For
every combination:

- it loads and generates, or raises a typed error (an ``XybridError``);
- an error raised while building the config names the field;
- no crash and no hang (tests/test_fuzz.py's ``Child``);
- after every failure, a backend loaded with the reference sizes returns
  exactly what one loaded at start-up returned.

Size: ``XYBRID_FUZZ_EXAMPLES`` as for tests/test_fuzz.py, but the default
(CI) run draws a quarter of it, since every example loads a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from test_fuzz import EXAMPLES, FUZZ, STATS, Child, _report  # noqa: F401 - autouse: writes this suite's counts

from xybrid import LlmConfig
from xybrid.errors import InvalidInputError

SUITE = "context and batch sizes"
FIELDS = ("context_length", "n_batch", "n_ubatch", "parallel", "n_threads", "max_queued",
          "max_tokens")


@pytest.fixture(scope="module")
def sizes_child(tiny_llama_path: Path) -> Iterator[Child]:
    c = Child(tiny_llama_path, script="sizes_fuzz_child.py")
    yield c
    c.stop()


# Sizes with a bias to the edges llama.cpp treats specially: 1, the KV
# cache's 256-cell padding, LLAMA_MAX_SEQ (256) and past it, and values far
# past any memory (those must fail to allocate, not abort). Contexts that
# would allocate gigabytes and then work are left out: the test machines
# are small.
SMALL = st.one_of(st.integers(1, 16), st.integers(1, 300), st.sampled_from([255, 256, 257, 512]))
HUGE = st.sampled_from([2**20 + 1, 2**30, 2**31 - 1, 2**31, 2**40])
BAD = st.sampled_from([0, -1, True, 1.5, None])
CONTEXT = st.one_of(SMALL, st.integers(1, 65536), HUGE, BAD)
BATCH = st.one_of(SMALL, st.integers(1, 4096), HUGE, BAD)
PARALLEL = st.one_of(st.integers(1, 6), st.sampled_from([16, 64, 255, 256, 257, 1000]), BAD)
THREADS = st.one_of(st.integers(0, 3), st.sampled_from([64, 512, 513]), BAD)
QUEUED = st.one_of(st.integers(0, 4), st.sampled_from([2**31 - 1]), BAD)
MAX_TOKENS = st.one_of(st.integers(0, 40), st.integers(0, 5000), st.sampled_from([2**31 - 1, 2**31]),
                       BAD)


@st.composite
def size_requests(draw: st.DrawFn) -> dict[str, Any]:
    llm = {name: draw(strategy) for name, strategy in (
        ("context_length", CONTEXT), ("n_batch", BATCH), ("n_ubatch", BATCH),
        ("parallel", PARALLEL), ("n_threads", THREADS), ("max_queued", QUEUED))
        if draw(st.integers(0, 4)) > 0}  # each field left at its default a fifth of the time
    max_tokens = draw(MAX_TOKENS)
    ctx = llm.get("context_length", 4096)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 40:
        # Past a small context the generation runs to the full context (the
        # case to try); otherwise keep each run short.
        small = isinstance(ctx, int) and not isinstance(ctx, bool) and 0 < ctx <= 300
        max_tokens = max_tokens if small else 40
    batch = draw(st.one_of(st.none(), st.integers(0, 6)))
    return {"llm": llm, "gen": {"temperature": 0.0, "max_tokens": max_tokens},
            "prompt_words": draw(st.one_of(st.integers(0, 8), st.integers(0, 400))),
            "batch": batch}


def _run(child: Child, request: dict[str, Any]) -> None:
    reply = child.request(SUITE, request)
    if reply["outcome"] == "xybrid" and reply["stage"] == "config":
        assert any(field in reply["error"] for field in FIELDS), (
            f"a config error that names no field: {reply['error']} for {request}")


# The combinations that once aborted inside llama.cpp or were refused only
# after the model was loaded, kept as regressions.
REGRESSIONS = [
    # More sequences than the context has cells: llama.cpp cuts n_batch to
    # the context, so the scheduler's batch had no row for every sequence.
    {"llm": {"context_length": 4, "n_batch": 64, "parallel": 6}, "gen": {"max_tokens": 4},
     "prompt_words": 0, "batch": 6},
    {"llm": {"n_batch": 2, "parallel": 3}, "gen": {"max_tokens": 4}, "prompt_words": 0, "batch": 3},
    # LLAMA_MAX_SEQ sequences, and one past it.
    {"llm": {"parallel": 256}, "gen": {"max_tokens": 2}, "prompt_words": 0, "batch": 2},
    {"llm": {"parallel": 257}, "gen": {"max_tokens": 2}, "prompt_words": 0, "batch": 2},
    # A context far past any memory: llama.cpp touched 8 GiB of per-cell
    # bookkeeping before failing (now refused by LlmConfig), and the largest C sizes.
    {"llm": {"context_length": 2**31 - 1}, "gen": {"max_tokens": 2}, "prompt_words": 0, "batch": None},
    {"llm": {"context_length": 2**20, "n_batch": 2**20, "n_ubatch": 2**20}, "gen": {"max_tokens": 2},
     "prompt_words": 0, "batch": None},
    # 512 compute threads on a small machine: minutes per prompt (now capped
    # at the CPUs the process may use).
    {"llm": {"n_threads": 512}, "gen": {"max_tokens": 8}, "prompt_words": 100, "batch": None},
    # A queue of 2**31 - 1 waiting requests: its C size overflowed and the
    # allocation failed with a bare MemoryError (now refused by LlmConfig).
    {"llm": {"parallel": 2, "max_queued": 2**31 - 1}, "gen": {"max_tokens": 1}, "prompt_words": 0,
     "batch": None},
    {"llm": {"context_length": 1, "n_batch": 1, "n_ubatch": 1}, "gen": {"max_tokens": 2**31 - 1},
     "prompt_words": 0, "batch": None},
    {"llm": {"n_batch": 2**31 - 1, "n_ubatch": 2**31 - 1}, "gen": {"max_tokens": 2},
     "prompt_words": 0, "batch": None},
    # A prompt longer than the context, alone and in a batch.
    {"llm": {"context_length": 8, "n_batch": 8, "parallel": 2}, "gen": {"max_tokens": 4},
     "prompt_words": 40, "batch": 2},
]


@pytest.mark.parametrize("request_", REGRESSIONS)
def test_size_regressions(sizes_child: Child, request_: dict[str, Any]) -> None:
    _run(sizes_child, {**request_, "gen": {"temperature": 0.0, **request_["gen"]}})


# No shrinking: each example loads a model, and shrinking one failure took
# Hypothesis over five minutes; the failing input is printed as drawn.
# Each example loads the model: the CI-sized run draws a quarter of
# XYBRID_FUZZ_EXAMPLES (a longer run, all of them).
@settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          max_examples=EXAMPLES if EXAMPLES > 40 else max(EXAMPLES // 4, 1))
@given(size_requests())
@example({"llm": {"context_length": 16, "n_batch": 16, "n_ubatch": 1, "parallel": 4},
          "gen": {"temperature": 0.0, "max_tokens": 5000}, "prompt_words": 0, "batch": 4})
def test_fuzz_context_and_batch_sizes(sizes_child: Child, req: dict[str, Any]) -> None:
    _run(sizes_child, req)


@pytest.mark.parametrize(("sizes", "rows"), [
    ({"parallel": 3, "n_batch": 2}, 2),
    ({"parallel": 5, "context_length": 4}, 4),
    ({"parallel": 9, "context_length": 8, "n_batch": 16}, 8),
])
def test_parallel_is_bounded_by_the_batch_rows_in_the_config(sizes: dict[str, int], rows: int) -> None:
    with pytest.raises(InvalidInputError, match=rf"LlmConfig\.parallel .* \({rows}\)"):
        LlmConfig("model.gguf", **sizes)
    LlmConfig("model.gguf", **{**sizes, "parallel": rows})  # at the bound: accepted
