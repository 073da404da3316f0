"""``python -m bench server``: OpenAI-compatible servers under N concurrent streaming clients.

For each model (Gemma 3 270M, the tiny random llama) and each N in
``--clients`` (default 1, 4, 8, 16), every contestant is started as its own
process with N slots and the same threads, context and flash-attention
setting; N clients then each stream one ``/v1/completions`` request of
``--tokens`` tokens (same prompt, greedy) at once. Reported per run:
aggregate tokens/s (all completion tokens / wall time of the batch), TTFT
p50/p95 (request sent to first text) and ITL p95 (gap between text events,
divided by the tokens they carry).

Contestants: ``xybrid serve``; llama.cpp's ``llama-server`` when a binary is
given (``--llama-server PATH``, built from the pinned llama.cpp source with
``cmake --build ... --target llama-server``); llama-cpp-python's server
(``llama_cpp.server``) when the bench's peer venv has it. Missing ones are
skipped and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache"
PROMPT = "The history of the printing press begins"
STARTUP_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PREP = """
import json, os, sys
from pathlib import Path
out = {}
for name in sys.argv[1].split(","):
    if name == "gemma":
        from xybrid.default_model import default_model_path
        out["gemma"] = str(default_model_path())
    elif name == "tiny":
        tiny = Path(sys.argv[2])
        if not tiny.is_file():
            from xybrid.testing.tiny_models import write_tiny_llama
            tiny.parent.mkdir(parents=True, exist_ok=True)
            tmp = tiny.with_suffix(".partial")
            write_tiny_llama(tmp, llama_cpp_dir=sys.argv[3])
            os.replace(tmp, tiny)
        out["tiny"] = str(tiny)
    else:
        out[Path(name).stem] = name
print(json.dumps(out))
"""


def _models(names: list[str], llama_cpp_dir: Path) -> dict[str, str]:
    # In a process outside the repository: the installed package, not the
    # source tree (which has no compiled extension), is imported.
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", _PREP, ",".join(names),
                               str(CACHE / "tiny-llama.gguf"), str(llama_cpp_dir.resolve())],
                              cwd=cwd, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _command(contestant: str, args: argparse.Namespace, model: str, n: int,
             port: int) -> list[str] | None:
    ctx = args.ctx_per_slot * n
    if contestant == "xybrid":
        return [sys.executable, "-m", "xybrid", "serve", "--model", model, "--port", str(port),
                "--parallel", str(n), "--ctx-size", str(ctx), "--threads", str(args.threads),
                "--max-tokens-limit", str(args.tokens), "--no-log-requests"]
    if contestant == "llama-server":
        if args.llama_server is None:
            return None
        cmd = [str(args.llama_server), "-m", model, "--port", str(port), "-np", str(n),
               "-c", str(ctx), "-t", str(args.threads), "-tb", str(args.threads),
               "--flash-attn", "on" if args.flash_attn else "off", "--no-webui"]
        return cmd
    if contestant == "llama-cpp-python":
        py = CACHE / "venv-llama-cpp-python" / "bin" / "python"
        if not py.is_file():
            return None
        return [str(py), "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                "--n_ctx", str(ctx), "--n_threads", str(args.threads)]
    raise SystemExit(f"unknown contestant {contestant!r}")


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return  # llama-cpp-python's server has no /health
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


async def _one(client: Any, base: str, tokens: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first: float | None = None
    events: list[tuple[float, int]] = []  # (time, tokens carried)
    usage_tokens: int | None = None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line[6:] == "[DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage_tokens = int(obj["usage"]["completion_tokens"])
            for ch in obj.get("choices") or []:
                if ch.get("text"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    events.append((now, 1))
    end = time.perf_counter()
    n_tokens = usage_tokens if usage_tokens is not None else len(events)
    gaps = []
    if len(events) > 1 and n_tokens:
        per_event = n_tokens / len(events)  # xybrid's events may carry several tokens
        gaps = [(b[0] - a[0]) / per_event for a, b in zip(events, events[1:])]
    return {"ttft_s": (first or end) - t0, "tokens": n_tokens, "gaps": gaps, "end": end,
            "start": t0}


async def _batch(base: str, n: int, tokens: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as c:
        await _one(c, base, 8)  # warm-up
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[_one(c, base, tokens) for _ in range(n)])
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft_s"] for r in runs)
    gaps = sorted(g for r in runs for g in r["gaps"])
    total = sum(r["tokens"] for r in runs)

    def pct(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"clients": n, "completion_tokens": total, "wall_s": wall,
            "aggregate_tps": total / wall if wall > 0 else None,
            "ttft_p50_ms": statistics.median(ttfts) * 1000,
            "ttft_p95_ms": (pct(ttfts, 0.95) or 0) * 1000,
            "itl_p95_ms": (pct(gaps, 0.95) or 0) * 1000 if gaps else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = _models(args.models.split(","), args.llama_cpp_dir)
    results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()},
                               "runs": [], "skipped": {}}
    for label, model in models.items():
        for contestant in args.contestants.split(","):
            for n in [int(x) for x in args.clients.split(",")]:
                port = _free_port()
                cmd = _command(contestant, args, model, n, port)
                if cmd is None:
                    results["skipped"][contestant] = "not available (see --help)"
                    break
                base = f"http://127.0.0.1:{port}"
                with tempfile.TemporaryDirectory() as cwd, \
                        open(Path(cwd) / "server.log", "wb") as log:
                    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                    try:
                        _wait_ready(proc, base)
                        row = asyncio.run(_batch(base, n, args.tokens))
                    except Exception as exc:  # report and go on with the others
                        row = {"clients": n, "error": f"{type(exc).__name__}: {exc}"}
                    finally:
                        proc.terminate()
                        try:
                            proc.wait(30)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                row.update(model=label, contestant=contestant)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    return results


def render(results: dict[str, Any]) -> str:
    lines = ["# Server benchmark", "",
             "| model | contestant | clients | tokens | aggregate tok/s | TTFT p50 ms | "
             "TTFT p95 ms | ITL p95 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.1f}"

    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['contestant']} | {r['clients']} | "
                         f"error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['contestant']} | {r['clients']} | "
                     f"{r['completion_tokens']} | {f(r['aggregate_tps'])} | "
                     f"{f(r['ttft_p50_ms'])} | {f(r['ttft_p95_ms'])} | {f(r['itl_p95_ms'])} |")
    for name, why in results["skipped"].items():
        lines.append(f"\n{name}: skipped, {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench server", description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,4,8,16", help="concurrent clients, comma-separated")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--models", default="gemma,tiny", help="gemma, tiny or GGUF paths")
    p.add_argument("--contestants", default="xybrid,llama-server,llama-cpp-python")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-per-slot", type=int, default=512, help="context cells per slot")
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--llama-server", type=Path,
                   default=(CACHE / "llama-server") if (CACHE / "llama-server").is_file() else None,
                   help="llama-server binary (default: bench/.cache/llama-server if present)")
    p.add_argument("--llama-cpp-dir", type=Path, default=BENCH_DIR.parent / "llama.cpp")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "server-latest")
    args = p.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
