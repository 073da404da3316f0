"""Tests of xybrid.prefix_cache: the LCP rule and the keep/clear plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xybrid.errors import InvalidInputError
from xybrid.prefix_cache import PrefixCacheState, PrefixPlan, reusable_prefix_len

# ---------------------------------------------------------------------------
# reusable_prefix_len
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "new", "expected"),
    [
        # First call: nothing cached.
        ([], [1, 2, 3], 0),
        # Empty new prompt (the caller rejects it first) must not fail.
        ([1, 2, 3], [], 0),
        ([], [], 0),
        # Identical prompts: one token is kept back for the decoder.
        ([10, 20, 30, 40], [10, 20, 30, 40], 3),
        # Shared history, diverging at the new turn.
        ([1, 2, 3, 4, 99, 99], [1, 2, 3, 4, 50, 60, 70], 4),
        # Nothing in common.
        ([1, 2, 3], [9, 8, 7], 0),
        # Cache longer than the new prompt and containing it: still len - 1.
        ([1, 2, 3, 4, 5, 6], [1, 2, 3], 2),
        # One-token prompt: always re-decoded.
        ([1, 2, 3], [1], 0),
        # New prompt extends the cache: the whole cache is reusable.
        ([1, 2, 3], [1, 2, 3, 4, 5], 3),
        # Divergence at the first token despite later agreement.
        ([0, 2, 3], [1, 2, 3], 0),
    ],
)
def test_reusable_prefix_len(cached: list[int], new: list[int], expected: int) -> None:
    assert reusable_prefix_len(cached, new) == expected
    assert reusable_prefix_len(tuple(cached), tuple(new)) == expected


def test_reusable_prefix_len_on_numpy_arrays() -> None:
    cached = np.array([7, 8, 9, 10], dtype=np.int32)
    new = np.array([7, 8, 9, 11, 12], dtype=np.int32)
    assert reusable_prefix_len(cached, new) == 3  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# PrefixCacheState.plan
# ---------------------------------------------------------------------------


def state_with(tokens: list[int], hit: int | None = 0) -> PrefixCacheState:
    return PrefixCacheState(cached_tokens=list(tokens), last_prefix_hit=hit)


def test_fresh_state() -> None:
    state = PrefixCacheState()
    assert state.cached_tokens == []
    assert state.last_prefix_hit is None


def test_first_call_full_clear() -> None:
    plan = PrefixCacheState().plan([1, 2, 3], max_new_tokens=8, n_ctx=64, recurrent=False)
    assert plan == PrefixPlan(keep=0, tail=[1, 2, 3], full_clear=True)


def test_shared_prefix_is_kept() -> None:
    state = state_with([1, 2, 3, 4, 99, 99])
    plan = state.plan([1, 2, 3, 4, 50, 60], max_new_tokens=8, n_ctx=64, recurrent=False)
    assert plan == PrefixPlan(keep=4, tail=[50, 60], full_clear=False)


def test_identical_prompt_redecodes_last_token() -> None:
    state = state_with([5, 6, 7])
    plan = state.plan([5, 6, 7], max_new_tokens=4, n_ctx=64, recurrent=False)
    assert plan == PrefixPlan(keep=2, tail=[7], full_clear=False)


def test_divergent_prompt_full_clear() -> None:
    state = state_with([1, 2, 3])
    plan = state.plan([9, 2, 3], max_new_tokens=4, n_ctx=64, recurrent=False)
    assert plan == PrefixPlan(keep=0, tail=[9, 2, 3], full_clear=True)


@pytest.mark.parametrize("cached", [[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]])
def test_recurrent_models_always_full_clear(cached: list[int]) -> None:
    state = state_with(cached)
    plan = state.plan([1, 2, 3, 4, 5], max_new_tokens=2, n_ctx=1024, recurrent=True)
    assert plan == PrefixPlan(keep=0, tail=[1, 2, 3, 4, 5], full_clear=True)


@pytest.mark.parametrize(
    ("max_new_tokens", "n_ctx", "full_clear"),
    [
        (4, 11, False),  # 6 + 4 = 10 < 11: fits
        (5, 11, True),  # 6 + 5 = 11 >= 11: would overflow
        (9, 11, True),
        (3, 11, False),  # 6 + 3 = 9 < 11
        (0, 7, False),  # 6 + 0 = 6 < 7
        (1, 7, True),  # 6 + 1 = 7 >= 7
    ],
)
def test_overflow_forces_full_clear(max_new_tokens: int, n_ctx: int, full_clear: bool) -> None:
    state = state_with([1, 2, 3, 4, 0])
    new = [1, 2, 3, 4, 5, 6]
    plan = state.plan(new, max_new_tokens=max_new_tokens, n_ctx=n_ctx, recurrent=False)
    assert plan.full_clear is full_clear
    if full_clear:
        assert plan == PrefixPlan(keep=0, tail=new, full_clear=True)
    else:
        assert plan == PrefixPlan(keep=4, tail=[5, 6], full_clear=False)


def test_plan_does_not_mutate_state() -> None:
    state = state_with([1, 2, 3, 4], hit=2)
    before = dataclasses.replace(state, cached_tokens=list(state.cached_tokens))
    new = [1, 2, 3, 9]
    plan = state.plan(new, max_new_tokens=4, n_ctx=64, recurrent=False)
    plan.tail.append(123)  # the plan owns its list
    assert state == before
    assert new == [1, 2, 3, 9]
    state.plan([7], max_new_tokens=4, n_ctx=64, recurrent=True)
    assert state == before


@pytest.mark.parametrize(
    ("new", "max_new_tokens", "n_ctx"),
    [([], 4, 64), ([1], -1, 64), ([1], 4, 0)],
)
def test_plan_rejects_bad_arguments(new: list[int], max_new_tokens: int, n_ctx: int) -> None:
    with pytest.raises(InvalidInputError):
        PrefixCacheState().plan(new, max_new_tokens=max_new_tokens, n_ctx=n_ctx, recurrent=False)


# ---------------------------------------------------------------------------
# commit / reset
# ---------------------------------------------------------------------------


def test_commit_then_next_turn_reuses_history() -> None:
    state = PrefixCacheState()
    prompt1 = [1, 2, 3]
    plan1 = state.plan(prompt1, max_new_tokens=4, n_ctx=64, recurrent=False)
    generated = [40, 41]
    state.commit(prompt1 + generated, plan1.keep)
    assert state.cached_tokens == [1, 2, 3, 40, 41]
    assert state.last_prefix_hit == 0

    prompt2 = [1, 2, 3, 40, 41, 7, 8]
    plan2 = state.plan(prompt2, max_new_tokens=4, n_ctx=64, recurrent=False)
    assert plan2 == PrefixPlan(keep=5, tail=[7, 8], full_clear=False)
    state.commit(prompt2, plan2.keep)
    assert state.last_prefix_hit == 5


def test_commit_copies_tokens() -> None:
    state = PrefixCacheState()
    tokens = [1, 2]
    state.commit(tokens, 0)
    tokens.append(3)
    assert state.cached_tokens == [1, 2]


@pytest.mark.parametrize("hit", [-1, 3])
def test_commit_rejects_impossible_hit(hit: int) -> None:
    with pytest.raises(InvalidInputError):
        PrefixCacheState().commit([1, 2], hit)


def test_reset_forgets_everything() -> None:
    state = state_with([1, 2, 3], hit=2)
    state.reset()
    assert state.cached_tokens == []
    assert state.last_prefix_hit is None
    plan = state.plan([1, 2, 3], max_new_tokens=1, n_ctx=64, recurrent=False)
    assert plan.full_clear


@pytest.mark.parametrize(("lcp_tokens", "align", "keep"), [
    (70, 32, 64),
    (64, 32, 64),
    (31, 32, 0),
    (70, 1, 70),
    (70, 8, 64),
])
def test_plan_aligns_the_kept_prefix(lcp_tokens: int, align: int, keep: int) -> None:
    state = PrefixCacheState()
    state.commit(list(range(100)), 0)
    new = list(range(lcp_tokens)) + [1000, 1001, 1002]
    plan = state.plan(new, 10, 4096, False, align=align)
    assert plan.keep == keep
    assert plan.full_clear == (keep == 0)
    assert plan.tail == new[keep:] or plan.full_clear


def test_plan_rejects_bad_alignment() -> None:
    with pytest.raises(InvalidInputError):
        PrefixCacheState().plan([1, 2], 1, 100, False, align=0)
