"""Turn the raw records of a run into figures, ratios, targets and files.

Every figure is computed per round (the median of the repetitions inside the
round's subprocess), then summarised over the measured rounds as
median [min–max]. Ratios are computed per round, between contestants measured
in the same round, and summarised the same way.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "native": "native (C loop)",
    "engine": "xybrid",
    "engine-stream": "xybrid stream",
    "backend": "xybrid LlamaCppBackend",
    "backend-stream": "xybrid LlamaCppBackend stream",
    "compat-stream": "xybrid llama-cpp-python facade stream",
    "completion": "llama-cpp-python",
    "completion-stream": "llama-cpp-python stream",
}
CONTESTANT_NAMES = {"native": "native (C loop)", "xybrid": "xybrid", "peer": "llama-cpp-python"}


def label(ckey: str, variant: str) -> str:
    if variant in LABELS:
        return LABELS[variant]
    return f"{CONTESTANT_NAMES.get(ckey, ckey)} {variant}"


def is_stream(variant: str) -> bool:
    return variant.endswith("stream")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summary(xs: list[float]) -> dict[str, Any] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": _median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


# --- per-round figures ---------------------------------------------------------

def figures(kind: str, v: dict[str, Any], result: dict[str, Any], n_prompt: int) -> dict[str, Any]:
    """The figures of one variant in one round."""
    f: dict[str, Any] = {}
    if kind in ("decode", "memory"):
        runs = v["runs"]
        f["tps"] = _decode_tps(runs)
        f["loop_tps"] = _loop_tps(runs)
        if v.get("idle_runs"):
            f["idle_tps"] = _decode_tps(v["idle_runs"])
            f["idle_loop_tps"] = _loop_tps(v["idle_runs"])
            f["usage"] = _loop_usage(runs)
            f["idle_usage"] = _loop_usage(v["idle_runs"])
        f["ttft_ms"] = _median([(r["t_first_ns"] - r["t_start_ns"]) / 1e6 for r in runs])
        f["n_tokens"] = min(r["n_tokens"] for r in runs)
        f["n_chunks"] = _median([r["n_chunks"] for r in runs])
        f["stop_reasons"] = sorted({r["stop_reason"] for r in runs})
        f["tokens"] = runs[0]["tokens"]
    if kind == "prefill":
        # One token is generated: the whole call (prefill + first token +
        # returning it) is what a caller waits, the same for every contestant.
        runs = v["runs"]
        f["tps"] = _median([n_prompt / ((r["t_end_ns"] - r["t_start_ns"]) / 1e9) for r in runs])
        f["ttft_ms"] = _median([(r["t_end_ns"] - r["t_start_ns"]) / 1e6 for r in runs])
    if kind == "multiturn":
        f["reuse_ms"] = _median(v["ttft_reuse_ns"]) / 1e6
        f["cleared_ms"] = _median(v["ttft_cleared_ns"]) / 1e6
        f["speedup"] = f["cleared_ms"] / f["reuse_ms"]
    if kind == "memory":
        f["maxrss_mb"] = result["maxrss_kb"] / 1024
        f["base_mb"] = result["rss_before_load_kb"] / 1024
        f["load_ms"] = result["t_load_ns"] / 1e6
    return f


def _decode_tps(runs: list[dict[str, Any]]) -> float | None:
    tps = [(r["n_tokens"] - 1) / ((r["t_end_ns"] - r["t_first_ns"]) / 1e9)
           for r in runs if r["n_tokens"] >= 2 and r["t_end_ns"] > r["t_first_ns"]]
    return _median(tps) if tps else None


def _loop_tps(runs: list[dict[str, Any]]) -> float | None:
    """The pace of the generation loop itself, from the engine's timestamps
    of the first and last sampled token (C loop and xybrid only)."""
    tps = [(r["n_tokens"] - 1) / ((r["t_loop_last_ns"] - r["t_loop_first_ns"]) / 1e9)
           for r in runs if r.get("t_loop_last_ns", 0) > r.get("t_loop_first_ns", 0) and r["n_tokens"] >= 2]
    return _median(tps) if tps else None


def _loop_usage(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Medians over runs of what the OS gave the loop's thread: CPU µs per
    generated token, its share of the loop's own wall time on a CPU, and its
    voluntary (waits) and involuntary (preemptions) context switches."""
    usable = [r for r in runs if r.get("loop_cpu_ns", -1) >= 0 and r["n_tokens"] > 0
              and r.get("loop_wall_ns", -1) > 0]
    if not usable:
        return None
    return {
        "cpu_us_per_token": _median([r["loop_cpu_ns"] / r["n_tokens"] / 1e3 for r in usable]),
        "cpu_share": _median([r["loop_cpu_ns"] / r["loop_wall_ns"] for r in usable]),
        "waits": _median([r["loop_waits"] for r in usable]),
        "preemptions": _median([r["loop_preemptions"] for r in usable]),
    }


def _same_tokens(x: list[int], ref: list[int]) -> bool:
    n = min(len(x), len(ref))
    return n > 0 and x[:n] == ref[:n]


def analyse(records: list[dict[str, Any]], cases: list[Any], contestants: list[Any],
            meta: dict[str, Any]) -> dict[str, Any]:
    n_rounds = 1 + max([r["round"] for r in records if not r["warmup"]], default=-1)
    variants: list[tuple[str, str]] = [(c.key, v) for c in contestants if not c.skipped for v in c.variants]
    errors: list[str] = []
    # per[case][(ckey, variant)][round] = figures
    per: dict[str, dict[tuple[str, str], dict[int, dict[str, Any]]]] = {}
    case_by_name = {c.name: c for c in cases}
    for rec in records:
        if rec["warmup"]:
            continue
        case = case_by_name[rec["case"]]
        res = rec["result"]
        if "error" in res:
            errors.append(f"{case.name} / {rec['contestant']} / round {rec['round'] + 1}: {res['error']}")
            continue
        n_prompt = meta["n_prompt"][case.model]["long"]
        for vname, v in res["variants"].items():
            try:
                f = figures(case.kind, v, res, n_prompt)
            except (KeyError, ZeroDivisionError, ValueError) as exc:
                errors.append(f"{case.name} / {vname} / round {rec['round'] + 1}: bad result ({exc!r})")
                continue
            per.setdefault(case.name, {}).setdefault((rec["contestant"], vname), {})[rec["round"]] = f

    def primary_metric(kind: str) -> str:
        return {"decode": "tps", "prefill": "tps", "multiturn": "reuse_ms", "memory": "maxrss_mb"}[kind]

    def speed_ratio(kind: str, x: float, ref: float) -> float:
        # > 1 means "x is better than ref" for speeds and times; for memory
        # it is the plain ratio of peak RSS (lower is better).
        if kind == "multiturn":
            return ref / x
        return x / ref

    peer_variants = [v for k, v in variants if k == "peer"]
    out_cases: list[dict[str, Any]] = []
    for case in cases:
        data = per.get(case.name, {})
        metric = primary_metric(case.kind)
        native = data.get(("native", "native"), {})
        rows = []
        for key in variants:
            ckey, vname = key
            rounds = data.get(key)
            if not rounds:
                continue
            row: dict[str, Any] = {"contestant": ckey, "variant": vname, "label": label(ckey, vname),
                                   "streaming": is_stream(vname)}
            for m in ("tps", "ttft_ms", "reuse_ms", "cleared_ms", "speedup", "maxrss_mb", "base_mb",
                      "n_chunks", "load_ms"):
                vals = [f[m] for f in rounds.values() if f.get(m) is not None]
                if vals:
                    row[m] = summary(vals)
            if case.kind in ("decode", "memory"):
                row["n_tokens"] = min(f["n_tokens"] for f in rounds.values())
                row["stop_reasons"] = sorted({s for f in rounds.values() for s in f["stop_reasons"]})
                if native and ckey != "native":
                    same = [_same_tokens(f["tokens"], native[r]["tokens"]) for r, f in rounds.items() if r in native]
                    row["same_tokens_as_native"] = f"{sum(same)}/{len(same)}"
            if ckey != "native" and native:
                ratios = [speed_ratio(case.kind, f[metric], native[r][metric])
                          for r, f in rounds.items() if r in native and f.get(metric) and native[r].get(metric)]
                row["vs_native"] = summary(ratios)
                if case.kind == "decode":
                    over = [(1 / f["tps"] - 1 / native[r]["tps"]) * 1e6
                            for r, f in rounds.items() if r in native and f.get("tps") and native[r].get("tps")]
                    row["overhead_us"] = summary(over)
            if ckey == "xybrid" and peer_variants:
                pair = "completion-stream" if is_stream(vname) else "completion"
                if pair not in peer_variants:
                    pair = peer_variants[0]
                peer = data.get(("peer", pair), {})
                if case.kind == "memory":
                    peer = data.get(("peer", peer_variants[0]), {})
                if peer:
                    ratios = [speed_ratio(case.kind, f[metric], peer[r][metric])
                              for r, f in rounds.items() if r in peer and f.get(metric) and peer[r].get(metric)]
                    row["vs_peer"] = summary(ratios)
                    row["peer_pair"] = label("peer", pair)
            if case.kind == "decode" and case.busy:
                kept = [f["tps"] / f["idle_tps"] for f in rounds.values() if f.get("tps") and f.get("idle_tps")]
                row["kept"] = summary(kept)
                row["idle_tps"] = summary([f["idle_tps"] for f in rounds.values() if f.get("idle_tps")])
                kept_loop = [f["loop_tps"] / f["idle_loop_tps"] for f in rounds.values()
                             if f.get("loop_tps") and f.get("idle_loop_tps")]
                row["kept_loop"] = summary(kept_loop)
                for which in ("usage", "idle_usage"):
                    got = [f[which] for f in rounds.values() if f.get(which)]
                    if got:
                        row[which] = {k: summary([u[k] for u in got]) for k in got[0]}
            rows.append(row)
        out_cases.append({"name": case.name, "title": case.title, "kind": case.kind, "model": case.model,
                          "n_predict": case.n_predict, "sampler": case.sampler, "busy": case.busy,
                          "rows": rows})

    analysis = {"n_rounds": n_rounds, "cases": out_cases, "errors": errors,
                "skipped": {c.key: c.skipped for c in contestants if c.skipped}}
    analysis["targets"] = targets(analysis)
    analysis["markdown"] = markdown(analysis, meta)
    return analysis


# --- targets ---------------------------------------------------------------------

def targets(a: dict[str, Any]) -> list[dict[str, Any]]:
    cases = {c["name"]: c for c in a["cases"]}
    out: list[dict[str, Any]] = []

    def add(target: str, case: str, row: dict[str, Any], key: str, threshold: float, higher: bool = True) -> None:
        s = row.get(key)
        if s is None:
            out.append({"target": target, "case": case, "who": row["label"], "measured": None,
                        "threshold": threshold, "met": None})
            return
        ok = (lambda x: x >= threshold) if higher else (lambda x: x <= threshold)
        met = ok(s["median"])
        every = all(ok(x) for x in s["values"])
        none = not any(ok(x) for x in s["values"])
        out.append({"target": target, "case": case, "who": row["label"], "measured": s,
                    "threshold": threshold, "higher_is_better": higher, "met": met,
                    "rounds": "every round" if every else ("no round" if none else "some rounds")})

    def xrows(case: str, stream_only: bool = False) -> list[dict[str, Any]]:
        c = cases.get(case)
        if not c:
            return []
        return [r for r in c["rows"] if r["contestant"] == "xybrid" and (r["streaming"] or not stream_only)]

    for case in ("compute-greedy", "compute-sampled"):
        for r in xrows(case):
            add("xybrid/native decode ≥ 0.99 (compute-bound)", case, r, "vs_native", 0.99)
    for r in xrows("overhead"):
        add("xybrid/native decode ≥ 0.95 (overhead-bound)", "overhead", r, "vs_native", 0.95)
    for r in xrows("busy"):
        # The generation loop's own pace: the caller-side figure of a short
        # generation is dominated by waiting for the GIL at the call's
        # boundaries (and, streaming, by a first chunk that arrives late).
        add("busy/idle decode rate of the loop ≥ 0.9 (busy interpreter)", "busy", r, "kept_loop", 0.9)
        # As the caller sees it: the loop's pace plus the GIL hand-back at
        # the end of the call (up to a switch interval, 5 ms).
        add("busy/idle decode rate seen by the caller ≥ 0.9 (busy interpreter)", "busy", r, "kept", 0.9)
        # The same busy thread slows the C loop too (a core, or a core's
        # share, taken); against it in the same round, what is left is the
        # interpreter's own cost.
        add("xybrid/native decode, both beside a busy thread ≥ 0.9", "busy", r, "vs_native", 0.9)
    for r in xrows("overhead", stream_only=True):
        add("xybrid stream / llama-cpp-python stream ≥ 3 (overhead-bound)", "overhead", r, "vs_peer", 3.0)
    for name, c in cases.items():
        if name == "memory":
            for r in xrows(name)[:1]:
                add("xybrid ≤ llama-cpp-python peak RSS", name, r, "vs_peer", 1.0, higher=False)
            continue
        for r in xrows(name, stream_only=True):
            add("xybrid stream ≥ llama-cpp-python stream", name, r, "vs_peer", 1.0)
    for r in xrows("multiturn"):
        add("multi-turn TTFT: reuse ≥ 5× faster than cleared", "multiturn", r, "speedup", 5.0)
    for r in xrows("memory")[:1]:
        add("peak RSS ≤ 1.05 × native", "memory", r, "vs_native", 1.05, higher=False)
    return out


# --- markdown --------------------------------------------------------------------

def fmt(s: dict[str, Any] | None, digits: int = 1, unit: str = "") -> str:
    if not s:
        return "n/a"
    d = digits
    if s["n"] == 1:
        return f"{s['median']:.{d}f}{unit}"
    return f"{s['median']:.{d}f}{unit} [{s['min']:.{d}f}–{s['max']:.{d}f}]"


def markdown(a: dict[str, Any], meta: dict[str, Any]) -> str:
    L: list[str] = []
    n = a["n_rounds"]
    L.append(f"# xybrid benchmark — {meta['date']}")
    L.append("")
    L.append(f"{n} measured round(s) after {meta['args']['warmup_rounds']} warm-up round(s); every figure is "
             "median [min–max] over the rounds; ratios are computed per round, then summarised. "
             f"Threads: {meta['threads']} for everyone"
             + (f" ({meta['args']['busy_threads']} in the busy-interpreter workload)"
                if meta['args'].get('busy_threads') and 'busy' in meta['args']['workloads'] else "")
             + f"; n_ctx {meta['args']['ctx']}, n_batch "
             f"{meta['args']['batch']}, flash attention {'on' if meta['args']['flash_attn'] else 'off'}.")
    L.append("")
    for c in a["cases"]:
        L.append(f"## {c['title']}")
        L.append("")
        if c["kind"] in ("decode", "prefill"):
            what = "decode tokens/s" if c["kind"] == "decode" else "prefill tokens/s"
            head = f"| contestant | {what} | ×native | ×llama-cpp-python | "
            if c["kind"] == "decode":
                head += "overhead µs/token | TTFT ms | tokens | same tokens as native |"
                if c["busy"]:
                    head += " idle tokens/s | kept (busy/idle) | kept by the loop itself |"
            else:
                head += "TTFT ms |"
            L.append(head)
            L.append("|" + "---|" * (head.count("|") - 1))
            for r in c["rows"]:
                cells = [r["label"], fmt(r.get("tps")), fmt(r.get("vs_native"), 3), fmt(r.get("vs_peer"), 2)]
                if c["kind"] == "decode":
                    cells += [fmt(r.get("overhead_us"), 1), fmt(r.get("ttft_ms"), 1),
                              f"{r.get('n_tokens', '?')} ({'/'.join(r.get('stop_reasons', []))})",
                              r.get("same_tokens_as_native", "—")]
                    if c["busy"]:
                        cells += [fmt(r.get("idle_tps")), fmt(r.get("kept"), 3), fmt(r.get("kept_loop"), 3)]
                else:
                    cells += [fmt(r.get("ttft_ms"), 1)]
                L.append("| " + " | ".join(cells) + " |")
            if c["busy"]:
                L.append("")
                L.append("Every contestant runs each generation twice in a row, idle and then beside the busy "
                         "thread; \"kept\" is the ratio of the decode rates the caller sees, per round; \"kept "
                         "by the loop itself\" the same from the engine's own token timestamps (C loop and "
                         "xybrid), i.e. whether generation kept its pace while the consumer waited for the GIL. "
                         "The native row runs a spinning C thread instead (CPU contention without a GIL): what "
                         "one more busy thread costs any program on these cores. llama-cpp-python decodes "
                         "fewer tokens here (see the title): its time grows with the square of the length "
                         "beside a busy thread, so a shorter run only flatters it.")
                usage_rows = [r for r in c["rows"] if r.get("usage") and r.get("idle_usage")]
                if usage_rows:
                    L.append("")
                    L.append("What the OS gave the thread that runs the loop (medians of per-round medians; "
                             "CPU time from `CLOCK_THREAD_CPUTIME_ID`, context switches from "
                             "`getrusage(RUSAGE_THREAD)`, prefill of the short prompt included):")
                    L.append("")
                    L.append("| contestant | CPU µs/token idle | CPU µs/token busy | share of the loop's wall "
                             "time on a CPU, idle | the same, busy | waits per run, busy | preemptions "
                             "per run, busy |")
                    L.append("|---|---|---|---|---|---|---|")
                    for r in usage_rows:
                        u, i = r["usage"], r["idle_usage"]
                        L.append(f"| {r['label']} | {fmt(i['cpu_us_per_token'], 1)} | "
                                 f"{fmt(u['cpu_us_per_token'], 1)} | {fmt(i['cpu_share'], 3)} | "
                                 f"{fmt(u['cpu_share'], 3)} | {fmt(u['waits'], 0)} | "
                                 f"{fmt(u['preemptions'], 0)} |")
                    L.append("")
                    L.append("A loop that waited for the consumer or the GIL would show waits; one that lost "
                             "its CPU to the busy thread, preemptions and a lower share; the same share with "
                             "more CPU per token means each token cost more instructions or cycles (the "
                             "busy thread's sibling load on caches and the memory bus).")
        elif c["kind"] == "multiturn":
            L.append("| contestant | TTFT with prefix reuse ms | TTFT cache cleared ms | reuse speed-up | "
                     "×native (reuse) | ×llama-cpp-python (reuse) |")
            L.append("|---|---|---|---|---|---|")
            for r in c["rows"]:
                L.append(f"| {r['label']} | {fmt(r.get('reuse_ms'))} | {fmt(r.get('cleared_ms'))} | "
                         f"{fmt(r.get('speedup'), 1, '×')} | {fmt(r.get('vs_native'), 3)} | "
                         f"{fmt(r.get('vs_peer'), 2)} |")
        elif c["kind"] == "memory":
            L.append("| contestant | peak RSS MiB | RSS before load MiB | peak ÷ native | peak ÷ llama-cpp-python |")
            L.append("|---|---|---|---|---|")
            for r in c["rows"]:
                L.append(f"| {r['label']} | {fmt(r.get('maxrss_mb'))} | {fmt(r.get('base_mb'))} | "
                         f"{fmt(r.get('vs_native'), 3)} | {fmt(r.get('vs_peer'), 3)} |")
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("\"met\" judges the median; \"rounds\" says in how many rounds the target held "
             "(\"some rounds\": the result is within the round-to-round noise).")
    L.append("")
    L.append("| target | workload | contestant | measured (median [min–max]) | met | rounds |")
    L.append("|---|---|---|---|---|---|")
    for t in a["targets"]:
        met = "n/a" if t["met"] is None else ("**yes**" if t["met"] else "**NO**")
        L.append(f"| {t['target']} | {t['case']} | {t['who']} | {fmt(t['measured'], 3)} | {met} | "
                 f"{t.get('rounds', '')} |")
    L.append("")
    if a["skipped"] or a["errors"]:
        L.append("## Problems")
        L.append("")
        for k, why in a["skipped"].items():
            L.append(f"- {CONTESTANT_NAMES.get(k, k)} skipped: {why}")
        for e in a["errors"]:
            L.append(f"- {e}")
        L.append("")
    L.append("## Environment")
    L.append("")
    bi = meta["build_info"]
    L.append(f"- CPU: {meta['cpu_model']}, {meta['cpu_count']} logical cores; threads used: {meta['threads']}")
    L.append(f"- load average at start / end: {' '.join(f'{x:.2f}' for x in meta['loadavg_start'])} / "
             f"{' '.join(f'{x:.2f}' for x in meta['loadavg_end'])}"
             + (f"; 1-minute load before each job: min {min(meta['loadavg_jobs']):.2f}, median "
                f"{statistics.median(meta['loadavg_jobs']):.2f}, max {max(meta['loadavg_jobs']):.2f}"
                if meta.get("loadavg_jobs") else ""))
    if meta.get("cpu_busy_jobs"):
        cb = meta["cpu_busy_jobs"]
        L.append(f"- CPU use by other programs just before each measured workload (1 s sample): "
                 f"min {min(cb):.0%}, median {statistics.median(cb):.0%}, max {max(cb):.0%}")
    L.append(f"- {meta['platform']}, Python {meta['python']}")
    L.append(f"- xybrid {meta['xybrid_version']}, llama.cpp {meta['llama_cpp_commit']}; build: "
             + ", ".join(f"{k}={v}" for k, v in bi.items() if k not in ("VERSION", "LLAMA_CPP_COMMIT")))
    L.append(f"- llama.cpp system info: {meta['system_info']}")
    peer = meta["peer"]
    L.append(f"- peer: {peer['package']} built from source, CMAKE_ARGS=\"{peer['cmake_args']}\""
             + (f" (skipped: {peer['skipped']})" if peer["skipped"] else ""))
    L.append(f"- native loop: `{meta['native_compile']}`" if meta["native_compile"] else
             f"- native loop skipped: {meta['native_skipped']}")
    for k, p in meta["models"].items():
        L.append(f"- model {k}: {meta['model_descriptions'].get(k, '')} ({p})")
    L.append("- prompt tokens: " + "; ".join(f"{k}: {v}" for k, v in meta["n_prompt"].get("gemma", meta["n_prompt"]["tiny"]).items()))
    L.append(f"- run time: {meta['wall_s'] / 60:.1f} min; arguments: "
             + " ".join(f"{k}={v}" for k, v in meta["args"].items() if k != "llama_cpp_dir"))
    L.append("")
    return "\n".join(L)


# --- chart -------------------------------------------------------------------------

def chart(a: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [c for c in a["cases"] if c["rows"]]
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    colours = {"native": "#555555", "xybrid": "#1f77b4", "peer": "#ff7f0e"}
    for ax, c in zip(axes.flat, panels):
        if c["kind"] == "multiturn":
            labels = [r["label"] for r in c["rows"]]
            reuse = [r["reuse_ms"]["median"] for r in c["rows"]]
            cleared = [r["cleared_ms"]["median"] for r in c["rows"]]
            x = range(len(labels))
            ax.bar([i - 0.2 for i in x], reuse, 0.4, label="prefix reused", color="#2ca02c")
            ax.bar([i + 0.2 for i in x], cleared, 0.4, label="cache cleared", color="#d62728")
            ax.set_ylabel("time to first token, ms")
            ax.legend(fontsize=8)
        else:
            key = "maxrss_mb" if c["kind"] == "memory" else "tps"
            good = [r for r in c["rows"] if r.get(key)]
            labels = [r["label"] for r in good]
            med = [r[key]["median"] for r in good]
            err = [[r[key]["median"] - r[key]["min"] for r in good], [r[key]["max"] - r[key]["median"] for r in good]]
            x = range(len(labels))
            bars = ax.bar(x, med, yerr=err, capsize=3,
                          color=[colours.get(r["contestant"], "#999999") for r in good])
            for bar, r in zip(bars, good):
                if r["streaming"]:
                    bar.set_hatch("//")
            ax.set_ylabel("peak RSS, MiB" if key == "maxrss_mb" else
                          ("prefill tokens/s" if c["kind"] == "prefill" else "decode tokens/s"))
        ax.set_xticks(list(range(len(labels))))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(c["title"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"xybrid benchmark (median, whiskers min–max over {a['n_rounds']} rounds; hatched = streaming)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_dated(out_dir: Path, stamp: str, text: str, data: Any, *, indent: int = 2,
                latest: bool = True) -> None:
    """A run's report as ``<stamp>.md`` and its figures as ``<stamp>.json`` in
    ``out_dir``, and the same two as ``latest.md`` / ``latest.json`` when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(data, indent=indent)
    for name in [stamp] + (["latest"] if latest else []):
        (out_dir / f"{name}.md").write_text(text)
        (out_dir / f"{name}.json").write_text(blob)


def write_all(a: dict[str, Any], records: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path,
              stamp: str, latest: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "n_rounds": a["n_rounds"], "cases": a["cases"], "targets": a["targets"],
           "errors": a["errors"], "skipped": a["skipped"], "records": records}
    paths: list[Path] = []
    md = out_dir / f"{stamp}.md"
    md.write_text(a["markdown"])
    js = out_dir / f"{stamp}.json"
    for rec in records:  # per-token timestamps and texts of the C loop: not needed here
        for v in rec["result"].get("variants", {}).values():
            for run in v.get("runs", []):
                run.pop("token_ns", None)
                run.pop("text", None)
    js.write_text(json.dumps(doc))
    paths += [md, js]
    png = out_dir / f"{stamp}.png"
    if chart(a, png):
        paths.append(png)
    if latest:
        for p in list(paths):
            target = out_dir / ("latest" + p.suffix)
            target.write_bytes(p.read_bytes())
            paths.append(target)
    return paths


def rerender(json_path: Path) -> list[Path]:
    """Rebuild the report files of a finished run from its JSON (same data;
    for a changed report layout)."""
    from types import SimpleNamespace

    doc = json.loads(json_path.read_text())
    cases = [SimpleNamespace(**{k: c[k] for k in ("name", "title", "kind", "model", "n_predict", "sampler",
                                                   "busy")}) for c in doc["cases"]]
    variants: dict[str, list[str]] = {}
    for rec in doc["records"]:
        for v in rec["result"].get("variants", {}):
            names = variants.setdefault(rec["contestant"], [])
            if v not in names:
                names.append(v)
    contestants = [SimpleNamespace(key=k, variants=v, skipped="") for k, v in variants.items()]
    contestants += [SimpleNamespace(key=k, variants=[], skipped=why) for k, why in doc.get("skipped", {}).items()]
    analysis = analyse(doc["records"], cases, contestants, doc["meta"])
    stamp = json_path.stem
    out_dir = json_path.parent
    latest = (out_dir / "latest.json").is_file() and (out_dir / "latest.json").read_bytes() == json_path.read_bytes()
    if stamp == "latest":
        raise SystemExit("pass the dated JSON file, not latest.json")
    return write_all(analysis, doc["records"], doc["meta"], out_dir, stamp, latest=latest)
