"""The ``xybrid`` command line: generate, chat, info, serve, rpc-server.

``xybrid generate "prompt"`` continues a raw prompt (BOS added, no chat
template) on the default model or ``--model PATH`` and streams the text to
the terminal as the native loop releases it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from xybrid.errors import XybridError

__all__ = ["main", "build_parser"]


def _version_text() -> str:
    from xybrid import __llama_cpp_commit__, __version__
    from xybrid._build_info import BUILD_TYPE, CUDA, NATIVE, RPC

    flags = [f"native={'on' if NATIVE else 'off'}", f"cpu={_cpu_variant()}",
             f"cuda={'on' if CUDA else 'off'}", f"rpc={'on' if RPC else 'off'}", BUILD_TYPE]
    return f"xybrid {__version__} (llama.cpp {__llama_cpp_commit__}; {', '.join(flags)})"


def _cpu_variant() -> str:
    """The CPU backend in use: the variant a portable build picked for this
    CPU (e.g. "zen4"), or "built-in" for a build with a single one."""
    from xybrid._native import _engine

    return str(_engine.cpu_backend()["variant"] or "built-in")


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked: naming the CPU backend loads the engine."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str = "show the version and build, then exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(_version_text())
        parser.exit()


def _model_path(arg: str | None) -> str:
    from xybrid.default_model import default_model_path
    from xybrid.model_files import resolve_model_path

    if arg is None:
        return str(default_model_path())
    return str(resolve_model_path(arg))


def _add_model_args(p: argparse.ArgumentParser, default_label: str = "Gemma 3 270M") -> None:
    p.add_argument("--model", "-m", metavar="PATH",
                   help=f"GGUF file or a folder holding one (default: {default_label})")
    p.add_argument("--threads", "-t", type=int, default=0, help="CPU threads (0 = all)")
    p.add_argument("--ctx-size", "-c", type=int, default=4096, help="context length in tokens")
    p.add_argument("--gpu-layers", "-ngl", type=int, default=0,
                   help="layers to offload to the GPU or the RPC servers (-1 = all; with "
                        "--rpc, 0 also means all)")
    _add_rpc_args(p)


def _add_rpc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT,...", default=None,
                   help="put layers on these `xybrid rpc-server` processes (unauthenticated, "
                        "unencrypted: trusted networks only)")
    p.add_argument("--tensor-split", metavar="W,...", default=None,
                   help="with --rpc: one weight per remote device, e.g. 3,1 "
                        "(default: by the memory each reports)")


def _add_sampling_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 disables")
    p.add_argument("--top-p", type=float, default=0.95, help="1.0 disables")
    p.add_argument("--min-p", type=float, default=0.05, help="0 disables")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop sequence (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xybrid", description="Run local GGUF language models on llama.cpp.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a raw prompt and stream the text")
    gen.add_argument("prompt", help="text to continue (no chat template is applied)")
    _add_model_args(gen)
    _add_sampling_args(gen, temperature=0.8)
    gen.add_argument("--stats", action="store_true",
                     help="print the run's telemetry as one JSON line on stderr")

    chat = sub.add_parser("chat", help="interactive multi-turn chat (reuses the KV cache)")
    _add_model_args(chat, "SmolLM2-135M-Instruct, the default chat model")
    _add_sampling_args(chat, temperature=0.7)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--chat-template", default=None,
                      help="chatml, gemma, llama2, or a Jinja template (default: the model's)")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (the server extra)")
    from xybrid.server.run import add_serve_args

    add_serve_args(serve)

    info = sub.add_parser("info", help="describe a model and this build")
    info.add_argument("model", nargs="?", default=None, help="GGUF file (default: Gemma 3 270M)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--gpu-layers", "-ngl", type=int, default=0,
                      help="with --rpc: layers to put on the servers (0 or -1 = all)")
    _add_rpc_args(info)

    from xybrid.rpc import DEFAULT_PORT, SECURITY_WARNING

    rpc = sub.add_parser(
        "rpc-server", help="serve this machine's CPU to clients that split a model (--rpc)",
        description="Serve this machine's CPU to xybrid (or llama.cpp) clients that put "
                    "some of a model's layers here with --rpc HOST:PORT. "
                    f"WARNING: {SECURITY_WARNING}")
    rpc.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1; anything else is reachable "
                          "by every machine that can route to it)")
    rpc.add_argument("--port", "-p", type=int, default=DEFAULT_PORT,
                     help=f"TCP port (default: {DEFAULT_PORT})")
    rpc.add_argument("--threads", "-t", type=int, default=0, help="CPU threads (0 = all cores)")
    rpc.add_argument("--mem", type=int, default=0, metavar="MiB",
                     help="memory to report to clients, which split layers by it "
                          "(default: what this machine has free)")
    rpc.add_argument("--cache", metavar="DIR", default=None,
                     help="keep received weights on disk here, so a client loading the same "
                          "model again sends only hashes")
    return parser


def _rpc_model_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Model keywords of --rpc/--tensor-split, the servers probed."""
    from xybrid import rpc

    servers = rpc.parse_server_list(args.rpc)
    split = rpc.parse_tensor_split(args.tensor_split)
    if split and not servers:
        raise XybridError("--tensor-split needs --rpc")
    for server in servers:
        rpc.probe(server)
    if not servers:
        return {"gpu_layers": args.gpu_layers}
    return {"gpu_layers": rpc.remote_layers(args.gpu_layers), "rpc_servers": servers,
            "tensor_split": split}


def _cmd_generate(args: argparse.Namespace) -> int:
    from xybrid._native import _engine
    from xybrid.telemetry import compute_telemetry

    model = _engine.Model(_model_path(args.model), **_rpc_model_args(args))
    ctx = _engine.Context(model, n_ctx=args.ctx_size, n_threads=args.threads)
    sampler = _engine.Sampler(
        model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed)
    tokens = model.tokenize(args.prompt, add_special=True, parse_special=False)
    out = sys.stdout

    def emit(chunk: str) -> None:
        out.write(chunk)
        out.flush()

    out.write(args.prompt)
    out.flush()
    result = ctx.generate(tokens, sampler, max_tokens=args.max_tokens, stop=args.stop or None,
                          on_text=emit)
    out.write("\n")
    out.flush()
    if args.stats:
        tel = compute_telemetry(
            start_ns=result.t_start_ns, prefill_end_ns=result.t_prefill_end_ns,
            token_times_ns=result.token_ns, chunk_times_ns=result.chunk_ns,
            end_ns=result.t_end_ns, prompt_tokens=len(tokens), prefilled_tokens=len(tokens))
        stats = {
            "prompt_tokens": len(tokens),
            "generated_tokens": len(result.tokens),
            "stop_reason": result.stop_reason,
            "ttft_ms": tel.ttft_ms,
            "prefill_tps": tel.prefill_tps,
            "decode_tps": tel.decode_tps,
            "mean_itl_ms": tel.mean_itl_ms,
            "p95_itl_ms": tel.p95_itl_ms,
            "emitted_chunks": tel.emitted_chunks,
            "generation_time_ms": tel.generation_time_ms,
        }
        print(json.dumps(stats), file=sys.stderr)
    ctx.close()
    model.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from xybrid._native import _engine

    path = _model_path(args.model)
    model = _engine.Model(path, **_rpc_model_args(args))
    template = model.chat_template()
    facts: dict[str, Any] = {
        "path": path,
        "name": model.name,
        "architecture": model.architecture,
        "description": model.description,
        "parameters": model.n_params,
        "size_bytes": model.size,
        "layers": model.n_layer,
        "embedding_length": model.n_embd,
        "context_length": model.n_ctx_train,
        "vocab_size": model.n_vocab,
        "recurrent": model.is_recurrent,
        "hybrid": model.is_hybrid,
        "chat_template": template is not None,
        "version": _version_text(),
        "cpu_backend": _cpu_variant(),
        "system_info": _engine.system_info(),
    }
    if model.rpc_devices:
        from xybrid.rpc import device_layers, parse_tensor_split

        facts["devices"] = device_layers(model.n_layer, args.gpu_layers, model.rpc_devices,
                                         parse_tensor_split(args.tensor_split))
    model.close()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.0f}M)"
        elif key == "size_bytes":
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif key == "devices":
            value = "; ".join(
                f"{d['device']}" + (f" at {d['endpoint']}" if d["endpoint"] else "")
                + f": {d['layers']} layers" for d in value)
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from xybrid.chat_cli import run_chat

    if args.model is None:  # Gemma 3 270M is a base model; chat on an instruct one
        from xybrid.default_model import default_chat_model_path

        args.model = str(default_chat_model_path())
    return run_chat(args)


def _cmd_rpc_server(args: argparse.Namespace) -> int:
    from xybrid import rpc

    print(f"xybrid rpc-server: {rpc.SECURITY_WARNING}", file=sys.stderr)
    rpc.serve(args.host, args.port, threads=args.threads, mem_mib=args.mem, cache_dir=args.cache)
    return 1  # serve() returns only by raising; never reached


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    from xybrid.server.run import serve, settings_from_args

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"xybrid: error: xybrid serve needs the server extra "
              f"(pip install 'xybrid[server]'); missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return serve(settings_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"generate": _cmd_generate, "info": _cmd_info, "chat": _cmd_chat,
                "serve": _cmd_serve, "rpc-server": _cmd_rpc_server}
    try:
        return handlers[args.command](args)
    except XybridError as exc:
        # One line, whatever the message holds (llama.cpp's log lines).
        print("xybrid: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
