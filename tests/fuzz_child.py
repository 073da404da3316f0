"""The child process of the fuzz suites (tests/test_fuzz.py).

Hostile requests run here, not in the pytest process, so that an abort inside
llama.cpp kills this child and shows up as a failed test. It reads one JSON
request per line on stdin and answers one JSON line on stdout:

    {"prompt": str | list, "chat": bool, "config": {...GenerationConfig kwargs}}
    {"media": [item, ...], "config": {...}}  (a user turn with images/audio)
    -> {"outcome": "ok" | "xybrid" | "untyped", "error": str, "fresh": bool}

A media item is ``{"image" | "audio": <base64 bytes>}`` (encoded bytes),
``{"image_array" | "audio_array": {"dtype", "shape", "data": <base64> |
"fill": number}}`` (an array from its raw bytes, or one value broadcast to a
shape, which costs no memory however large the shape), ``{"pcm":
<base64>}`` (raw float32 bytes in a memoryview), ``{"image_path" |
"audio_path": str}`` or ``{"part": {...}}`` (an OpenAI content part).

``fresh`` is the invariant checked after every failure (and every tenth
success): the next valid call returns exactly what a fresh backend returned
for the same prompt at start-up (greedy, tiny model; for media requests, the
multimodal backend with a fixed image).

argv: the tiny GGUF model path, then optionally a text model and its
multimodal projector (vision and audio) for media requests.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

import numpy as np

from xybrid import ChatMessage, GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid.errors import XybridError
from xybrid.media import Audio, Image

PROBE = "The quick brown fox"
# The media probe: a fixed 8 x 8 gradient, greedy.
PROBE_IMAGE = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)


def record_failure(reply: dict[str, Any], exc: BaseException) -> None:
    """Classify a failed request for the parent: a typed error is an outcome,
    anything else is a finding. (The children of the other suites share it.)"""
    typed = isinstance(exc, XybridError)
    reply.update(outcome="xybrid" if typed else "untyped",
                 error=f"{type(exc).__name__}: {exc}"[:300])


def _array(spec: dict[str, Any]) -> Any:
    dtype = np.dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    if "data" in spec:
        return np.frombuffer(base64.b64decode(spec["data"]), dtype=dtype).reshape(shape)
    return np.broadcast_to(np.array(spec["fill"]).astype(dtype), shape)


def _media_message(items: list[dict[str, Any]]) -> ChatMessage:
    """The user turn a media request describes (built here, in the child,
    so that building it is part of what is fuzzed)."""
    media: list[Any] = []
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Look."}]
    for item in items:
        (kind, value), = item.items()
        if kind == "image":
            media.append(Image(base64.b64decode(value)))
        elif kind == "audio":
            media.append(Audio(base64.b64decode(value)))
        elif kind == "image_array":
            media.append(Image(_array(value)))
        elif kind == "audio_array":
            media.append(Audio(_array(value)))
        elif kind == "pcm":
            media.append(Audio(memoryview(base64.b64decode(value))))
        elif kind == "image_path":
            media.append(Image(value))
        elif kind == "audio_path":
            media.append(Audio(value))
        else:
            parts.append(value)
    if len(parts) > 1:
        message = ChatMessage.from_dict({"role": "user", "content": parts})
        return ChatMessage("user", message.content, media=tuple(media) + message.media)
    return ChatMessage("user", "Look.", media=tuple(media))


def _media_backend(model: str, mmproj: str) -> tuple[LlamaCppBackend, Any]:
    config = LlmConfig(model, mmproj_path=mmproj, context_length=1024, n_threads=1,
                       chat_template="chatml")
    probe = [ChatMessage.user("Describe.", images=[PROBE_IMAGE])]
    with LlamaCppBackend(config) as fresh:
        reference = fresh.generate(probe, GenerationConfig.greedy(max_tokens=6)).text

    backend = LlamaCppBackend(config)

    def check() -> bool:
        return backend.generate(probe, GenerationConfig.greedy(max_tokens=6)).text == reference

    return backend, check


def main() -> None:
    # Replies go to a private copy of stdout; fd 1 itself goes to stderr, so
    # that whatever C code prints there (mtmd, clip) cannot break a reply line.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = LlmConfig(sys.argv[1], context_length=256, n_batch=64, n_threads=1,
                       chat_template="chatml")
    probe = GenerationConfig.greedy(max_tokens=8)
    with LlamaCppBackend(config) as fresh:
        reference = fresh.generate_raw(PROBE, probe).text
    backend = LlamaCppBackend(config)
    media_backend, media_fresh = _media_backend(*sys.argv[2:4]) if len(sys.argv) > 3 else (None, None)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    successes = 0
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {"outcome": "ok", "error": "", "fresh": True}
        try:
            gen = GenerationConfig(**request["config"])
            if "media" in request:
                assert media_backend is not None, "the child was started without a projector"
                media_backend.generate([_media_message(request["media"])], gen)
            elif request.get("chat"):
                backend.generate([ChatMessage.user(request["prompt"])], gen)
            else:
                backend.generate_raw(request["prompt"], gen)
            successes += 1
            check = successes % 10 == 0
        except Exception as exc:  # noqa: BLE001 - reported to the parent, typed or not
            record_failure(reply, exc)
            check = True
        if check and "media" in request:
            assert media_fresh is not None
            reply["fresh"] = media_fresh()
        elif check:
            reply["fresh"] = backend.generate_raw(PROBE, probe).text == reference
        print(json.dumps(reply), file=replies, flush=True)
    backend.close()
    if media_backend is not None:
        media_backend.close()


if __name__ == "__main__":
    main()
