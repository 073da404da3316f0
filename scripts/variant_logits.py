"""Compare the logits of two CPU variants of the engine along one fixed text.

Greedy text is not a fair test between variants: their kernels sum in different
orders, so a near tie between two tokens may fall either way and the texts part
(under an emulated Haswell, Gemma 3 270M says "red, blue and yellow" where this
CPU's variant says "red, yellow and blue"). This script compares what both
compute instead, position by position along the same tokens:

    python variant_logits.py --out ref.json        # on this CPU: the reference
    python variant_logits.py --compare ref.json    # under emulation: the check

The reference run decodes the prompt, then 8 greedy tokens, and keeps the top
10 log-probabilities of each step. The check feeds the same tokens and fails
(exit 1, with the step and token) if a reference token's log-probability moves
by more than ``--tolerance`` or its top token is not one the reference ranked
first within that tolerance. The default, 1 nat, is loose on purpose: the
x64, sse42, haswell and icelake variants differ by up to about 0.4 nats on
Gemma 3 270M's ten likeliest tokens, while a broken kernel moves them by many.
Run it with the python of an environment that has xybrid installed, outside
the source tree.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from dataclasses import dataclass, field

PROMPT = "The three primary colours are"
STEPS = 8
TOP = 10


def log_softmax(logits: list[float]) -> list[float]:
    peak = max(logits)
    log_norm = peak + math.log(sum(math.exp(x - peak) for x in logits))
    return [x - log_norm for x in logits]


def likeliest(logprobs: list[float], top: int) -> list[tuple[int, float]]:
    return [(t, logprobs[t]) for t in heapq.nlargest(top, range(len(logprobs)), key=logprobs.__getitem__)]


@dataclass
class Run:
    variant: str
    tokens: list[int] = field(default_factory=list)  # fed after the prompt
    tops: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, likeliest first
    every: list[list[float]] = field(default_factory=list)  # per step, by token id


def run(tokens_after_prompt: list[int] | None) -> Run:
    from xybrid import default_model_path
    from xybrid._native import _engine as e

    e.set_log_level("error")
    model = e.Model(str(default_model_path()))
    ctx = e.Context(model, n_ctx=256, n_threads=2, n_threads_batch=2)
    prompt = model.tokenize(PROMPT, add_special=True)
    ctx.decode(prompt)
    pos = len(prompt)
    out = Run(variant=e.cpu_backend()["variant"] or "built-in")
    for k in range(STEPS):
        every = log_softmax(ctx.logits())
        top = likeliest(every, TOP)
        out.tops.append(top)
        out.every.append(every)
        token = top[0][0] if tokens_after_prompt is None else tokens_after_prompt[k]
        out.tokens.append(token)
        ctx.decode([token], pos0=pos)
        pos += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the reference here (JSON)")
    mode.add_argument("--compare", help="check against this reference")
    p.add_argument("--tolerance", type=float, default=1.0, help="largest change of a log-probability, in nats")
    opts = p.parse_args()

    if opts.out:
        got = run(None)
        with open(opts.out, "w") as f:
            json.dump({"variant": got.variant, "tokens": got.tokens, "steps": got.tops}, f)
        print(f"reference: variant {got.variant}, tokens {got.tokens}")
        return 0

    with open(opts.compare) as f:
        ref = json.load(f)
    got = run(ref["tokens"])
    worst = 0.0
    for k, ref_top in enumerate(ref["steps"]):
        every = got.every[k]
        for token, ref_lp in ref_top:
            diff = abs(every[token] - ref_lp)
            worst = max(worst, diff)
            if diff > opts.tolerance:
                print(f"variant {got.variant} against {ref['variant']}: step {k}, token {token}: "
                      f"log-probability {every[token]:.4f}, reference {ref_lp:.4f}", file=sys.stderr)
                return 1
        first = got.tops[k][0][0]
        near_first = {t for t, lp in ref_top if lp >= ref_top[0][1] - opts.tolerance}
        if first not in near_first:
            print(f"variant {got.variant} against {ref['variant']}: step {k}: top token {first}, "
                  f"the reference's is {ref_top[0][0]}", file=sys.stderr)
            return 1
    print(f"variant {got.variant} matches {ref['variant']} over {len(ref['steps'])} steps "
          f"(largest log-probability change {worst:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
