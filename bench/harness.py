"""``python -m bench``: xybrid against a plain C loop and llama-cpp-python.

Every measurement runs in a fresh subprocess of its contestant; contestants
alternate within each round (native, xybrid, llama-cpp-python, native, ...).
See bench/README.md for the method and how to read the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import native, peer_env, report

# xybrid.types.PREFIX_REUSE_MODES. The harness imports nothing from xybrid:
# run from the repository root, `xybrid` is the source tree, which has no
# compiled extension; the workers import the installed package.
PREFIX_REUSE_MODES = ("exact", "longest")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
WORKERS = BENCH_DIR / "workers"
RESULTS = BENCH_DIR / "results"

# --- prompts -------------------------------------------------------------------
# Tokenized once by xybrid; every contestant gets the same token ids.

# The grammar workload's prompt: under llama.cpp's json.gbnf Gemma writes a
# long JSON record from it (greedy, more than 256 tokens before the object closes).
JSON_PROMPT = (
    "A detailed JSON record of the lighthouse on the northern coast: its name, location, "
    "height, the list of its keepers with their years of service, and its history:\n"
)

SHORT_PROMPT = (
    "The history of the lighthouse keepers on the northern coast is a long one. "
    "In the winter of 1892, the keeper of the old stone tower wrote in his diary that"
)

_PARAGRAPHS = [
    "The river rises in the hills to the west of the town and runs for some forty miles before it "
    "reaches the sea. For most of its length it is slow and broad, and in the summer months children "
    "swim in the shallows below the mill while their parents sit on the grass banks and watch the boats.",
    "Trade came to the valley early. Wool from the upland farms was carried down to the market on "
    "carts, weighed in the old hall by the bridge and sold to merchants who shipped it along the "
    "coast. The hall still stands, though its scales were melted down for the war effort long ago.",
    "Each spring the council publishes a report on the state of the roads, the schools and the water "
    "supply. The reports are dry reading, yet they record, year after year, how a small community "
    "decided what it could afford, what it could postpone and what it could not do without.",
    "In the archive there is a letter from a schoolteacher who arrived in the autumn of 1911. She "
    "describes the cold of the classroom, the patience of the older pupils with the younger ones, and "
    "the way the whole village turned out to help when the roof of the school was damaged in a storm.",
    "Engineers who surveyed the estuary in the last century proposed a barrage to control the tides. "
    "The plan was debated for a decade, revised three times and finally abandoned, partly because of "
    "its cost and partly because the fishermen argued, with some justice, that it would ruin the catch.",
]


def long_text(min_words: int = 2400) -> str:
    parts: list[str] = []
    n = 0
    section = 1
    while n < min_words:
        for p in _PARAGRAPHS:
            parts.append(f"Section {section}. {p}")
            n += len(p.split()) + 2
            section += 1
    return "\n\n".join(parts)


USER_TURN = (
    "\n\nQuestion: Summarise the sections above in three sentences, naming the river, the hall and "
    "the barrage.\nAnswer:"
)

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1234}
CHAIN = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.0, "seed": 1234}


@dataclasses.dataclass
class Case:
    name: str
    group: str  # the --workloads name
    title: str
    kind: str  # decode | prefill | multiturn | memory
    model: str  # "gemma" | "tiny"
    prompt: str  # "short" | "long" | "turn2"
    n_predict: int
    sampler: dict[str, Any]
    reps: int = 1
    reps_cleared: int = 1
    warmup: int = 0
    busy: bool = False
    all_variants: bool = True
    prefix_len: int = 0
    threads: int = 0  # llama.cpp threads for this workload; 0: --threads
    n_predict_peer: int = 0  # llama-cpp-python's decoded tokens, when fewer; 0: n_predict
    grammar: str = ""  # GBNF every contestant constrains the output with


def json_grammar(llama_cpp_dir: Path) -> str:
    """llama.cpp's JSON grammar, from the pinned source tree."""
    return (Path(llama_cpp_dir) / "grammars" / "json.gbnf").read_text()


def make_cases(args: argparse.Namespace, n_long: int) -> list[Case]:
    n = args.n_predict
    n_tiny = args.n_predict_tiny
    quick = args.quick
    n_busy_peer = min(args.n_predict_busy_peer, args.n_predict_busy)
    cases = [
        Case("compute-greedy", "compute", f"Compute-bound: Gemma 3 270M, {n} tokens, greedy",
             "decode", "gemma", "short", n, GREEDY, warmup=8),
        Case("compute-sampled", "compute",
             f"Compute-bound: Gemma 3 270M, {n} tokens, top-k 40 / top-p 0.95 / temp 0.8",
             "decode", "gemma", "short", n, CHAIN, warmup=8),
        Case("overhead", "overhead", f"Overhead-bound: tiny random llama, {n_tiny} tokens, greedy",
             "decode", "tiny", "short", n_tiny, GREEDY, reps=2 if quick else 5, warmup=32),
        # Each cycle runs every variant idle, then with the busy thread.
        # llama-cpp-python decodes fewer tokens (--n-predict-busy-peer): it
        # re-detokenizes the whole completion at every step, one ctypes call
        # per token, and every call gives the GIL away and waits up to a
        # switch interval (5 ms) to get it back, so its time grows with the
        # square of the length (minutes per generation at 256 tokens). A
        # shorter run only flatters it. The others decode enough tokens that
        # the one GIL hand-back every Python caller pays at the end of a call
        # (up to 5 ms) does not dominate the rate.
        # On fewer threads than cores (--busy-threads), so that the busy
        # thread has a core of its own: with every core decoding, one more
        # busy thread slows any program down (the C loop beside a spinning C
        # thread keeps ~0.57 of its rate on 2 threads and 2 cores), and the
        # workload would measure core contention instead of the interpreter.
        Case("busy", "busy", f"Busy interpreter: tiny model, {args.n_predict_busy} tokens "
             f"(llama-cpp-python {n_busy_peer}), "
             f"{args.busy_threads} thread(s), idle and beside a busy Python thread",
             "decode", "tiny", "short", args.n_predict_busy, GREEDY, reps=1 if quick else 3, warmup=32,
             busy=True, threads=args.busy_threads,
             n_predict_peer=n_busy_peer),
        # xybrid checks the sampled token against the grammar and constrains
        # the whole vocabulary only when it is rejected (as llama.cpp's common
        # sampler does); the C loop and llama-cpp-python put the grammar first
        # in the chain, constraining every candidate at every step. Greedy
        # picks the same token either way.
        Case("grammar", "grammar", f"Grammar-constrained: Gemma 3 270M, {n} tokens, greedy, "
             "llama.cpp's json.gbnf", "decode", "gemma", "json", n, GREEDY, warmup=8,
             grammar=json_grammar(args.llama_cpp_dir)),
        Case("prefill", "prefill", f"Prefill: {n_long}-token prompt on Gemma 3 270M",
             "prefill", "gemma", "long", 1, GREEDY, warmup=8),
        Case("multiturn", "multiturn",
             f"Multi-turn: {n_long}-token shared prefix + a new user turn, TTFT",
             "multiturn", "gemma", "turn2", 1, GREEDY, reps=1 if quick else 3, reps_cleared=1),
        Case("memory", "memory", f"Memory: peak RSS over load + {n} greedy tokens on Gemma 3 270M",
             "memory", "gemma", "short", n, GREEDY, all_variants=False),
    ]
    for c in cases:
        if c.kind == "multiturn":
            c.prefix_len = n_long
    return [c for c in cases if c.group in args.workloads]


# --- contestants ---------------------------------------------------------------

@dataclasses.dataclass
class Contestant:
    key: str  # native | xybrid | peer
    variants: list[str]
    python: str | None = None
    worker: Path | None = None
    binary: Path | None = None
    skipped: str = ""


def native_command(binary: Path | None, model: str, tok_file: Path, *, n_predict: int, threads: int,
                   ctx: int, batch: int, sampler: dict[str, Any], warmup: int, prefix_len: int,
                   flash_attn: bool, grammar_file: Path | None) -> list[str]:
    """The C loop's command line in --serve mode."""
    s = sampler
    cmd = [str(binary), "--serve", "--model", model, "--tokens", str(tok_file),
           "--n-predict", str(n_predict), "--threads", str(threads),
           "--ctx", str(ctx), "--batch", str(batch), "--ubatch", str(batch),
           "--temp", repr(s["temperature"]), "--top-k", str(s["top_k"]), "--top-p", repr(s["top_p"]),
           "--min-p", repr(s["min_p"]), "--seed", str(s["seed"]),
           "--warmup", str(warmup), "--prefix-len", str(prefix_len)]
    if flash_attn:
        cmd.append("--flash-attn")
    if grammar_file is not None:
        cmd += ["--grammar", str(grammar_file)]
    return cmd


def worker_spec(model: str, tokens: list[int], *, n_predict: int, threads: int, ctx: int, batch: int,
                sampler: dict[str, Any], variants: list[str], warmup: int, prefix_len: int,
                flash_attn: bool, grammar: str | None, prefix_reuse: str) -> dict[str, Any]:
    """The spec a Python worker (bench/workers/) is started with."""
    return {
        "model": model, "prompt_tokens": tokens, "n_predict": n_predict,
        "threads": threads, "n_ctx": ctx, "n_batch": batch,
        "flash_attn": flash_attn, "sampler": sampler, "variants": variants,
        "warmup": warmup, "prefix_len": prefix_len,
        "grammar": grammar, "prefix_reuse": prefix_reuse,
    }


class WorkerError(Exception):
    pass


class Worker:
    """One contestant's process for one workload in one round.

    It loads the model, warms up and says "ready"; then the harness sends it
    one command at a time (a generation, a turn of the multi-turn workload)
    and reads one JSON line back, so that the contestants of a round can be
    alternated run by run.
    """

    def __init__(self, c: Contestant, case: Case, prep: dict[str, Any], args: argparse.Namespace,
                 tmp: Path, warmup: bool = True) -> None:
        self.c = c
        self.timeout = args.timeout
        self.busy_s = 0.0
        tokens = prep["tokens"][case.model][case.prompt]
        model = prep["models"][case.model]
        s = case.sampler
        n_predict = case.n_predict_peer if c.key == "peer" and case.n_predict_peer else case.n_predict
        threads = case.threads or args.threads
        if c.key == "native":
            tok_file = tmp / f"{case.model}-{case.prompt}.tokens"
            if not tok_file.exists():
                tok_file.write_text(" ".join(map(str, tokens)))
            grammar_file = None
            if case.grammar:
                grammar_file = tmp / f"{case.name}.gbnf"
                grammar_file.write_text(case.grammar)
            cmd = native_command(c.binary, model, tok_file, n_predict=n_predict, threads=threads,
                                 ctx=args.ctx, batch=args.batch, sampler=s,
                                 warmup=case.warmup if warmup else 0, prefix_len=case.prefix_len,
                                 flash_attn=args.flash_attn, grammar_file=grammar_file)
        else:
            spec = worker_spec(model, tokens, n_predict=n_predict, threads=threads, ctx=args.ctx,
                               batch=args.batch, sampler=s,
                               variants=c.variants if case.all_variants else c.variants[:1],
                               warmup=case.warmup if warmup else 0, prefix_len=case.prefix_len,
                               flash_attn=args.flash_attn, grammar=case.grammar or None,
                               prefix_reuse=args.backend_prefix_reuse)
            spec_file = tmp / f"spec-{c.key}-{case.name}.json"
            spec_file.write_text(json.dumps(spec))
            cmd = [str(c.python), str(c.worker), str(spec_file)]
        self.stderr = (tmp / f"stderr-{c.key}-{case.name}.txt").open("w+b")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, cwd=WORKERS)
        self.ready = self._read()
        self.busy_s += time.monotonic() - t0

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(self.timeout, self.proc.kill)
        timer.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise WorkerError(self._died())
                # Generated text may end inside a UTF-8 character: decode leniently.
                text = line.decode("utf-8", "replace").strip()
                if text.startswith("{"):
                    out = json.loads(text)
                    if "error" in out:
                        raise WorkerError(out["error"])
                    return dict(out)
        finally:
            timer.cancel()

    def _died(self) -> str:
        rc = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().decode("utf-8", "replace").strip().splitlines()[-12:]
        return f"the {self.c.key} process ended (exit code {rc}): " + "\n".join(tail)

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        if self.c.key == "native":
            words = [op] + (["busy"] if kw.get("busy") else [])
            if op == "turn2":
                words.append("reuse" if kw["reuse"] else "cleared")
            line = " ".join(words)
        else:
            line = json.dumps({"op": op, **kw})
        t0 = time.monotonic()
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(self._died()) from None
        out = self._read()
        self.busy_s += time.monotonic() - t0
        return out

    def close(self) -> dict[str, Any]:
        try:
            return self.ask("exit")
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def run_case(case: Case, active: list[Contestant], prep: dict[str, Any], args: argparse.Namespace,
             tmp: Path) -> dict[str, dict[str, Any]]:
    """One workload, one round: every contestant's figures, contestants
    alternated run by run (A B C A B C ...). Memory is measured per process:
    each contestant in turn loads, generates once and exits."""
    results: dict[str, dict[str, Any]] = {}
    workers: dict[str, Worker] = {}

    def fail(c: Contestant, exc: Exception) -> None:
        results[c.key] = {"error": str(exc)}
        w = workers.pop(c.key, None)
        if w:
            w.proc.kill()
            w.kill()

    def variants(c: Contestant) -> list[str]:
        return c.variants if case.all_variants else c.variants[:1]

    if case.kind == "memory":
        for c in active:
            try:
                w = Worker(c, case, prep, args, tmp, warmup=False)
                workers[c.key] = w
                run = w.ask("generate", variant=variants(c)[0])
                end = w.close()
                del workers[c.key]
                results[c.key] = {**w.ready, **end, "wall_s": w.busy_s,
                                  "variants": {variants(c)[0]: {"runs": [run]}}}
            except (WorkerError, OSError, ValueError) as exc:
                fail(c, exc)
        return results

    for c in active:
        try:
            workers[c.key] = Worker(c, case, prep, args, tmp)
            results[c.key] = {**workers[c.key].ready, "variants": {v: {} for v in variants(c)}}
        except (WorkerError, OSError, ValueError) as exc:
            fail(c, exc)

    def each(step: Any) -> None:
        for c in active:
            if c.key not in workers:
                continue
            try:
                step(c, workers[c.key])
            except (WorkerError, OSError, ValueError) as exc:
                fail(c, exc)

    def gen(c: Contestant, w: Worker) -> None:
        for v in variants(c):
            if case.busy:  # the idle reference, same process, same length
                run = w.ask("generate", variant=v, busy=False)
                results[c.key]["variants"][v].setdefault("idle_runs", []).append(run)
            run = w.ask("generate", variant=v, busy=case.busy)
            results[c.key]["variants"][v].setdefault("runs", []).append(run)

    def turn2(reuse: bool) -> Any:
        def step(c: Contestant, w: Worker) -> None:
            for v in variants(c):
                ttft = w.ask("turn2", variant=v, reuse=reuse)["ttft_ns"]
                key = "ttft_reuse_ns" if reuse else "ttft_cleared_ns"
                results[c.key]["variants"][v].setdefault(key, []).append(ttft)
        return step

    try:
        if case.kind == "multiturn":
            each(lambda c, w: w.ask("turn1"))
            for _ in range(case.reps):
                each(turn2(True))
            for _ in range(case.reps_cleared):
                each(turn2(False))
        else:
            for _ in range(case.reps):
                each(gen)
    except BaseException:  # interrupted: leave no process behind
        for w in workers.values():
            w.proc.kill()
            w.kill()
        raise
    for key, w in list(workers.items()):
        try:
            results[key].update(w.close())
            results[key]["wall_s"] = w.busy_s
        except (WorkerError, OSError, ValueError) as exc:
            results[key] = {"error": str(exc)}
    return results


# --- environment ---------------------------------------------------------------

def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat), while the
    harness itself is idle: what other programs take."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (at most ``limit_s``) until other programs use less than
    ``threshold`` of the CPUs; return the last measured busy fraction."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(4)
        busy = cpu_busy()
    return busy


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_prep(python: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    req = {
        "tiny_model": str(CACHE / "tiny-llama.gguf"),
        "llama_cpp_dir": str(args.llama_cpp_dir),
        "gemma": any(g in args.workloads for g in ("compute", "grammar", "prefill", "multiturn", "memory")),
        "gemma_path": args.model,
        "prompts": {
            "short": {"text": SHORT_PROMPT},
            "json": {"text": JSON_PROMPT},
            "long": {"text": long_text(), "length": args.prompt_tokens},
            "user": {"text": USER_TURN, "add_special": False},
        },
    }
    f = tmp / "prep.json"
    f.write_text(json.dumps(req))
    proc = subprocess.run([python, str(WORKERS / "prep.py"), str(f)], capture_output=True, text=True,
                          cwd=WORKERS)
    if proc.returncode != 0:
        raise SystemExit("bench: preparing the run failed (is xybrid installed in this interpreter? "
                         f"run `make bench` or scripts/setup.sh):\n{proc.stderr[-3000:]}")
    prep = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in prep["tokens"]:
        t = prep["tokens"][key]
        t["turn2"] = t["long"] + t["user"]
    return prep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    all_groups = ["compute", "overhead", "grammar", "prefill", "multiturn", "memory", "busy"]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="rounds run first and discarded (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round, no warm-up round, short generations and prompt; "
                        "results go to bench/.cache/results-quick/")
    p.add_argument("--workloads", default=",".join(all_groups),
                   help=f"comma-separated subset of {','.join(all_groups)} (default: all)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads, the same for everyone (default 2)")
    p.add_argument("--busy-threads", type=int, default=0,
                   help="llama.cpp threads in the busy-interpreter workload, the same for everyone "
                        "(default: cores - 1, so that the busy Python thread has a core)")
    p.add_argument("--n-predict", type=int, default=256, help="decoded tokens on Gemma (default 256)")
    p.add_argument("--n-predict-tiny", type=int, default=256, help="decoded tokens on the tiny model (default 256)")
    p.add_argument("--n-predict-busy", type=int, default=256,
                   help="decoded tokens in the busy-interpreter workload (default 256)")
    p.add_argument("--n-predict-busy-peer", type=int, default=64,
                   help="llama-cpp-python's decoded tokens in the busy-interpreter workload "
                        "(default 64: its time grows with the square of the length there)")
    p.add_argument("--backend-prefix-reuse", choices=PREFIX_REUSE_MODES, default="longest",
                   help="LlmConfig.prefix_reuse of the LlamaCppBackend variants (default longest, "
                        "the library's default and the longest common prefix as "
                        "llama-cpp-python reuses it)")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="length of the prefill/multi-turn prompt")
    p.add_argument("--ctx", type=int, default=2048, help="n_ctx for everyone (default 2048)")
    p.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch for everyone (default 512)")
    p.add_argument("--flash-attn", action="store_true", help="flash attention on, for everyone (default off)")
    p.add_argument("--model", default=None, help="GGUF for the compute/prefill/multi-turn/memory workloads "
                   "(default: xybrid's default model, Gemma 3 270M Q4_K_M)")
    p.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    p.add_argument("--xybrid-variants", default="engine,engine-stream,backend,backend-stream",
                   help="xybrid variants (bench/workers/xybrid_worker.py VARIANTS); the first is the primary")
    p.add_argument("--peer-variants", default="completion,completion-stream")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per command to a contestant")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="before each workload, wait up to this many seconds for other programs to "
                        "use under 25%% of the CPUs (0: do not wait; default 60)")
    p.add_argument("--rerender", metavar="JSON",
                   help="only rebuild the .md/.png of a finished run from its JSON (must be the only argument)")
    p.add_argument("--llama-cpp-dir", type=Path, default=REPO / "llama.cpp",
                   help="llama.cpp source tree (headers; vocab files for the tiny model)")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(all_groups)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds = 1 if args.rounds == 5 else args.rounds
        args.warmup_rounds = 0
        args.quiet_wait = min(args.quiet_wait, 10)
        args.n_predict = min(args.n_predict, 32)
        args.n_predict_tiny = min(args.n_predict_tiny, 128)
        args.n_predict_busy = min(args.n_predict_busy, 32)
        args.prompt_tokens = min(args.prompt_tokens, 300)
    if args.prompt_tokens + 80 > args.ctx:
        p.error("--prompt-tokens must leave room for the user turn in --ctx")
    if args.busy_threads <= 0:
        args.busy_threads = max(1, (os.cpu_count() or 2) - 1)
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # clean up workers and temporary files on SIGTERM too


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--rerender"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m bench --rerender bench/results/<date>.json")
        for path in report.rerender(Path(argv[1])):
            print(f"[bench] wrote {path}")
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out_dir = args.out or (CACHE / "results-quick" if args.quick else RESULTS)
    CACHE.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="xybrid-bench-") as tmpname:
        tmp = Path(tmpname)
        print(f"[bench] preparing (models, prompts, build facts) with {python}")
        prep = run_prep(python, args, tmp)
        if prep.get("headers_commit") and not str(prep["llama_cpp_commit"]).startswith(prep["headers_commit"][:7]):
            print(f"[bench] warning: headers in {args.llama_cpp_dir} are llama.cpp {prep['headers_commit']}, "
                  f"xybrid was built from {prep['llama_cpp_commit']}")
        n_long = len(prep["tokens"]["tiny"]["long"])

        contestants: list[Contestant] = []
        binary, reason, cc_cmd = native.build(Path(prep["lib_dir"]), args.llama_cpp_dir, CACHE)
        nat = Contestant("native", ["native"], binary=binary, skipped=reason)
        if binary:
            print(f"[bench] native loop: {binary.name} (linked to {prep['lib_dir']})")
        else:
            print(f"[bench] native loop skipped: {reason}")
        contestants.append(nat)
        contestants.append(Contestant("xybrid", args.xybrid_variants.split(","), python=python,
                                      worker=WORKERS / "xybrid_worker.py"))
        peer = Contestant("peer", args.peer_variants.split(","), worker=WORKERS / "peer_worker.py")
        if args.no_peer:
            peer.skipped = "--no-peer given"
        else:
            ppy, why = peer_env.ensure(log=print)
            if ppy:
                peer.python = str(ppy)
            else:
                peer.skipped = why
                print(f"[bench] llama-cpp-python skipped: {why}")
        contestants.append(peer)
        active = [c for c in contestants if not c.skipped]

        cases = make_cases(args, n_long)
        total_rounds = args.warmup_rounds + args.rounds
        records: list[dict[str, Any]] = []
        for rnd in range(total_rounds):
            warm = rnd < args.warmup_rounds
            label = "warm-up" if warm else f"round {rnd - args.warmup_rounds + 1}/{args.rounds}"
            for case in cases:
                busy = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else cpu_busy(0.5)
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                # The warm-up round only needs every process to run once.
                run = dataclasses.replace(case, reps=1, reps_cleared=1) if warm else case
                results = run_case(run, active, prep, args, tmp)
                parts = []
                for c in active:
                    res = results.get(c.key, {"error": "no result"})
                    res["loadavg_1min_before"] = load
                    res["cpu_busy_before"] = busy
                    parts.append(f"{c.key} " + ("ERROR" if "error" in res else f"{res.get('wall_s', 0):.1f}s"))
                    records.append({"round": rnd - args.warmup_rounds, "warmup": warm, "case": case.name,
                                    "contestant": c.key, "result": res})
                print(f"[bench] {label:>12}  {case.name:<16} {time.monotonic() - t0:6.1f} s  "
                      f"(others' CPU use before: {busy:.0%}; {', '.join(parts)})", flush=True)
                for c in active:
                    if "error" in results.get(c.key, {}):
                        print(f"[bench]   {c.key}: {results[c.key]['error']}", flush=True)

    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "platform": prep["platform"],
        "python": prep["python"],
        "xybrid_version": prep["xybrid_version"],
        "llama_cpp_commit": prep["llama_cpp_commit"],
        "build_info": prep["build_info"],
        "system_info": prep["system_info"],
        "models": prep["models"],
        "model_descriptions": prep["model_descriptions"],
        "n_prompt": {k: {p: len(v) for p, v in t.items()} for k, t in prep["tokens"].items()},
        "native_compile": " ".join(cc_cmd),
        "peer": {"package": f"llama-cpp-python=={peer_env.PEER_VERSION}",
                 "cmake_args": peer_env.CMAKE_ARGS, "skipped": peer.skipped},
        "native_skipped": nat.skipped,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "loadavg_jobs": sorted(r["result"]["loadavg_1min_before"] for r in records),
        "cpu_busy_jobs": sorted(r["result"]["cpu_busy_before"] for r in records if not r["warmup"]),
        "wall_s": time.monotonic() - started,
    }
    analysis = report.analyse(records, cases, contestants, meta)
    paths = report.write_all(analysis, records, meta, out_dir, stamp, latest=not args.quick or args.out is not None)
    print()
    print(analysis["markdown"])
    print(f"[bench] done in {meta['wall_s'] / 60:.1f} min; wrote " + ", ".join(str(p) for p in paths))
    return 0
