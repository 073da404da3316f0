"""Multi-turn KV-cache reuse: decide how much of the previous prompt to keep.

In a chat every turn re-sends the whole conversation, so the new prompt usually
starts with the tokens already sitting in the KV cache. Keeping that shared
prefix and decoding only the rest turns a full re-prefill into a short one.
This module holds the bookkeeping and the decision; the engine does the actual
cache surgery (``llama_memory_seq_rm`` / clear) as told by a :class:`PrefixPlan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from xybrid.errors import InvalidInputError

__all__ = ["reusable_prefix_len", "PrefixPlan", "PrefixCacheState"]


def reusable_prefix_len(cached: Sequence[int], new: Sequence[int]) -> int:
    """Length of the common prefix of ``cached`` and ``new`` that may be kept.

    Capped at ``len(new) - 1``: the decoder needs at least one fresh token to
    produce the logits the first sample is drawn from, so even an identical
    prompt re-decodes its last token. Empty inputs give 0.
    """
    limit = len(new) - 1
    count = 0
    for old_token, new_token in zip(cached, new):
        if count >= limit or old_token != new_token:
            break
        count += 1
    return count


@dataclass(frozen=True)
class PrefixPlan:
    """What the engine must do before decoding a prompt.

    ``full_clear``: empty the sequence's cache and decode all of ``tail``
    (then ``keep`` is 0 and ``tail`` is the whole prompt). Otherwise remove
    cache positions from ``keep`` on and decode ``tail`` starting at position
    ``keep``.
    """

    keep: int
    tail: list[int]
    full_clear: bool


@dataclass
class PrefixCacheState:
    """What one sequence's KV cache holds, across calls.

    ``cached_tokens`` is exactly the token sequence in the cache (empty after a
    load or a clear). ``last_prefix_hit`` is the prefix length the latest
    successful run reused: ``None`` before any run, ``0`` when it had to
    prefill everything. It feeds the ``prompt_cached_tokens`` telemetry.
    """

    cached_tokens: list[int] = field(default_factory=list)
    last_prefix_hit: int | None = None

    def reset(self) -> None:
        """Forget everything; call after clearing the cache or a failed run.

        A run that failed mid-decode leaves the cache in an unknown state, so
        nothing in it may be trusted by the next call.
        """
        self.cached_tokens = []
        self.last_prefix_hit = None

    def plan(
        self,
        new_tokens: Sequence[int],
        max_new_tokens: int,
        n_ctx: int,
        recurrent: bool,
        align: int = 1,
    ) -> PrefixPlan:
        """Decide how to prefill ``new_tokens``; the state is left untouched.

        Rules, in order:

        1. ``recurrent`` (fully recurrent or hybrid models): full clear. Their
           recurrent state cannot be rolled back to a position, so a truncated
           cache would not match the kept prefix.
        2. No reusable prefix: full clear.
        3. ``len(new_tokens) + max_new_tokens >= n_ctx`` (the kept prefix plus
           the tail plus the reply would not fit): full clear, so the context
           check that follows reports the overflow on a clean cache. Evicting
           old turns is out of scope.
        4. Otherwise keep the prefix and decode only the tail.

        ``align`` rounds the kept prefix down to a multiple of itself. llama.cpp's
        CPU kernels process batch rows in groups, so a prompt decoded from a
        position that is not a multiple of the group size gets slightly different
        numbers than the same prompt decoded from scratch; aligning keeps a
        cached run identical to a fresh one.
        """
        if not new_tokens:
            raise InvalidInputError("PrefixCacheState.plan needs a non-empty prompt")
        if max_new_tokens < 0:
            raise InvalidInputError(
                f"PrefixCacheState.plan max_new_tokens must be >= 0, got {max_new_tokens}"
            )
        if n_ctx <= 0:
            raise InvalidInputError(f"PrefixCacheState.plan n_ctx must be positive, got {n_ctx}")
        everything = PrefixPlan(keep=0, tail=list(new_tokens), full_clear=True)
        if recurrent:
            return everything
        if align < 1:
            raise InvalidInputError(f"PrefixCacheState.plan align must be >= 1, got {align}")
        keep = reusable_prefix_len(self.cached_tokens, new_tokens)
        keep -= keep % align
        tail = list(new_tokens[keep:])
        would_overflow = keep + len(tail) + max_new_tokens >= n_ctx
        if keep == 0 or would_overflow:
            return everything
        return PrefixPlan(keep=keep, tail=tail, full_clear=False)

    def commit(self, tokens_now_in_cache: Sequence[int], prefix_hit: int) -> None:
        """Record the cache contents after a successful run.

        ``tokens_now_in_cache`` is the prompt followed by the generated tokens
        that were decoded into the cache; the last sampled token usually was
        not (generation ends before decoding it), so leave it out in that case.
        ``prefix_hit`` is the ``keep`` of the plan that was carried out.
        """
        tokens = list(tokens_now_in_cache)
        if not 0 <= prefix_hit <= len(tokens):
            raise InvalidInputError(
                f"PrefixCacheState.commit prefix_hit must be in [0, {len(tokens)}], "
                f"got {prefix_hit}"
            )
        self.cached_tokens = tokens
        self.last_prefix_hit = prefix_hit
