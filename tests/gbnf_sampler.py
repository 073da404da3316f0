"""Test utility: draw random sentences of a GBNF grammar, without a model.

Built on :class:`gbnf_matcher.GbnfMatcher`'s productions. A random walk picks
alternatives at random until the sentence reaches a length budget, then
finishes along the cheapest derivation of every pending rule (computed once;
the cheapest alternative is recorded only when it strictly improves, so
following it always terminates). Characters are drawn from each class's
ranges, edge code points often; a negated class draws from a pool of
awkward code points (quotes, controls, a lone surrogate, the last code
point) so a class that lets one of those through is found.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gbnf_matcher import GbnfMatcher, _CharSet

_POOL: tuple[int, ...] = (
    *range(0x20, 0x7F), 0x00, 0x09, 0x0A, 0x1F, 0x7F, 0xA0, 0xE9, 0x2028, 0xD7FF,
    0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0xFFFD, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF,
)


class GbnfSampler:
    def __init__(self, grammar: str, root: str = "root") -> None:
        matcher = GbnfMatcher(grammar, root)
        self.root = root
        self.alts: dict[str, list[tuple[object, ...]]] = {}
        for lhs, rhs in matcher.prods:
            self.alts.setdefault(lhs, []).append(rhs)
        inf = float("inf")
        cost: dict[str, float] = {name: inf for name in self.alts}
        self.cheapest: dict[str, tuple[object, ...]] = {}
        changed = True
        while changed:
            changed = False
            for name, options in self.alts.items():
                for rhs in options:
                    c = sum(cost[s] if isinstance(s, str) else 1 for s in rhs)
                    if c < cost[name]:
                        cost[name] = c
                        self.cheapest[name] = rhs
                        changed = True
        if root not in self.cheapest:
            raise ValueError("the grammar derives no finite sentence")
        for name, options in self.alts.items():  # drop alternatives that never finish
            self.alts[name] = [
                rhs for rhs in options
                if all(not isinstance(s, str) or cost[s] < inf for s in rhs)
            ]

    def char(self, rng: random.Random, terminal: _CharSet) -> int:
        if terminal.negated or not terminal.ranges:
            choices = [c for c in _POOL if terminal(c)]
            if not choices:
                raise ValueError("a negated class with nothing in the pool")
            return rng.choice(choices)
        lo, hi = rng.choice(terminal.ranges)
        roll = rng.random()
        if roll < 0.2:
            return lo
        if roll < 0.4:
            return hi
        return rng.randint(lo, hi)

    def sample(self, rng: random.Random, budget: int = 120) -> str:
        out: list[str] = []
        stack: list[object] = [self.root]
        steps = 0
        while stack:
            sym = stack.pop()
            if isinstance(sym, str):
                steps += 1
                if len(out) < budget and steps < 20 * budget:
                    rhs: Sequence[object] = rng.choice(self.alts[sym])
                else:
                    rhs = self.cheapest[sym]
                stack.extend(reversed(rhs))
            else:
                assert isinstance(sym, _CharSet)
                out.append(chr(self.char(rng, sym)))
        return "".join(out)
