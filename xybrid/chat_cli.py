"""``xybrid chat``: an interactive multi-turn chat in the terminal.

Each turn prints how many prompt tokens were served from the KV cache, so
the prefix reuse is visible: from the second turn on, only the new user
message (and the template's markers) is prefilled. ``/reset`` forgets the
conversation, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from xybrid.errors import ContextOverflowError
from xybrid.types import ChatMessage, GenerationConfig, LlmConfig

__all__ = ["run_chat"]

HELP = "commands: /reset (new conversation), /exit (quit)"


def run_chat(args: argparse.Namespace, *, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> int:
    from xybrid.cli import _model_path
    from xybrid.llama_cpp_backend import LlamaCppBackend
    from xybrid.rpc import parse_server_list, parse_tensor_split

    inp = stdin or sys.stdin
    out = stdout or sys.stdout
    config = LlmConfig(
        _model_path(args.model), context_length=args.ctx_size, n_threads=args.threads,
        gpu_layers=args.gpu_layers, chat_template=args.chat_template,
        rpc_servers=parse_server_list(getattr(args, "rpc", None)),
        tensor_split=parse_tensor_split(getattr(args, "tensor_split", None)))
    gen = GenerationConfig(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
        seed=args.seed, stop_sequences=args.stop)
    system = [ChatMessage.system(args.system)] if args.system else []
    interactive = inp.isatty()

    with LlamaCppBackend(config) as llm:
        out.write(f"xybrid chat: {llm.model.name or llm.model_path} "
                  f"(template: {llm.chat_template_name}). {HELP}\n")
        history: list[ChatMessage] = list(system)
        while True:
            if interactive:
                out.write("\n> ")
                out.flush()
            line = inp.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                llm.reset_cache()
                history = list(system)
                out.write("(conversation reset)\n")
                continue
            if text.startswith("/"):
                out.write(f"unknown command {text!r}; {HELP}\n")
                continue
            history.append(ChatMessage.user(text))
            final = None
            try:
                for piece in llm.stream(history, gen):
                    if piece.finish_reason is not None:
                        final = piece
                        break
                    out.write(piece.text)
                    out.flush()
            except ContextOverflowError as exc:
                # Refused before anything ran: drop the turn, keep the session.
                history.pop()
                out.write(f"({exc}; /reset starts a new conversation)\n")
                out.flush()
                continue
            reply = final.cumulative_text if final else ""
            history.append(ChatMessage.assistant(reply))
            cached = llm.last_cached_prefix_len() or 0
            out.write(f"\n[{cached} prompt tokens reused from the cache; "
                      f"finish: {final.finish_reason if final else '?'}]\n")
            out.flush()
    return 0
