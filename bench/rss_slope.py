"""``python -m bench.rss_slope``: does any kind of call leave memory behind?

For each kind of call (successful generations of every flavour, embeddings,
multimodal, batched and server requests, and each class of failed call), a
fresh child process builds what the call needs, makes ``--warmup`` calls
(allocator pools, compute buffers, caches filling up), then ``--calls``
more, reading its resident set size every ``--every`` calls. Each reading
comes after ``gc.collect()`` and glibc's ``malloc_trim(0)``: freed heap
memory otherwise stays resident in steps of tens of MiB depending on which
arena a thread used, and what is left after a trim is what is still
allocated. The figure per kind is the least-squares slope of RSS over the
call number, in bytes per call, and the growth from the first reading to the
last; a kind that leaks even 1 KiB a call grows by 1 MiB over 1,000 calls.

Models: the tiny random llama of ``xybrid.testing`` (and its vision
projector, for the multimodal kind); with ``--gemma`` also plain generation
on Gemma 3 270M. Nothing is timed: the figures hold under load.

Results go to ``bench/results/rss-slope/`` (Markdown and JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.report import write_dated

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "rss-slope"

# kind -> what it does, for the report
KINDS: dict[str, str] = {
    "generate": "chat `generate`, 8 tokens, a different prompt each call",
    "stream_full": "chat `stream`, every piece read",
    "stream_abandoned": "chat `stream` of up to 64 tokens, dropped after its first piece",
    "chat_tools": "chat with a tool, `tool_choice=\"required\"` (grammar-constrained call)",
    "json_schema": "`json_schema=` constrained reply",
    "grammar": "GBNF `grammar=` constrained reply",
    "logprobs": "`logprobs=5`, 8 tokens",
    "embeddings": "`Embedder.embed` of two texts",
    "multimodal": "chat with a 24×24 image (tiny vision projector)",
    "batched_generate": "`generate` on a `parallel=4` backend (native scheduler)",
    "generate_batch": "`generate_batch` of 4 raw prompts, `parallel=4`",
    "server_http": "`POST /v1/chat/completions` to an in-process `xybrid serve` app over loopback HTTP",
    "fail_grammar": "refused grammar (empty character range): `GrammarError`",
    "fail_prompt_too_long": "two prompts too long for a 512-token context (one refused by its length before tokenizing, one of ~900 tokens after): `ContextOverflowError`",
    "fail_sampling": "bad sampling parameter (top_p=2, then top_k=2**40): `InvalidInputError`",
    "fail_media": "an image that is not one: typed error",
    "fail_load_checker": "load of a malformed GGUF that `gguf_check` refuses: `ModelLoadError`",
    "fail_load_llama": "load of a GGUF that passes the checker and llama.cpp refuses (no tensors): `ModelLoadError`",
    "fail_load_template": "load whose chat template does not compile (after the context exists): `ModelLoadError`",
    "generate_gemma": "chat `generate` on Gemma 3 270M, 8 tokens",
}
DEFAULT_KINDS = [k for k in KINDS if k != "generate_gemma"]

# A leak of 1 KiB per call is 1 MiB over 1,000 calls; below that the
# readings move by whole pages with what the allocator happens to keep.
FLAT_BYTES_PER_CALL = 1024


def _use_installed_xybrid() -> None:
    from bench.concurrent import _use_installed_xybrid as use

    use()


# --------------------------------------------------------------------------
# the child: one kind of call
# --------------------------------------------------------------------------


def _rss_reader() -> Callable[[], int]:
    import psutil

    proc = psutil.Process()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(libc, "malloc_trim", None)

    def rss() -> int:
        gc.collect()
        if trim is not None:
            trim(0)
        return int(proc.memory_info().rss)

    return rss


def _setup(kind: str, paths: dict[str, str]) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(call(i), close) for one kind."""
    import numpy as np

    from xybrid import ChatMessage, GenerationConfig, LlamaCppBackend, LlmConfig, XybridError

    tiny = paths["tiny"]

    def backend(path: str = tiny, **kw: Any) -> Any:
        kw.setdefault("context_length", 512)
        return LlamaCppBackend(LlmConfig(path, n_threads=1, **kw))

    def chat(i: int, **media: Any) -> list[Any]:
        return [ChatMessage.user(f"Question {i}: what comes after {i % 97}?", **media)]

    short = GenerationConfig(max_tokens=8, temperature=0.7, seed=1)

    if kind in ("generate", "generate_gemma", "stream_full", "stream_abandoned", "chat_tools",
                "json_schema", "grammar", "logprobs", "fail_grammar", "fail_prompt_too_long",
                "fail_sampling"):
        llm = backend(paths["gemma"] if kind == "generate_gemma" else tiny,
                      context_length=1024 if kind == "generate_gemma" else 512)
        if kind in ("generate", "generate_gemma"):
            def call(i: int) -> None:
                llm.generate(chat(i), short)
        elif kind == "stream_full":
            def call(i: int) -> None:
                for _ in llm.stream(chat(i), GenerationConfig(max_tokens=16, temperature=0.7, seed=i)):
                    pass
        elif kind == "stream_abandoned":
            def call(i: int) -> None:
                it = llm.stream(chat(i), GenerationConfig(max_tokens=64, temperature=0.7, seed=i))
                next(it)
                del it  # dropped, not closed: the generator's finaliser cancels it
        elif kind == "chat_tools":
            weather = {"type": "function", "function": {
                "name": "get_weather", "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                               "required": ["city"]}}}

            def call(i: int) -> None:
                try:
                    llm.generate(chat(i), GenerationConfig(tools=[weather], tool_choice="required",
                                                           max_tokens=48, temperature=0.7, seed=i))
                except XybridError:  # a call cut short by max_tokens does not parse
                    pass
        elif kind == "json_schema":
            schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["n"]}

            def call(i: int) -> None:
                llm.generate(chat(i), GenerationConfig(json_schema=schema, max_tokens=16, temperature=0.7, seed=i))
        elif kind == "grammar":
            def call(i: int) -> None:
                llm.generate(chat(i), GenerationConfig(grammar='root ::= ("yes" | "no") " " [0-9]',
                                                       max_tokens=8, temperature=0.7, seed=i))
        elif kind == "logprobs":
            def call(i: int) -> None:
                llm.generate(chat(i), GenerationConfig(max_tokens=8, logprobs=5, temperature=0.7, seed=i))
        elif kind == "fail_grammar":
            def call(i: int) -> None:
                try:
                    llm.generate(chat(i), GenerationConfig(grammar=f'root ::= "a{i}" [b-a]', max_tokens=8))
                except XybridError:
                    return
                raise SystemExit("the empty grammar was accepted")
        elif kind == "fail_prompt_too_long":
            # one refused by its length in characters before it is tokenized,
            # one tokenized (about 900 tokens) and refused by its token count
            huge = " ".join(f"w{j}" for j in range(3000))
            over = " ".join(f"w{j}" for j in range(300))

            def call(i: int) -> None:
                for prompt in (f"{i} {huge}", f"{i} {over}"):
                    try:
                        llm.generate_raw(prompt, short)
                    except XybridError:
                        continue
                    raise SystemExit("the prompt was accepted")
        else:  # fail_sampling
            def call(i: int) -> None:
                for bad in ({"top_p": 2.0}, {"top_k": 2 ** 40}):
                    try:
                        llm.generate(chat(i), GenerationConfig(max_tokens=8, **bad))  # type: ignore[arg-type]
                    except XybridError:
                        continue
                    raise SystemExit(f"{bad} was accepted")
        return call, llm.unload

    if kind == "embeddings":
        from xybrid.embeddings import Embedder

        emb = Embedder(tiny, pooling="mean", context_length=512, n_threads=1)

        def call(i: int) -> None:
            emb.embed([f"first document {i}", f"second document {i % 7}"])
        return call, emb.close

    if kind in ("multimodal", "fail_media"):
        llm = backend(paths["vlm_model"], mmproj_path=paths["vlm_mmproj"])
        rgb = np.zeros((24, 24, 3), dtype=np.uint8)
        rgb[:, :, 0] = np.arange(24, dtype=np.uint8)[None, :] * 10
        if kind == "multimodal":
            def call(i: int) -> None:
                llm.generate(chat(i, images=[rgb]), GenerationConfig(max_tokens=4, temperature=0.7, seed=i))
        else:
            def call(i: int) -> None:
                try:
                    llm.generate(chat(i, images=[b"\x89PNG\r\n\x1a\n" + bytes(i % 251 for _ in range(64))]),
                                 short)
                except XybridError:
                    return
                raise SystemExit("the broken image was accepted")
        return call, llm.unload

    if kind in ("batched_generate", "generate_batch"):
        llm = backend(parallel=4, context_length=1024)
        if kind == "batched_generate":
            def call(i: int) -> None:
                llm.generate(chat(i), short)
        else:
            def call(i: int) -> None:
                llm.generate_batch([f"Story {i}.{j}:" for j in range(4)], short, raw=True)
        return call, llm.unload

    if kind == "server_http":
        return _server_setup(tiny)

    if kind.startswith("fail_load_"):
        path = {"fail_load_checker": paths["bad_checker"], "fail_load_llama": paths["bad_llama"],
                "fail_load_template": tiny}[kind]
        extra = {"chat_template": "{% for m in messages %}{{ m.content "} if kind == "fail_load_template" else {}

        def call(i: int) -> None:
            try:
                LlamaCppBackend(LlmConfig(path, context_length=256, n_threads=1, **extra))
            except XybridError:
                return
            raise SystemExit(f"{path} loaded")
        return call, lambda: None

    raise SystemExit(f"unknown kind {kind!r}")


def _server_setup(model: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    import http.client
    import socket
    import threading

    import uvicorn

    from xybrid.server.app import create_app
    from xybrid.server.settings import ServerSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = ServerSettings(model=model, port=port, parallel=2, ctx_size=1024, threads=1, log_requests=False)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    while request("GET", "/health")[0] != 200:  # the model loads after start-up
        if time.monotonic() > deadline:
            raise SystemExit("the server's model did not load")
        time.sleep(0.05)

    def call(i: int) -> None:
        status, data = request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Question {i}: what comes after {i % 97}?"}],
            "max_tokens": 8, "temperature": 0.7, "seed": i})
        if status != 200:
            raise SystemExit(f"HTTP {status}: {data[:300]!r}")

    def close() -> None:
        conn.close()
        server.should_exit = True
        thread.join(30)
    return call, close


def child(kind: str, paths: dict[str, str], calls: int, warmup: int, every: int) -> dict[str, Any]:
    rss = _rss_reader()
    rss_start = rss()
    call, close = _setup(kind, paths)
    t0 = time.perf_counter()
    for i in range(warmup):
        call(i)
    samples: list[tuple[int, int]] = [(0, rss())]
    for n in range(1, calls + 1):
        call(warmup + n)
        if n % every == 0:
            samples.append((n, rss()))
    elapsed = time.perf_counter() - t0
    close()
    return {"kind": kind, "calls": calls, "warmup": warmup, "rss_before_setup": rss_start,
            "samples": samples, "seconds": elapsed, **_fit(samples)}


def _fit(samples: list[tuple[int, int]]) -> dict[str, float]:
    xs = [float(x) for x, _ in samples]
    ys = [float(y) for _, y in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"slope_bytes_per_call": slope, "growth_bytes": ys[-1] - ys[0],
            "spread_bytes": max(ys) - min(ys), "rss_first": ys[0], "rss_last": ys[-1]}


# --------------------------------------------------------------------------
# the parent
# --------------------------------------------------------------------------


def _bad_shape_file(src: Path, out: Path) -> Path:
    """``src`` with the second dimension of ``blk.0.attn_k.weight`` halved:
    a shape the checker refuses."""
    import struct

    from xybrid.gguf_check import read_gguf

    t = read_gguf(src).tensors["blk.0.attn_k.weight"]
    data = bytearray(src.read_bytes())
    dim1 = t.info_offset + 8 + len(t.name.encode()) + 4 + 8
    struct.pack_into("<q", data, dim1, t.dims[1] // 2)
    out.write_bytes(data)
    return out


def _prepare(tmp: Path, gemma: bool) -> dict[str, str]:
    from xybrid.testing.tiny_models import vocab_path, write_tiny_llama, write_tiny_vlm

    llama_cpp = REPO / "llama.cpp"
    tiny = write_tiny_llama(tmp / "tiny.gguf", llama_cpp_dir=llama_cpp)
    model, mmproj = write_tiny_vlm(tmp / "vlm", llama_cpp_dir=llama_cpp)
    paths = {"tiny": str(tiny), "vlm_model": str(model), "vlm_mmproj": str(mmproj),
             "bad_checker": str(_bad_shape_file(tiny, tmp / "bad-shape.gguf")),
             # a vocabulary-only file of an architecture the checker does not
             # judge by shape: llama.cpp finds no token_embd.weight
             "bad_llama": str(vocab_path("gpt-2", llama_cpp)), "gemma": ""}
    if gemma:
        from xybrid.default_model import default_model_path

        paths["gemma"] = str(default_model_path())
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rss_slope", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--every", type=int, default=50, help="calls between RSS readings")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--gemma", action="store_true", help="add generate_gemma (1,000 Gemma calls, minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for <timestamp>.{json,md} and latest.{json,md} (default: %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    _use_installed_xybrid()
    if opts.child:
        result = child(opts.child, json.loads(opts.paths), opts.calls, opts.warmup, opts.every)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    kinds = opts.kinds.split(",") + (["generate_gemma"] if opts.gemma else [])
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kinds: {', '.join(unknown)}")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "calls": opts.calls,
                              "warmup": opts.warmup, "every": opts.every, "kinds": {}}
    with tempfile.TemporaryDirectory(prefix="xybrid-rss-slope-") as tmpname:
        paths = _prepare(Path(tmpname), "generate_gemma" in kinds)
        env = dict(os.environ, XYBRID_LOG_LEVEL="none")
        for kind in kinds:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.rss_slope", "--child", kind, "--paths", json.dumps(paths),
                 "--calls", str(opts.calls), "--warmup", str(opts.warmup), "--every", str(opts.every)],
                cwd=REPO, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                report["kinds"][kind] = {"kind": kind, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
                print(f"[rss] {kind}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            report["kinds"][kind] = res
            print(f"[rss] {kind}: {res['slope_bytes_per_call']:+.0f} B/call, growth "
                  f"{res['growth_bytes'] / 2**20:+.2f} MiB over {opts.calls} calls ({res['seconds']:.0f} s)",
                  flush=True)
    text = render(report)
    write_dated(opts.out, time.strftime("%Y-%m-%d_%H%M%S"), text, report)
    print(text)
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [
        "# RSS slope per call",
        "",
        f"{report['date']}; each kind in a fresh process: {report['warmup']} warm-up calls, then "
        f"{report['calls']} calls with an RSS reading (after `gc.collect()` and `malloc_trim(0)`) every "
        f"{report['every']}. Slope: least squares over the readings. Flat: under "
        f"{FLAT_BYTES_PER_CALL} B/call (1 MiB per 1,000 calls).",
        "",
        "| kind | what | slope (B/call) | growth over the calls (MiB) | spread (MiB) | RSS (MiB) | flat |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for kind, r in report["kinds"].items():
        if "error" in r:
            lines.append(f"| {kind} | {KINDS.get(kind, '')} | failed | | | | |")
            continue
        flat = "yes" if abs(r["slope_bytes_per_call"]) < FLAT_BYTES_PER_CALL else "**no**"
        lines.append(f"| {kind} | {KINDS.get(kind, '')} | {r['slope_bytes_per_call']:+.0f} | "
                     f"{r['growth_bytes'] / 2**20:+.2f} | {r['spread_bytes'] / 2**20:.2f} | "
                     f"{r['rss_last'] / 2**20:.0f} | {flat} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("XYBRID_LOG_LEVEL", "none")
    raise SystemExit(main())
