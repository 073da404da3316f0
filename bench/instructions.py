"""``python -m bench.instructions``: instructions per token, C loop against xybrid.

Wall-clock rates on a shared machine swing by several per cent from one run
to the next; instruction counts do not. This runs the C loop and xybrid's
variants under callgrind, each generating N1 and then N2 greedy tokens from
the same prompt in a fresh process, and reports the marginal instructions
per token, (I(N2) - I(N1)) / (N2 - N1), of the whole process (every thread:
the loop, a streaming consumer, Python). Loading, prefill and start-up cancel
out. Everything runs on one llama.cpp thread (callgrind serialises threads).

valgrind cannot execute AVX-512, which a ``GGML_NATIVE`` build of llama.cpp
uses on CPUs that have it, so this measures a second build of the same
llama.cpp commit with ``GGML_NATIVE=OFF`` (AVX2): built once into
``bench/.cache/llama-no-native`` (minutes) unless ``--libs`` names one. The
installed xybrid package is copied to ``bench/.cache/instructions-overlay``
with those libraries beside its extension (it loads them through its
``$ORIGIN`` RUNPATH), and the C loop is linked against the same files.
llama-cpp-python builds its own llama.cpp natively and is not measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import native
from bench.harness import CACHE, GREEDY, REPO, RESULTS, WORKERS, native_command, run_prep, worker_spec

LIBS = ["libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libmtmd.so"]
TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def build_libs(llama_cpp_dir: Path, out: Path) -> Path:
    if all((out / name).is_file() for name in LIBS):
        return out
    print(f"[instructions] building llama.cpp with GGML_NATIVE=OFF into {out} (once; minutes)", flush=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_llama_cpp.py"), "--source", str(llama_cpp_dir),
                    "--build", str(CACHE / "llama-no-native-build"), "--out", str(out), "--native", "false",
                    *LIBS], check=True)
    return out


def make_overlay(python: str, libs: Path, overlay: Path) -> Path:
    """A copy of the installed xybrid package whose extension loads ``libs``."""
    installed = Path(subprocess.check_output(
        [python, "-c", "import os, xybrid; print(os.path.dirname(xybrid.__file__))"],
        cwd=tempfile.gettempdir(), text=True).strip())
    if overlay.exists():
        shutil.rmtree(overlay)
    shutil.copytree(installed, overlay / "xybrid", ignore=shutil.ignore_patterns("__pycache__"))
    for name in LIBS:
        shutil.copy2(libs / name, overlay / "xybrid" / "_native" / name)
    return overlay


def callgrind(cmd: list[str], stdin: str, out_file: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Run ``cmd`` under callgrind; return (total instructions, JSON lines it printed)."""
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *cmd],
                          input=stdin.encode(), capture_output=True, env=env, cwd=cwd, timeout=3600)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-15:]
        raise SystemExit(f"[instructions] {cmd[0]} failed under callgrind (exit {proc.returncode}):\n"
                         + "\n".join(tail))
    match = TOTALS.search(out_file.read_text())
    if not match:
        raise SystemExit(f"[instructions] no totals in {out_file}")
    lines = [json.loads(x) for x in proc.stdout.decode("utf-8", "replace").splitlines() if x.startswith("{")]
    return int(match.group(1)), lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF (default: xybrid's default model, Gemma 3 270M)")
    p.add_argument("--tiny", action="store_true", help="the overhead-bound tiny model instead")
    p.add_argument("--tokens", default="8,24", help="the two generation lengths N1,N2 (default 8,24)")
    p.add_argument("--variants", default="engine,engine-stream,backend,backend-stream",
                   help="xybrid variants (bench/workers/xybrid_worker.py)")
    p.add_argument("--libs", type=Path, default=None,
                   help="folder with a non-AVX-512 build of the same llama.cpp (default: build one)")
    p.add_argument("--llama-cpp-dir", type=Path, default=REPO / "llama.cpp")
    p.add_argument("--out", type=Path, default=RESULTS / "instructions")
    args = p.parse_args(argv)
    n1, n2 = (int(x) for x in args.tokens.split(","))
    if not 1 <= n1 < n2:
        p.error("--tokens needs 1 <= N1 < N2")
    if not shutil.which("valgrind"):
        raise SystemExit("[instructions] valgrind is not installed")
    python = sys.executable
    libs = args.libs or build_libs(args.llama_cpp_dir, CACHE / "llama-no-native")
    overlay = make_overlay(python, libs, CACHE / "instructions-overlay")
    binary, reason, _ = native.build(libs, args.llama_cpp_dir, CACHE)
    if not binary:
        raise SystemExit(f"[instructions] cannot build the C loop: {reason}")
    variants = [v for v in args.variants.split(",") if v]

    with tempfile.TemporaryDirectory(prefix="xybrid-instr-") as tmpname:
        tmp = Path(tmpname)
        prep_args = argparse.Namespace(llama_cpp_dir=args.llama_cpp_dir, workloads=["compute"],
                                       model=args.model, prompt_tokens=300)
        prep = run_prep(python, prep_args, tmp)
        key = "tiny" if args.tiny else "gemma"
        model, tokens = prep["models"][key], prep["tokens"][key]["short"]
        tok_file = tmp / "prompt.tokens"
        tok_file.write_text(" ".join(map(str, tokens)))
        # A fixed hash seed: str hashing is randomised per process otherwise,
        # which moves Python's share of the count from run to run.
        env = {**os.environ, "PYTHONPATH": str(overlay), "PYTHONHASHSEED": "0"}
        counts: dict[str, dict[int, int]] = {}
        for n in (n1, n2):
            cmd = native_command(binary, model, tok_file, n_predict=n, threads=1, ctx=1024, batch=512,
                                 sampler=GREEDY, warmup=0, prefix_len=0, flash_attn=False, grammar_file=None)
            print(f"[instructions] native, {n} tokens", flush=True)
            total, lines = callgrind(cmd, "generate\nexit\n", tmp / f"native-{n}.out")
            check_length(lines, n, "native")
            counts.setdefault("native", {})[n] = total
            for v in variants:
                spec = worker_spec(model, tokens, n_predict=n, threads=1, ctx=1024, batch=512, sampler=GREEDY,
                                   variants=[v], warmup=0, prefix_len=0, flash_attn=False, grammar=None,
                                   prefix_reuse="longest")
                spec_file = tmp / f"spec-{v}-{n}.json"
                spec_file.write_text(json.dumps(spec))
                print(f"[instructions] xybrid {v}, {n} tokens", flush=True)
                total, lines = callgrind([python, str(WORKERS / "xybrid_worker.py"), str(spec_file)],
                                         json.dumps({"op": "generate", "variant": v}) + "\n"
                                         + json.dumps({"op": "exit"}) + "\n",
                                         tmp / f"{v}-{n}.out", env=env, cwd=WORKERS)
                check_length(lines, n, v)
                counts.setdefault(v, {})[n] = total

    per_token = {k: (c[n2] - c[n1]) / (n2 - n1) for k, c in counts.items()}
    base = per_token["native"]
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    rows = [{"contestant": k, "instructions_per_token": v, "vs_native": v / base,
             "extra_per_token": v - base, "totals": counts[k]} for k, v in per_token.items()]
    result = {"date": stamp, "model": model, "prompt_tokens": len(tokens), "n1": n1, "n2": n2,
              "libs": str(libs), "rows": rows}
    lines_md = [f"# Instructions per generated token — {stamp}", "",
                f"callgrind, whole process, marginal over {n1} → {n2} greedy tokens; model `{Path(model).name}`, "
                f"{len(tokens)}-token prompt, 1 llama.cpp thread, llama.cpp built with GGML_NATIVE=OFF "
                "(valgrind cannot run AVX-512). Reproduce: `python -m bench.instructions"
                + (" --tiny" if args.tiny else "") + f" --tokens {n1},{n2}`.", "",
                "| contestant | instructions per token | ÷ native | extra per token |", "|---|---|---|---|"]
    for r in rows:
        lines_md.append(f"| {r['contestant']} | {r['instructions_per_token']:,.0f} | {r['vs_native']:.5f} | "
                        f"{r['extra_per_token']:+,.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{stamp}{'-tiny' if args.tiny else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text("\n".join(lines_md) + "\n")
    print("\n".join(lines_md))
    print(f"[instructions] wrote {args.out / name}.md and .json")
    return 0


def check_length(lines: list[dict[str, Any]], n: int, who: str) -> None:
    runs = [x for x in lines if "n_tokens" in x]
    if not runs or runs[0]["n_tokens"] != n:
        got = runs[0]["n_tokens"] if runs else "no run"
        raise SystemExit(f"[instructions] {who} generated {got} tokens, {n} wanted (an early end of "
                         "generation would skew the per-token count)")


if __name__ == "__main__":
    sys.exit(main())
