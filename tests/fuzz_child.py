"""The child process of the fuzz suites (tests/test_fuzz.py).

Hostile requests run here, not in the pytest process, so that an abort inside
llama.cpp kills this child and shows up as a failed test. It reads one JSON
request per line on stdin and answers one JSON line on stdout:

    {"prompt": str | list, "chat": bool, "config": {...GenerationConfig kwargs}}
    -> {"outcome": "ok" | "xybrid" | "untyped", "error": str, "fresh": bool}

``fresh`` is the invariant checked after every failure (and every tenth
success): the next valid call returns exactly what a fresh backend returned
for the same prompt at start-up (greedy, tiny model).

argv: the tiny GGUF model path.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from xybrid import ChatMessage, GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid.errors import XybridError

PROBE = "The quick brown fox"


def main() -> None:
    config = LlmConfig(sys.argv[1], context_length=256, n_batch=64, n_threads=1,
                       chat_template="chatml")
    probe = GenerationConfig.greedy(max_tokens=8)
    with LlamaCppBackend(config) as fresh:
        reference = fresh.generate_raw(PROBE, probe).text
    backend = LlamaCppBackend(config)
    print(json.dumps({"ready": True}), flush=True)
    successes = 0
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {"outcome": "ok", "error": "", "fresh": True}
        try:
            gen = GenerationConfig(**request["config"])
            if request.get("chat"):
                backend.generate([ChatMessage.user(request["prompt"])], gen)
            else:
                backend.generate_raw(request["prompt"], gen)
            successes += 1
            check = successes % 10 == 0
        except XybridError as exc:
            reply.update(outcome="xybrid", error=f"{type(exc).__name__}: {exc}"[:300])
            check = True
        except Exception as exc:  # noqa: BLE001 - reported to the parent as a finding
            reply.update(outcome="untyped", error=f"{type(exc).__name__}: {exc}"[:300])
            check = True
        if check:
            reply["fresh"] = backend.generate_raw(PROBE, probe).text == reference
        print(json.dumps(reply), flush=True)
    backend.close()


if __name__ == "__main__":
    main()
