"""What every Python contestant's worker process shares.

A worker is started by the harness as ``python <worker>.py SPEC.json``, with
the contestant's own interpreter (xybrid's ``.venv`` or the llama-cpp-python
venv). It loads the model of one workload, warms up, prints a "ready" line,
then answers the harness's commands (one JSON line in, one out; see
:func:`serve`), so that the harness can alternate contestants run by run.
This module has no dependency beyond the standard library, so it works in
both environments.
"""

from __future__ import annotations

import json
import os
import resource
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
    # The engine's own timestamps of the first and last sampled token, where
    # the contestant has them: the pace of the loop itself, whatever the
    # consumer does.
    t_loop_first_ns: int = 0
    t_loop_last_ns: int = 0
    # What the OS gave the loop's thread over the run (-1: unknown): CPU
    # time, voluntary switches (it waited) and involuntary ones (preempted),
    # and the loop's own wall time (prefill included) they compare with.
    loop_wall_ns: int = -1
    loop_cpu_ns: int = -1
    loop_waits: int = -1
    loop_preemptions: int = -1


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


def serve(spec: dict[str, Any], contestant: str, make_variant: Callable[[str, dict[str, Any]], Any],
          variant_names: list[str], rss_at_start: int) -> None:
    """Load, warm up, say ready, then obey one JSON command per stdin line.

    ``make_variant(name, spec)`` returns an object with
    ``generate(tokens, n_predict) -> Run``, ``turn1(prefix)`` and
    ``turn2(tokens, prefix_len, reuse) -> int`` (TTFT in ns); the first
    variant created loads the model, the others share it.

    Commands (the harness sends them, alternating the contestants):
    ``{"op": "generate", "variant": V, "busy": bool}`` -> a Run;
    ``{"op": "turn1"}`` -> {}; ``{"op": "turn2", "variant": V, "reuse": bool}``
    -> {"ttft_ns": n}; ``{"op": "exit"}`` -> {"maxrss_kb": n}.
    """
    tokens: list[int] = spec["prompt_tokens"]
    n_predict: int = spec["n_predict"]
    rss_before_load = rss_kb()
    t0 = now_ns()
    variants = {name: make_variant(name, spec) for name in variant_names}
    t_load = now_ns() - t0
    warmup = spec.get("warmup", 0)
    if warmup:
        for v in variants.values():
            v.generate(tokens[:64], warmup)
    emit({"ready": True, "contestant": contestant, "t_load_ns": t_load, "rss_start_kb": rss_at_start,
          "rss_before_load_kb": rss_before_load, **getattr(variants[variant_names[0]], "facts", {})})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            v = variants[cmd["variant"]]
            if cmd.get("busy"):
                with BusyThread():
                    run = v.generate(tokens, n_predict)
            else:
                run = v.generate(tokens, n_predict)
            emit(asdict(run))
        elif op == "turn1":
            variants[variant_names[0]].turn1(tokens[: spec["prefix_len"]])
            emit({})
        elif op == "turn2":
            emit({"ttft_ns": variants[cmd["variant"]].turn2(tokens, spec["prefix_len"], cmd["reuse"])})
        elif op == "exit":
            emit({"maxrss_kb": maxrss_kb()})
            return
        else:
            emit({"error": f"unknown op {op!r}"})


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
