"""``python -m bench.wheel_vs_native``: the portable wheel against the native build.

The same workloads, workers and method as ``python -m bench`` (bench/harness.py):
compute-bound decode (Gemma 3 270M, greedy and sampled), overhead-bound decode
(the tiny model) and prefill, each run by the engine (``Context.generate``) of
two installations, alternated run by run in fresh processes:

- ``native``: the interpreter running this script (``.venv``: the source build,
  ``-Dnative=true``, llama.cpp tuned for this CPU);
- ``wheel``: ``--wheel-python``, an environment holding the repaired portable
  wheel (``make wheel`` leaves one in build/wheel-chain/smoke), which picked
  one of its CPU variants at run time.

It prints one line per workload with the median rate of each and their ratio
(wheel / native), and the variant the wheel picked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness, report

WORKER = harness.WORKERS / "xybrid_worker.py"


def build_facts(python: str) -> dict[str, Any]:
    code = ("import json; from xybrid import _build_info as b; from xybrid._native import _engine as e\n"
            "print(json.dumps({'native': b.NATIVE, 'backend_dl': b.BACKEND_DL, "
            "'cpu': e.cpu_backend()['variant'], 'library': e.cpu_backend()['library']}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return dict(json.loads(out.stdout))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wheel_vs_native", description=__doc__.splitlines()[0])
    p.add_argument("--wheel-python", required=True, type=os.path.abspath, help="python of an environment with the portable wheel")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="compute,overhead,prefill")
    p.add_argument("--quiet-wait", type=float, default=30)
    p.add_argument("--out", type=Path, default=None, help="write the raw figures here as JSON")
    opts = p.parse_args(argv)
    args = harness.parse_args(["--workloads", opts.workloads, "--threads", str(opts.threads),
                               "--rounds", str(opts.rounds), "--no-peer"])

    facts = {"native": build_facts(sys.executable), "wheel": build_facts(opts.wheel_python)}
    print(f"[wheel-vs-native] native: {facts['native']}")
    print(f"[wheel-vs-native] wheel:  {facts['wheel']}")
    # Not the key "native": the harness reserves it for the C loop.
    contestants = [harness.Contestant("source", ["engine"], python=sys.executable, worker=WORKER),
                   harness.Contestant("wheel", ["engine"], python=opts.wheel_python, worker=WORKER)]
    rates: dict[str, dict[str, list[float]]] = {}
    busy_seen: list[float] = []
    with tempfile.TemporaryDirectory(prefix="xybrid-wheel-bench-") as tmpname:
        tmp = Path(tmpname)
        prep = harness.run_prep(sys.executable, args, tmp)
        n_long = len(prep["tokens"]["tiny"]["long"])
        cases = harness.make_cases(args, n_long)
        for rnd in range(1 + opts.rounds):  # round 0 warms up and is discarded
            for case in cases:
                busy = harness.wait_for_quiet(opts.quiet_wait)
                t0 = time.monotonic()
                # Alternate which installation goes first from round to round.
                order = contestants if rnd % 2 else contestants[::-1]
                results = harness.run_case(case, order, prep, args, tmp)
                line = []
                for c in contestants:
                    res = results.get(c.key, {})
                    if "error" in res:
                        raise SystemExit(f"{c.key} failed on {case.name}: {res['error']}")
                    n_prompt = len(prep["tokens"][case.model][case.prompt])
                    f = report.figures(case.kind, res["variants"]["engine"], res, n_prompt)
                    line.append(f"{'native' if c.key == 'source' else c.key} {f['tps']:.1f} tok/s")
                    if rnd > 0:
                        rates.setdefault(case.name, {}).setdefault(c.key, []).append(f["tps"])
                if rnd > 0:
                    busy_seen.append(busy)
                label = "warm-up" if rnd == 0 else f"round {rnd}/{opts.rounds}"
                print(f"[wheel-vs-native] {label:>10} {case.name:<16} {time.monotonic() - t0:5.1f} s "
                      f"(others' CPU before: {busy:.0%}): {', '.join(line)}", flush=True)

    print()
    print(f"wheel CPU variant: {facts['wheel']['cpu']}; threads: {opts.threads}; "
          f"others' CPU use before each workload: median {statistics.median(busy_seen):.0%}, "
          f"max {max(busy_seen):.0%}")
    print(f"{'workload':<16} {'native tok/s':>13} {'wheel tok/s':>12} {'wheel/native':>13}")
    summary = {}
    for name, by in rates.items():
        nat, whl = statistics.median(by["source"]), statistics.median(by["wheel"])
        # Per-round ratios: both ran back to back, under the same load.
        ratios = [w / n for w, n in zip(by["wheel"], by["source"])]
        summary[name] = {"native": by["source"], "wheel": by["wheel"], "ratio_median": statistics.median(ratios)}
        print(f"{name:<16} {nat:13.1f} {whl:12.1f} {statistics.median(ratios):13.3f}")
    if opts.out:
        opts.out.write_text(json.dumps({"facts": facts, "rounds": opts.rounds, "threads": opts.threads,
                                        "busy_before": busy_seen, "workloads": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
