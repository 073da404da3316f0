"""``xybrid chat``: a multi-turn terminal chat that shows the KV-cache reuse."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from xybrid.cli import build_parser
from xybrid.chat_cli import run_chat

# Long enough that the reused prefix passes the backend's alignment (32 tokens).
SYSTEM = ("You are a careful and friendly assistant. You answer every question in short, "
          "plain sentences, and you never make things up.")
REUSED = re.compile(r"\[(\d+) prompt tokens reused from the cache; finish: (\w+)\]")


def test_chat_subprocess_two_turns_reset_exit(tmp_path: Path) -> None:
    script = "\n".join([
        "What is the capital of France?",
        "And of Germany?",
        "/reset",
        "Hello",
        "/exit",
        "this line is never read",
    ]) + "\n"
    proc = subprocess.run(
        [sys.executable, "-m", "xybrid", "chat", "--threads", "1", "--ctx-size", "1024",
         "--max-tokens", "8", "--temperature", "0", "--system", SYSTEM],
        input=script, capture_output=True, text=True, timeout=180,
        cwd=tmp_path,  # not the source tree: import the installed package
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # The default chat model: SmolLM2-135M-Instruct, with the template in its metadata.
    assert "Smollm2" in out.splitlines()[0] and "(template: jinja:model)" in out.splitlines()[0]
    reused = [(int(n), finish) for n, finish in REUSED.findall(out)]
    assert len(reused) == 3, out
    assert reused[0][0] == 0  # first turn: empty cache
    assert reused[1][0] > 0  # second turn: system prompt and first exchange reused
    assert reused[2][0] == 0  # after /reset
    assert all(finish in {"length", "stop"} for _, finish in reused)
    before, after = out.split("(conversation reset)")
    assert len(REUSED.findall(before)) == 2 and len(REUSED.findall(after)) == 1


def test_chat_in_process_commands_and_end_of_input(tiny_llama_path: Path) -> None:
    args = build_parser().parse_args([
        "chat", "--model", str(tiny_llama_path), "--threads", "1", "--ctx-size", "512",
        "--max-tokens", "6", "--temperature", "0", "--chat-template", "chatml",
        "--system", SYSTEM])
    stdin = io.StringIO("Hello\n\n/bogus\nAgain\n")  # no /exit: ends at end of input
    stdout = io.StringIO()
    assert run_chat(args, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert "(template: chatml)" in out
    assert "unknown command '/bogus'" in out
    reused = [int(n) for n, _ in REUSED.findall(out)]
    assert len(reused) == 2
    assert reused[0] == 0 and reused[1] > 0


def test_chat_survives_a_conversation_that_outgrows_the_context(tiny_llama_path: Path) -> None:
    args = build_parser().parse_args([
        "chat", "--model", str(tiny_llama_path), "--threads", "1", "--ctx-size", "256",
        "--max-tokens", "4", "--temperature", "0", "--chat-template", "chatml"])
    long_message = " ".join(["word"] * 150)  # two of them do not fit in 256 tokens
    stdin = io.StringIO(f"{long_message}\n{long_message}\n/reset\nHello\n/exit\n")
    stdout = io.StringIO()
    assert run_chat(args, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert "do not fit the context window" in out
    # The first turn, then (after the refused one and /reset) the last turn.
    assert len(REUSED.findall(out)) == 2
    assert out.index("do not fit") < out.index("(conversation reset)")
