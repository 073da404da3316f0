"""``python -m bench.rpc``: what splitting a model over RPC servers costs.

Prefill and decode rates of one model run locally, against the same model
with its layers on ``xybrid rpc-server`` processes on this machine
(loopback TCP). All on one host, so this measures the protocol's cost, not
a speed-up: the layers still compute on the same two cores, one group at a
time (each waits for the previous one's output), and every token adds the
round trips of the activations between the processes.

Contestants, alternated in order from round to round:

- ``local``: every layer in this process;
- ``rpc-1``: every layer on one server;
- ``rpc-2``: the layers split in halves over two servers;
- ``rpc-2+cpu``: a third of the layers on each server, the rest local.

Every process computes with the same ``--threads``; only one of them
computes at any moment. Two models: the tiny F32 model of
``xybrid.testing`` (4 layers: per-token cost is almost all protocol and
process hops; the remote CPU runs the same kernels as the local one) and
Gemma 3 270M Q4_K_M (18 layers; remote layers use the plain quantized
kernels, locally llama.cpp uses its repacked ones, so part of the gap is
kernels, not network). The per-token overhead is the decode time per token
of a split run minus the local one.

Results go to ``bench/results/rpc/`` (Markdown and JSON).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.concurrent import _use_installed_xybrid
from bench.report import write_dated

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "rpc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(threads: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from xybrid.errors import RemoteServerError
    from xybrid.rpc import probe

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xybrid", "rpc-server", "--port", str(port), "--threads", str(threads)],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            probe(endpoint, timeout=2)
            return proc, endpoint
        except RemoteServerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure(model_path: Path, prompt: list[int], n_predict: int, threads: int,
            rpc: dict[str, Any] | None) -> dict[str, float]:
    """One load, one prefill of ``prompt``, one greedy decode."""
    from xybrid._native import _engine

    kw: dict[str, Any] = {}
    if rpc:
        kw = {"gpu_layers": rpc["gpu_layers"], "rpc_servers": rpc["servers"],
              "tensor_split": rpc["split"]}
    m = _engine.Model(str(model_path), **kw)
    ctx = _engine.Context(m, n_ctx=1024, n_batch=512, n_threads=threads)
    try:
        r = ctx.generate(prompt, _engine.Sampler(m), max_tokens=n_predict)
    finally:
        ctx.close()
        m.close()
    ts = list(r.token_ns)
    prefill_s = (r.t_prefill_end_ns - r.t_start_ns) / 1e9
    decode_s = (ts[-1] - ts[0]) / 1e9
    return {"prefill_tps": len(prompt) / prefill_s, "decode_tps": (len(ts) - 1) / decode_s,
            "decode_ms_per_token": decode_s * 1e3 / (len(ts) - 1), "tokens": len(ts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--models", default="tiny,gemma")
    opts = ap.parse_args(argv)
    _use_installed_xybrid()
    from xybrid.default_model import default_model_path
    from xybrid.testing.tiny_models import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="xybrid-rpc-bench-") as tmpname:
        tmp = Path(tmpname)
        paths = {"tiny": write_tiny_llama(tmp / "tiny-f32.gguf", n_layer=4, dtype="f32",
                                          llama_cpp_dir=REPO / "llama.cpp"),
                 "gemma": default_model_path()}
        servers = [start_server(opts.threads, tmp) for _ in range(2)]
        eps = [ep for _, ep in servers]
        try:
            report: dict[str, Any] = {"threads": opts.threads, "n_prompt": opts.n_prompt,
                                      "n_predict": opts.n_predict, "rounds": opts.rounds,
                                      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}
            for name in opts.models.split(","):
                path = Path(paths[name])
                from xybrid._native import _engine

                probe_model = _engine.Model(str(path))
                n_layer = int(probe_model.n_layer)
                words = ("the quick brown fox jumps over the lazy dog " * 200).strip()
                prompt = probe_model.tokenize(words, add_special=True, parse_special=False)[:opts.n_prompt]
                probe_model.close()
                third = (n_layer + 1) * 2 // 3
                configs: dict[str, dict[str, Any] | None] = {
                    "local": None,
                    "rpc-1": {"gpu_layers": -1, "servers": eps[:1], "split": ()},
                    "rpc-2": {"gpu_layers": -1, "servers": eps, "split": (1, 1)},
                    "rpc-2+cpu": {"gpu_layers": third, "servers": eps, "split": (1, 1)},
                }
                runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
                for rnd in range(1 + opts.rounds):  # round 0 warms up
                    order = list(configs) if rnd % 2 else list(configs)[::-1]
                    for key in order:
                        res = measure(path, prompt, opts.n_predict, opts.threads, configs[key])
                        if rnd:
                            runs[key].append(res)
                    print(f"[rpc] {name} round {rnd}: " + ", ".join(
                        f"{k} {runs[k][-1]['decode_tps']:.1f} t/s" for k in configs if runs[k]))
                med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                       for k, v in runs.items()}
                base = med["local"]["decode_ms_per_token"]
                for k, v in med.items():
                    v["overhead_ms_per_token"] = v["decode_ms_per_token"] - base
                    v["decode_vs_local"] = v["decode_tps"] / med["local"]["decode_tps"]
                    v["prefill_vs_local"] = v["prefill_tps"] / med["local"]["prefill_tps"]
                report["models"][name] = {"n_layer": n_layer, "median": med, "runs": runs}
        finally:
            for proc, _ in servers:
                proc.kill()
                proc.wait(10)
    text = render(report)
    write_dated(RESULTS, time.strftime("%Y-%m-%d_%H%M%S"), text, report)
    print(text)
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [
        "# RPC split on one host (loopback): the protocol's cost",
        "",
        f"{report['date']}; {report['threads']} threads in every process; prompt "
        f"{report['n_prompt']} tokens, {report['n_predict']} greedy tokens; median of "
        f"{report['rounds']} rounds after a warm-up. One host: a split cannot be faster "
        f"here, the figures are what the hops cost.",
        "",
    ]
    for name, m in report["models"].items():
        lines += [f"## {name} ({m['n_layer']} layers)", "",
                  "| contestant | prefill t/s | vs local | decode t/s | vs local | ms/token | "
                  "overhead ms/token |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, v in m["median"].items():
            lines.append(f"| {key} | {v['prefill_tps']:.0f} | {v['prefill_vs_local']:.2f} | "
                         f"{v['decode_tps']:.1f} | {v['decode_vs_local']:.2f} | "
                         f"{v['decode_ms_per_token']:.2f} | {v['overhead_ms_per_token']:+.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("XYBRID_LOG_LEVEL", "none")
    raise SystemExit(main())
