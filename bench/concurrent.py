"""``python -m bench.concurrent``: N requests at once on one model.

Contestants, alternated within each round:

- ``xybrid batched``: ``LlamaCppBackend(parallel=N)``, the N requests
  through ``generate_batch`` (no Python consumer in the loop);
- ``xybrid asyncio``: the same N requests as ``astream`` consumers on one
  asyncio thread (at N = 16 only, for the consumer-cost target);
- ``xybrid serialised``: today's single-sequence backend with N threads
  calling ``generate`` at once (the lock runs them one after another);
- ``llama-batched-bench``: llama.cpp's own batched benchmark, built by this
  script from the pinned source with the same CPU flags, OpenMP off as in
  xybrid's build, the same thread count and flash attention off: the C ceiling.

Every request decodes ``--n-predict`` tokens (EOG ignored for llama.cpp: the
prompts are chosen so that greedy Gemma and the tiny model do not end early;
a contestant that ends early is reported). The aggregate decode rate is
measured as llama-batched-bench measures it: tokens generated while all N
sequences are generating, over that time (prefill excluded); the end-to-end
rate (prefill included) is reported beside it. A separate "admission" probe
admits a 1,500-token prompt beside 7 running streams and compares their
inter-token latency p95 with and without it.

Results go to ``bench/results/concurrent/`` (Markdown, JSON, PNG chart).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.report import write_dated

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
RESULTS = BENCH_DIR / "results" / "concurrent"

PROMPT = ("The history of the lighthouse keepers on the northern coast is a long one. "
          "In the winter of 1892, the keeper of the old stone tower wrote in his diary that")


# --- llama-batched-bench ----------------------------------------------------------------


def build_batched_bench(llama_cpp_dir: Path, jobs: int) -> Path:
    """Build llama.cpp's batched-bench tool once (cached) from the pinned source,
    with the CMake flags xybrid's own build uses."""
    sys.path.insert(0, str(REPO / "scripts"))
    from build_llama_cpp import cmake_args  # the flags xybrid's libraries are built with

    build = CACHE / "llama-tools"
    binary = build / "bin" / "llama-batched-bench"
    if binary.is_file():
        return binary
    args = [a for a in cmake_args(llama_cpp_dir, True, False, "Release")
            if not a.startswith(("-DLLAMA_BUILD_COMMON", "-DLLAMA_BUILD_TOOLS"))]
    args += ["-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(llama_cpp_dir), "-B", str(build), *gen, *args], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--parallel", str(jobs), "--target",
                    "llama-batched-bench"], check=True, stdout=subprocess.DEVNULL)
    return binary


def run_batched_bench(binary: Path, model: Path, n: int, n_prompt: int, n_predict: int,
                      threads: int, n_ctx: int, unified: bool = True) -> dict[str, float]:
    """``unified``: one KV buffer shared by all sequences (``-kvu``), the layout
    xybrid's scheduler uses; without it llama.cpp gives each sequence its own
    stream of n_ctx / N cells (its default here)."""
    cmd = [str(binary), "-m", str(model), "-c", str(n_ctx), "-b", "512", "-ub", "512",
           "-npp", str(n_prompt), "-ntg", str(n_predict), "-npl", str(n), "-t", str(threads),
           "-tb", str(threads), "-fa", "off", "-kvu" if unified else "-no-kvu"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2] == str(n) and re.fullmatch(r"\d+", cells[0]):
            return {"decode_tps": float(cells[7]), "prefill_s": float(cells[4]),
                    "total_s": float(cells[8]), "e2e_tps": n * n_predict / float(cells[8])}
    raise RuntimeError(f"could not read llama-batched-bench's table:\n{out[-2000:]}")


# --- llama-cpp-python ---------------------------------------------------------------------

_PEER_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(spec["model"], n_ctx=spec["n_ctx"], n_batch=512, n_ubatch=512,
            n_threads=spec["threads"], n_threads_batch=spec["threads"], flash_attn=False,
            n_gpu_layers=0, verbose=False)
llm.create_completion(spec["prompts"][0][:4], max_tokens=2, temperature=0)
# Llama is not thread-safe: like its server, requests run one after another.
t0 = time.monotonic_ns()
total = 0
for p in spec["prompts"]:
    llm.reset()
    out = llm.create_completion(p, max_tokens=spec["n_predict"], temperature=0, top_k=1)
    total += out["usage"]["completion_tokens"]
t1 = time.monotonic_ns()
print(json.dumps({"e2e_tps": total / ((t1 - t0) / 1e9), "tokens": total}))
"""


def run_peer(python: Path, model: Path, prompts: list[list[int]], n_predict: int, threads: int,
             n_ctx: int) -> dict[str, float]:
    spec = {"model": str(model), "prompts": prompts, "n_predict": n_predict, "threads": threads,
            "n_ctx": n_ctx}
    out = subprocess.run([str(python), "-c", _PEER_SCRIPT, json.dumps(spec)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- xybrid -----------------------------------------------------------------------------


def _decode_window(outputs: list[Any]) -> dict[str, float]:
    """Aggregate decode rate over the window in which every sequence was
    generating, as llama-batched-bench's S_TG; plus latency figures."""
    res = outputs
    start = max(r.t_prefill_end_ns for r in res)
    end = min(r.t_end_ns for r in res)
    tokens = sum(sum(1 for t in r.token_ns if start < t <= end) for r in res)
    first = min(r.t_submit_ns for r in res)
    last = max(r.t_end_ns for r in res)
    total = sum(len(r.tokens) for r in res)
    ttft = sorted((r.token_ns[0] - r.t_submit_ns) / 1e6 for r in res if r.token_ns)
    itl = sorted(
        (b - a) / 1e6 for r in res for a, b in zip(r.token_ns, r.token_ns[1:]))
    return {
        "decode_tps": tokens / ((end - start) / 1e9) if end > start else float("nan"),
        "e2e_tps": total / ((last - first) / 1e9),
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p95_ms": _pct(ttft, 95),
        "itl_p95_ms": _pct(itl, 95), "tokens": total,
        "short": sum(1 for r in res if len(r.tokens) < len(res[0].tokens)),
    }


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def xybrid_batched(model: Path, prompts: list[list[int]], n_predict: int, threads: int,
                   n_ctx: int) -> dict[str, float]:
    """The N requests straight onto a Scheduler (greedy), as llama-batched-bench
    drives llama.cpp directly; the engine results keep per-token timestamps.
    (A Scheduler with one slot at N = 1: LlmConfig(parallel=1) would take the
    single-sequence path instead.)"""
    from xybrid._native import _engine

    m = _engine.Model(str(model))
    ctx = _engine.Context(m, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_seq_max=len(prompts),
                          swa_full=False)  # as the backend makes batched contexts
    sched = _engine.Scheduler(ctx, max_queued=len(prompts))
    sched.submit(prompts[0][:4], _engine.Sampler(m), max_tokens=2, streaming=False).wait()  # warm
    sched.clear_idle_caches()
    gens = [sched.submit(p, _engine.Sampler(m), max_tokens=n_predict, streaming=False)
            for p in prompts]
    out = _decode_window([g.wait() for g in gens])
    sched.close()
    ctx.close()
    m.close()
    return out


def xybrid_asyncio(model: Path, prompts: list[list[int]], n_predict: int, threads: int,
                   n_ctx: int) -> dict[str, float]:
    """The same requests as astream consumers on one event loop."""
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig

    cfg = GenerationConfig(max_tokens=n_predict, temperature=0)
    with LlamaCppBackend(LlmConfig(model, context_length=n_ctx, n_threads=threads,
                                   parallel=len(prompts), n_batch=512)) as b:
        async def one(p: list[int]) -> Any:
            final = None
            async for piece in b.astream_raw(p, cfg):
                final = piece
            return final.output  # type: ignore[union-attr]

        async def main() -> list[Any]:
            return await asyncio.gather(*(one(p) for p in prompts))

        t0 = time.monotonic_ns()
        outs = asyncio.run(main())
        t1 = time.monotonic_ns()
    total = sum(o.tokens_generated for o in outs)
    return {"e2e_tps": total / ((t1 - t0) / 1e9), "tokens": total}


def xybrid_batch_e2e(model: Path, prompts: list[list[int]], n_predict: int, threads: int,
                     n_ctx: int) -> dict[str, float]:
    """generate_batch end to end, measured as xybrid_asyncio is (its reference)."""
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig

    cfg = GenerationConfig(max_tokens=n_predict, temperature=0)
    with LlamaCppBackend(LlmConfig(model, context_length=n_ctx, n_threads=threads,
                                   parallel=len(prompts), n_batch=512)) as b:
        t0 = time.monotonic_ns()
        outs = b.generate_batch(prompts, cfg, raw=True)
        t1 = time.monotonic_ns()
    total = sum(o.tokens_generated for o in outs)
    return {"e2e_tps": total / ((t1 - t0) / 1e9), "tokens": total}


def xybrid_serialised(model: Path, prompts: list[list[int]], n_predict: int, threads: int,
                      n_ctx: int) -> dict[str, float]:
    """Today's engine: one sequence, N threads behind the backend's lock."""
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig

    cfg = GenerationConfig(max_tokens=n_predict, temperature=0)
    outs: list[Any] = []
    with LlamaCppBackend(LlmConfig(model, context_length=n_ctx, n_threads=threads)) as b:
        b.generate_raw(prompts[0], GenerationConfig(max_tokens=2, temperature=0))  # warm
        t0 = time.monotonic_ns()
        ts = [threading.Thread(target=lambda p=p: outs.append(b.generate_raw(p, cfg)))
              for p in prompts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        t1 = time.monotonic_ns()
    total = sum(o.tokens_generated for o in outs)
    decode = statistics.median(o.decode_tps for o in outs if o.decode_tps)
    return {"e2e_tps": total / ((t1 - t0) / 1e9), "decode_tps": decode, "tokens": total}


def xybrid_single(model: Path, prompt: list[int], n_predict: int, threads: int,
                  n_ctx: int) -> float:
    """Decode rate of the single-sequence engine (the N = 1 baseline)."""
    from xybrid._native import _engine

    m = _engine.Model(str(model))
    ctx = _engine.Context(m, n_ctx=n_ctx, n_batch=512, n_threads=threads)
    r = ctx.generate(prompt, _engine.Sampler(m), max_tokens=n_predict)
    ctx.close()
    m.close()
    decode = [t for t in r.token_ns]
    return (len(decode) - 1) / ((decode[-1] - decode[0]) / 1e9)


def admission_probe(model: Path, tokenize: Any, threads: int, n_predict: int) -> dict[str, float]:
    """ITL p95 of 7 running streams, without and with a 1,500-token prompt
    admitted while they run (chunked prefill under the n_batch budget)."""
    from xybrid import LlamaCppBackend, LlmConfig
    from xybrid._native import _engine

    sys.path.insert(0, str(BENCH_DIR.parent))
    from bench.harness import long_text

    long_prompt = tokenize(long_text())[:1500]
    out: dict[str, float] = {}
    with LlamaCppBackend(LlmConfig(model, context_length=4096, n_threads=threads,
                                   parallel=8, n_batch=512)) as b:
        loaded = b._loaded
        sched, m = loaded.scheduler, loaded.model
        base = [tokenize(f"{PROMPT} ({i})") for i in range(7)]
        for label, admit in (("without", False), ("with", True)):
            sched.clear_idle_caches()
            gens = [sched.submit(p, _engine.Sampler(m), max_tokens=n_predict, streaming=False)
                    for p in base]
            if admit:
                while min(len(g.result.tokens) if g.result else 0 for g in gens[:1]) == 0 \
                        and sched.stats()["steps"] < 20 + out.get("steps", 0):
                    time.sleep(0.01)
                time.sleep(0.05)
                extra = sched.submit(long_prompt, _engine.Sampler(m), max_tokens=4,
                                     streaming=False)
            res = [g.wait() for g in gens]
            if admit:
                extra.wait()
            out["steps"] = sched.stats()["steps"]
            itl = sorted((b2 - a) / 1e6 for r in res for a, b2 in zip(r.token_ns, r.token_ns[1:]))
            out[f"itl_p95_{label}_ms"] = _pct(itl, 95)
            out[f"itl_max_{label}_ms"] = itl[-1]
    out["ratio"] = out["itl_p95_with_ms"] / out["itl_p95_without_ms"]
    del out["steps"]
    return out


# --- driver -----------------------------------------------------------------------------


def _use_installed_xybrid() -> None:
    """Run from the repository root, ``import xybrid`` would find the source
    tree, which has no compiled extension: import the installed package."""
    here = {str(REPO), "", "."}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in here and Path(p or ".").resolve() != REPO]
    try:
        import xybrid  # noqa: F401
    finally:
        sys.path[:] = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gemma", "tiny", "both"], default="both")
    ap.add_argument("--n", default="1,2,4,8,16", help="comma-separated concurrency levels")
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-batched-bench", action="store_true")
    ap.add_argument("--no-peer", action="store_true",
                    help="leave out llama-cpp-python (built on first use into bench/.cache)")
    ap.add_argument("--quick", action="store_true", help="1 round, N = 1,4, 32 tokens, tiny model")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.n, opts.n_predict, opts.model = 1, "1,4", 32, "tiny"
    levels = [int(x) for x in opts.n.split(",")]
    _use_installed_xybrid()

    from xybrid import default_model_path
    from xybrid._native import _engine
    from xybrid.testing.tiny_models import write_tiny_llama

    llama_cpp_dir = REPO / "llama.cpp"
    models: dict[str, Path] = {}
    if opts.model in ("gemma", "both"):
        models["gemma3-270m"] = default_model_path()
    if opts.model in ("tiny", "both"):
        CACHE.mkdir(parents=True, exist_ok=True)
        models["tiny"] = write_tiny_llama(CACHE / "tiny-overhead.gguf", llama_cpp_dir=llama_cpp_dir)
    binary = None if opts.no_batched_bench else build_batched_bench(llama_cpp_dir, os.cpu_count() or 2)
    peer = None
    if not opts.no_peer:
        sys.path.insert(0, str(REPO))
        from bench import peer_env

        peer, why = peer_env.ensure()
        if peer is None:
            print(f"[concurrent] llama-cpp-python left out: {why}", flush=True)

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": opts.threads, "n_predict": opts.n_predict, "rounds": opts.rounds,
        "flash_attn": False, "models": {},
    }
    for name, path in models.items():
        m = _engine.Model(str(path))
        tokenize = lambda text, m=m: m.tokenize(text, add_special=True, parse_special=False)  # noqa: E731
        max_n = max(levels)
        prompts_all = [tokenize(f"{PROMPT} ({i})") for i in range(max_n)]
        n_prompt = len(prompts_all[0])
        n_ctx = max(2048, max_n * (n_prompt + opts.n_predict + 8))
        rows: dict[int, dict[str, list[dict[str, float]]]] = {n: {} for n in levels}
        single: list[float] = []
        for rnd in range(opts.rounds):
            single.append(xybrid_single(path, prompts_all[0], opts.n_predict, opts.threads, 2048))
            for n in levels:
                prompts = prompts_all[:n]
                r = rows[n]
                if binary is not None:
                    r.setdefault("llama-batched-bench", []).append(run_batched_bench(
                        binary, path, n, n_prompt, opts.n_predict, opts.threads, n_ctx))
                    if n > 1:
                        r.setdefault("llama-batched-bench split KV", []).append(run_batched_bench(
                            binary, path, n, n_prompt, opts.n_predict, opts.threads, n_ctx, False))
                r.setdefault("xybrid batched", []).append(
                    xybrid_batched(path, prompts, opts.n_predict, opts.threads, n_ctx))
                r.setdefault("xybrid serialised", []).append(
                    xybrid_serialised(path, prompts, opts.n_predict, opts.threads, 2048))
                if peer is not None:
                    r.setdefault("llama-cpp-python", []).append(
                        run_peer(peer, path, prompts, opts.n_predict, opts.threads, 2048))
                if n == max(levels) and n >= 4:
                    r.setdefault("xybrid generate_batch e2e", []).append(
                        xybrid_batch_e2e(path, prompts, opts.n_predict, opts.threads, n_ctx))
                    r.setdefault("xybrid asyncio e2e", []).append(
                        xybrid_asyncio(path, prompts, opts.n_predict, opts.threads, n_ctx))
                print(f"[{name}] round {rnd + 1} N={n}: "
                      + ", ".join(f"{k} {v[-1].get('decode_tps', v[-1]['e2e_tps']):.1f}"
                                  for k, v in r.items()), flush=True)
        probe = None
        if name == "gemma3-270m" or opts.quick:
            probe = admission_probe(path, tokenize, opts.threads, opts.n_predict)
            print(f"[{name}] admission probe: {probe}", flush=True)
        report["models"][name] = {"rows": {str(n): v for n, v in rows.items()},
                                  "single_decode_tps": single, "n_prompt": n_prompt,
                                  "admission": probe}
        m.close()

    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    md = render(report)
    write_dated(RESULTS, stamp, md, report, indent=1, latest=not opts.quick)
    chart(report, RESULTS / f"{stamp}.png", RESULTS / "latest.png" if not opts.quick else None)
    print(md)
    return 0


def _med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def render(report: dict[str, Any]) -> str:
    lines = [f"# Concurrent requests ({report['date']})", "",
             f"{report['cpus']} CPUs, {report['threads']} threads for every contestant, flash "
             f"attention off, {report['n_predict']} tokens per request, greedy, "
             f"{report['rounds']} rounds; medians, ratios are medians of per-round ratios.", ""]
    for name, data in report["models"].items():
        lines += [f"## {name}", "",
                  "| N | batched-bench (-kvu) decode t/s | xybrid batched decode t/s | ÷ batched-bench "
                  "| xybrid serialised e2e t/s | llama-cpp-python e2e t/s | xybrid batched e2e t/s "
                  "| TTFT p50 / p95 ms | ITL p95 ms | batched-bench split KV decode t/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in data["rows"].items():
            xb = r["xybrid batched"]
            ref = r.get("llama-batched-bench")
            ratio = _med([a["decode_tps"] / b["decode_tps"] for a, b in zip(xb, ref)]) if ref else float("nan")
            lines.append(
                f"| {n} | {_med([x['decode_tps'] for x in ref]) if ref else float('nan'):.1f} "
                f"| {_med([x['decode_tps'] for x in xb]):.1f} | {ratio:.3f} "
                f"| {_med([x['e2e_tps'] for x in r['xybrid serialised']]):.1f} "
                f"| {_med([x['e2e_tps'] for x in r.get('llama-cpp-python', [])]):.1f} "
                f"| {_med([x['e2e_tps'] for x in xb]):.1f} "
                f"| {_med([x['ttft_p50_ms'] for x in xb]):.0f} / {_med([x['ttft_p95_ms'] for x in xb]):.0f} "
                f"| {_med([x['itl_p95_ms'] for x in xb]):.1f} "
                f"| {_med([x['decode_tps'] for x in r.get('llama-batched-bench split KV', [])]):.1f} |")
        one = data["rows"].get("1")
        if one:
            n1 = _med([a["decode_tps"] / s for a, s in zip(one["xybrid batched"], data["single_decode_tps"])])
            lines += ["", f"N = 1 batched decode ÷ single-sequence engine: {n1:.3f} "
                          f"(single-sequence: {_med(data['single_decode_tps']):.1f} t/s)"]
        for n, r in data["rows"].items():
            if "xybrid asyncio e2e" in r:
                ratio = _med([a["e2e_tps"] / b["e2e_tps"]
                              for a, b in zip(r["xybrid asyncio e2e"], r["xybrid generate_batch e2e"])])
                lines.append(f"N = {n} astream consumers on one asyncio thread ÷ generate_batch "
                             f"(end to end): {ratio:.3f}")
        if data.get("admission"):
            a = data["admission"]
            lines.append(f"1,500-token prompt admitted beside 7 streams: their ITL p95 "
                         f"{a['itl_p95_without_ms']:.1f} → {a['itl_p95_with_ms']:.1f} ms "
                         f"({a['ratio']:.2f}×; max {a['itl_max_with_ms']:.0f} ms)")
        lines.append("")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path, latest: Path | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(report["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = report["models"][name]["rows"]
        ns = [int(n) for n in rows]
        for label, key, field in (("llama-batched-bench -kvu (C)", "llama-batched-bench", "decode_tps"),
                                  ("llama-batched-bench split KV (C)", "llama-batched-bench split KV",
                                   "decode_tps"),
                                  ("xybrid batched", "xybrid batched", "decode_tps"),
                                  ("xybrid serialised (today)", "xybrid serialised", "e2e_tps"),
                                  ("llama-cpp-python", "llama-cpp-python", "e2e_tps")):
            ys = []
            for n in rows:
                runs = rows[n].get(key)
                ys.append(_med([r[field] for r in runs]) if runs else float("nan"))
            ax.plot(ns, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent requests N")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if latest is not None:
        shutil.copy(path, latest)


if __name__ == "__main__":
    raise SystemExit(main())
