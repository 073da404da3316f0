"""``POST /v1/completions``: continue raw prompts (no chat template).

A prompt is a string, a list of token ids, or a list of either (a batch);
choice ``p * n + i`` is the ``i``-th completion of prompt ``p``, as in
OpenAI's API. Each completion is one raw-prompt stream on the engine.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from xybrid.server.chat import (
    TokenBytes,
    _fingerprint,
    new_id,
    sampling_options,
    seeded,
    telemetry,
)
from xybrid.server.errors import APIError
from xybrid.server.schemas import CompletionRequest
from xybrid.server.settings import ServerSettings
from xybrid.types import GenerationConfig, GenerationOutput, PartialToken

__all__ = ["completion_chunks", "completion_config", "completion_logprobs", "completion_prompts",
           "completion_response"]


def completion_prompts(req: CompletionRequest, settings: ServerSettings
                       ) -> list[str | list[int]]:
    p = req.prompt
    prompts: list[str | list[int]]
    if isinstance(p, str):
        prompts = [p]
    elif not p:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    elif all(isinstance(t, int) for t in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if len(prompts) > settings.max_prompts:
        raise APIError(400, f"prompt holds {len(prompts)} prompts, over this server's limit of "
                       f"{settings.max_prompts}", param="prompt", code="limit_exceeded")
    for i, one in enumerate(prompts):
        if len(one) == 0:
            raise APIError(400, f"prompt[{i}] is empty", param="prompt", code="invalid_value")
    return prompts


def completion_config(req: CompletionRequest, settings: ServerSettings,
                      n_ctx: int, n_vocab: int) -> GenerationConfig:
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server",
                       param="suffix", code="unsupported_parameter")
    if req.logprobs is not None and req.echo:
        raise APIError(400, "logprobs together with echo (the prompt's logprobs) is not "
                       "supported", param="logprobs", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (it needs logprobs); leave it out or "
                       "set it equal to n", param="best_of", code="unsupported_parameter")
    opts = sampling_options(req, settings, req.max_tokens, n_ctx, n_vocab)
    if req.logprobs is not None:
        opts["logprobs"] = req.logprobs
    return GenerationConfig(**opts)


def completion_logprobs(output: GenerationOutput | None, piece: TokenBytes | None,
                        offset: int) -> dict[str, Any] | None:
    """The legacy ``choices[].logprobs`` of a completion: the tokens of the
    returned text, their log-probabilities, their top alternatives as a
    ``{token: logprob}`` map, and where each token starts in the choice's
    text (``offset``: the characters before the completion, an echo).

    Tokens are cut where the text was (a stop string), and offsets count
    characters: a token holding part of a UTF-8 character starts where that
    character does."""
    if output is None or piece is None or output.logprobs is None:
        return None
    # A stop string was cut from the text: keep the tokens that start in it.
    cut = output.stop_reason == "stop"
    budget = len(output.text.encode("utf-8"))
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    tops = output.top_logprobs or ()
    tokens: list[str] = []
    values: list[float] = []
    alternatives: list[dict[str, float]] = []
    offsets: list[int] = []
    used = 0
    for k, (token, logprob) in enumerate(zip(output.token_ids, output.logprobs)):
        if cut and used >= budget:
            break  # the rest made the stop string, which was cut off
        raw = piece(token)
        offsets.append(offset)
        tokens.append(raw.decode("utf-8", "replace"))
        values.append(logprob)
        top: dict[str, float] = {}
        for t, lp in (tops[k] if k < len(tops) else ()):
            top.setdefault(piece(t).decode("utf-8", "replace"), lp)
        alternatives.append(top)
        offset += len(decoder.decode(raw))
        used += len(raw)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": alternatives,
            "text_offset": offsets}


def _usage(outputs: Sequence[GenerationOutput | None], n: int) -> dict[str, Any]:
    done = list(outputs)
    prompt = sum(o.prompt_tokens for o in done[::n] if o is not None)
    completion = sum(o.tokens_generated for o in done if o is not None)
    cached = sum(o.cached_prompt_tokens for o in done[::n] if o is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(out: GenerationOutput | None) -> str:
    if out is None:
        return "stop"
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


def completion_response(model: str, outputs: Sequence[GenerationOutput], echoes: Sequence[str],
                        n: int, piece: TokenBytes | None = None) -> dict[str, Any]:
    """The text_completion body; ``piece`` (token id -> bytes) when the
    request asked for logprobs."""
    choices = [{"index": i, "text": echoes[i // n] + out.text,
                "logprobs": completion_logprobs(out, piece, len(echoes[i // n])),
                "finish_reason": _finish(out)} for i, out in enumerate(outputs)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": _fingerprint(), "choices": choices,
            "usage": _usage(outputs, n), "xybrid": telemetry(outputs)}


async def completion_chunks(model: str, pieces: AsyncIterator[tuple[int, PartialToken]],
                            count: int, n: int, echoes: Sequence[str], include_usage: bool,
                            on_done: Any, piece: TokenBytes | None = None
                            ) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed completion. With ``piece`` (logprobs asked
    for), a choice's logprobs come in its last chunk, the one with
    ``finish_reason``; text offsets count from the start of the choice."""
    cid, created, fp = new_id("cmpl"), int(time.time()), _fingerprint()
    outputs: list[GenerationOutput | None] = [None] * count

    def chunk(index: int, text: str, finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": index, "text": text, "logprobs": logprobs,
                             "finish_reason": finish}]}

    for i in range(count):
        if echoes[i // n]:
            yield chunk(i, echoes[i // n])
    async for i, got in pieces:
        if got.text:
            yield chunk(i, got.text)
        if got.finish_reason is not None:
            outputs[i] = got.output
            yield chunk(i, "", _finish(got.output),
                        completion_logprobs(got.output, piece, len(echoes[i // n])))
    on_done(outputs)
    if include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": fp, "choices": [], "usage": _usage(outputs, n),
               "xybrid": telemetry(outputs)}


def configs_for(config: GenerationConfig, n: int) -> list[GenerationConfig]:
    return [seeded(config, i) for i in range(n)]
