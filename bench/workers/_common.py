"""What every Python contestant's worker process shares.

A worker is started by the harness as ``python <worker>.py SPEC.json``, with
the contestant's own interpreter (xybrid's ``.venv`` or the llama-cpp-python
venv), does one workload and prints one JSON object on its last stdout line.
This module has no dependency beyond the standard library, so it works in
both environments.

The protocol (spec in, result out) is documented in ``bench/README.md``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: the clock of the C loops too


def rss_kb() -> int:
    """Current resident set size in KiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGESIZE") // 1024)


def maxrss_kb() -> int:
    """Peak resident set size of this process so far, in KiB (getrusage)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@dataclass
class Run:
    """One measured generation, as the caller saw it.

    ``t_first_ns``: when the first token was available (the first chunk for a
    streaming call; the engine's own timestamp for a non-streaming one).
    """

    t_start_ns: int
    t_first_ns: int
    t_end_ns: int
    n_tokens: int
    tokens: list[int] = field(default_factory=list)
    n_chunks: int = 0
    stop_reason: str = ""


class BusyThread:
    """A pure-Python loop in a second thread: it wants the GIL all the time."""

    def __init__(self) -> None:
        self._stop = False
        self.count = 0
        self._thread = threading.Thread(target=self._spin, name="busy-python", daemon=True)

    def _spin(self) -> None:
        n = 0
        while not self._stop:
            n += 1
        self.count = n

    def __enter__(self) -> "BusyThread":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def load_spec() -> dict[str, Any]:
    with open(sys.argv[1]) as fh:
        return json.load(fh)


def run_workload(spec: dict[str, Any], contestant: str, make_variant: Callable[[str, dict[str, Any]], Any],
                 variant_names: list[str], rss_at_start: int) -> dict[str, Any]:
    """Drive one workload over the given variants of a contestant.

    ``make_variant(name, spec)`` returns an object with
    ``generate(tokens, n_predict) -> Run`` and
    ``turn2(tokens, prefix_len, reuse) -> int`` (TTFT in ns); the first
    variant created loads the model, the others share it.
    """
    workload = spec["workload"]
    tokens: list[int] = spec["prompt_tokens"]
    n_predict: int = spec["n_predict"]
    reps: int = spec.get("reps", 1)
    out: dict[str, Any] = {"contestant": contestant, "workload": workload, "variants": {}}
    rss_before_load = rss_kb()
    t0 = now_ns()
    variants = [make_variant(name, spec) for name in variant_names]
    out["t_load_ns"] = now_ns() - t0

    if workload == "multiturn":
        # Turn 1 leaves the shared prefix in the cache; each variant then
        # times turn 2 with that prefix reused, then with the cache cleared.
        # (turn2 with reuse=True must work from a cache that holds the prefix
        # and possibly more: what the previous variant left.)
        prefix_len = spec["prefix_len"]
        variants[0].turn1(tokens[:prefix_len])
        for name, v in zip(variant_names, variants):
            reuse = [v.turn2(tokens, prefix_len, True) for _ in range(reps)]
            cleared = [v.turn2(tokens, prefix_len, False) for _ in range(spec.get("reps_cleared", reps))]
            out["variants"][name] = {"ttft_reuse_ns": reuse, "ttft_cleared_ns": cleared}
    else:
        warmup = spec.get("warmup", 0)
        if warmup:
            for v in variants:
                v.generate(tokens[:64], warmup)
        busy = BusyThread() if spec.get("busy") else None
        if busy:
            busy.__enter__()
        try:
            for name, v in zip(variant_names, variants):
                runs = [v.generate(tokens, n_predict) for _ in range(reps)]
                out["variants"][name] = {"runs": [asdict(r) for r in runs]}
        finally:
            if busy:
                busy.__exit__()
        if busy:
            out["busy_loop_iterations"] = busy.count
    out["rss_start_kb"] = rss_at_start
    out["rss_before_load_kb"] = rss_before_load
    out["maxrss_kb"] = maxrss_kb()
    return out


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))
