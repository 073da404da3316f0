"""The child process of the sizes fuzz suite (tests/test_fuzz_sizes.py).

Each request loads the tiny model with its own context and batch sizes, so an
assertion inside llama.cpp (which aborts the process) kills this child and
shows up as a failed test instead of killing the pytest session. One JSON
request per line on stdin, one JSON answer per line on stdout:

    {"llm": {...LlmConfig kwargs but the path}, "gen": {...GenerationConfig kwargs},
     "prompt_words": int, "batch": int | null}
    -> {"outcome": "ok" | "xybrid" | "untyped", "stage": "config" | "load" | "generate",
        "error": str, "fresh": bool}

``batch`` set runs ``generate_batch`` over that many copies of the prompt,
else ``generate_raw``. ``fresh`` is the invariant checked after every failure
(and every tenth success): a backend loaded now with the reference sizes
returns exactly what one loaded at start-up returned (greedy).

argv: the tiny GGUF model path.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
from fuzz_child import record_failure  # beside this script

PROBE = "The quick brown fox"


def reference_text(path: str) -> str:
    config = LlmConfig(path, context_length=256, n_batch=64, n_threads=1)
    with LlamaCppBackend(config) as backend:
        return backend.generate_raw(PROBE, GenerationConfig.greedy(max_tokens=8)).text


def run(path: str, request: dict[str, Any], reply: dict[str, Any]) -> None:
    reply["stage"] = "config"
    config = LlmConfig(path, **request["llm"])
    gen = GenerationConfig(**request["gen"])
    reply["stage"] = "load"
    with LlamaCppBackend(config) as backend:
        reply["stage"] = "generate"
        prompt = PROBE + " word" * request.get("prompt_words", 0)
        if request.get("batch") is None:
            backend.generate_raw(prompt, gen)
        else:
            outputs = backend.generate_batch([prompt] * request["batch"], gen, raw=True)
            assert len(outputs) == request["batch"]


def main() -> None:
    path = sys.argv[1]
    reference = reference_text(path)
    print(json.dumps({"ready": True}), flush=True)
    successes = 0
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {"outcome": "ok", "stage": "", "error": "", "fresh": True}
        try:
            run(path, request, reply)
            successes += 1
            check = successes % 10 == 0
        except Exception as exc:  # noqa: BLE001 - reported to the parent, typed or not
            record_failure(reply, exc)
            check = True
        if check:
            reply["fresh"] = reference_text(path) == reference
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
