"""One check shared by the tests whose greedy tokens may legitimately move:
where two runs of the same prompts part, the two tokens must have been
nearly tied, measured on a plain single-sequence decode of the common part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xybrid._native import _engine


def assert_diverges_only_at_near_ties(model: Any, prompts: Sequence[str],
                                      want: Sequence[Sequence[int]],
                                      got: Sequence[Sequence[int]], *,
                                      max_gap: float = 0.5, n_ctx: int = 1024) -> None:
    ctx = _engine.Context(model, n_ctx=n_ctx, n_batch=512, n_threads=2)
    try:
        for p, w, g in zip(prompts, want, got):
            if list(w) == list(g):
                continue
            k = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
            # Past the end of a reply, its "token" was the end of generation.
            a = w[k] if k < len(w) else model.eos_token
            b = g[k] if k < len(g) else model.eos_token
            ctx.memory_clear()
            ctx.decode(model.tokenize(p, add_special=True, parse_special=False) + list(w[:k]))
            logits = ctx.logits()
            gap = abs(logits[a] - logits[b])
            assert gap < max_gap, f"{p!r}: diverged at token {k} with a logit gap of {gap:.3f}"
    finally:
        ctx.close()
