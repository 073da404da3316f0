"""Child process of the malformed-file tests (see gguf_mutation.Worker).

Reads one JSON request per line on stdin, loads the file it names with the
real extension and uses it (a short greedy generation for a model; one image
through the projector for a projector), and writes one JSON line: ``{"ok":
true}``, ``{"error": "<XybridError subclass>", "message": ...}``, or
``{"untyped": "<exception type>", "message": ...}`` for any other exception.
An abort or a segfault ends the process, which the parent sees.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from xybrid import XybridError
from xybrid._native import _engine

_models: dict[str, Any] = {}


def _base_model(path: str) -> Any:
    if path not in _models:
        _models[path] = _engine.Model(path)
    return _models[path]


def use_model(path: str) -> None:
    model = _engine.Model(path)
    try:
        model.metadata()
        model.chat_template()
        ctx = _engine.Context(model, n_ctx=64, n_batch=64, n_threads=1)
        try:
            sampler = _engine.Sampler(model)
            tokens = model.tokenize("Hello there")
            result = ctx.generate(tokens, sampler, max_tokens=4)
            model.detokenize(list(result.tokens))
        finally:
            ctx.close()
    finally:
        model.close()


def use_projector(path: str, base_model: str) -> None:
    model = _base_model(base_model)
    mm = _engine.Multimodal(model, path, n_threads=1, use_gpu=False)
    try:
        ctx = _engine.Context(model, n_ctx=256, n_batch=64, n_threads=1)
        try:
            side = 24
            rgb = bytes((x * 7 + y * 13) % 256 for y in range(side) for x in range(side * 3))
            media = []
            if mm.vision:
                media.append(("image", rgb, side, side))
            if not media:
                return
            chunks = mm.tokenize(mm.marker + " what is it?", media)
            n_past = ctx.eval_chunks(mm, chunks)
            sampler = _engine.Sampler(model)
            ctx.generate([], sampler, max_tokens=2, n_past=n_past, logits_ready=True)
        finally:
            ctx.close()
    finally:
        mm.close()


def main() -> None:
    # Replies go to the original stdout; anything the C libraries print goes
    # to stderr with the logs.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any]
        try:
            if request["kind"] == "model":
                use_model(request["path"])
            else:
                use_projector(request["path"], request["base_model"])
            reply = {"ok": True}
        except XybridError as e:
            reply = {"error": type(e).__name__, "message": str(e)}
        except Exception as e:  # reported to the parent, which fails the test
            reply = {"untyped": type(e).__name__, "message": str(e),
                     "traceback": traceback.format_exc()[-2000:]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
