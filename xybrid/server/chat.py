"""``POST /v1/chat/completions``: OpenAI requests to xybrid calls and back.

The request becomes chat messages and a :class:`GenerationConfig`; each of
the ``n`` choices is one concurrent ``backend.astream`` call (the batching
engine decodes them together). Stop strings are cut by the engine at the
earliest position, text pieces never split a UTF-8 character, and tool calls
come back with their arguments as a JSON string, streamed as deltas.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from xybrid.server.errors import APIError
from xybrid.server.schemas import ChatCompletionRequest, ChatMessageIn, _Sampling
from xybrid.server.settings import ServerSettings
from xybrid.types import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_SEED,
    ChatMessage,
    GenerationConfig,
    GenerationOutput,
    PartialToken,
)

__all__ = [
    "chat_chunks",
    "chat_config",
    "chat_logprobs",
    "chat_messages",
    "chat_response",
    "logit_bias_option",
    "logprobs_content",
    "merge_streams",
    "sampling_options",
    "telemetry",
    "token_pieces",
    "usage",
]

_ARGS_DELTA = 48  # characters of tool-call arguments per streamed delta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- request -> xybrid ----------------------------------------------------------------

def logit_bias_option(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token id as a decimal string -> bias in
    [-100, 100]) as GenerationConfig's mapping, every entry checked here so
    the 400 names the field."""
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise APIError(400, f"logit_bias has {len(bias)} entries, over the limit of "
                       f"{MAX_LOGIT_BIAS_ENTRIES}", param="logit_bias", code="limit_exceeded")
    out: dict[int, float] = {}
    for key, value in bias.items():
        text = key.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise APIError(400, f"logit_bias keys must be token ids (decimal integers), got "
                           f"{key!r}", param="logit_bias", code="invalid_value")
        token = int(text)
        if token >= n_vocab:
            raise APIError(400, f"logit_bias names token {token}, which is not a token id of "
                           f"this model (0..{n_vocab - 1})", param="logit_bias",
                           code="invalid_value")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias[{key!r}] = {value} is outside [-100, 100]",
                           param="logit_bias", code="invalid_value")
        out[token] = float(value)
    return out


def sampling_options(req: _Sampling, settings: ServerSettings, max_tokens: int | None,
                     n_ctx: int, n_vocab: int) -> dict[str, Any]:
    """GenerationConfig keywords shared by chat and completions, limits checked."""
    if req.n > settings.max_n:
        raise APIError(400, f"n = {req.n} is over this server's limit of {settings.max_n}",
                       param="n", code="limit_exceeded")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens = {max_tokens} is over this server's limit of "
                       f"{settings.max_tokens_limit}", param="max_tokens", code="limit_exceeded")
    if max_tokens is not None and max_tokens >= n_ctx:
        raise APIError(400, f"max_tokens = {max_tokens} does not fit the context window of "
                       f"{n_ctx} tokens", param="max_tokens", code="context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = [s for s in stops if s]  # an empty stop string stops nothing
    if len(stops) > settings.max_stop:
        raise APIError(400, f"stop has {len(stops)} sequences, over the limit of "
                       f"{settings.max_stop}", param="stop", code="limit_exceeded")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise APIError(400, f"seed must be an integer in [0, {MAX_SEED}], got {req.seed}",
                       param="seed", code="invalid_value")
    opts: dict[str, Any] = {"max_tokens": max_tokens or settings.default_max_tokens,
                            "stop_sequences": stops, "seed": req.seed,
                            "logit_bias": logit_bias_option(req.logit_bias, n_vocab)}
    if req.temperature is not None:
        opts["temperature"] = req.temperature
    if req.top_p is not None:
        if req.top_p == 0.0:  # "only the top token": greedy
            opts["temperature"] = 0.0
        else:
            opts["top_p"] = req.top_p
    for name, key in (("top_k", "top_k"), ("min_p", "min_p"),
                      ("repeat_penalty", "repetition_penalty"),
                      ("presence_penalty", "presence_penalty"),
                      ("frequency_penalty", "frequency_penalty"), ("grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            opts[key] = value
    opts["max_tokens"] = min(opts["max_tokens"], n_ctx - 1)
    return opts


def seeded(config: GenerationConfig, index: int) -> GenerationConfig:
    """Choice ``index`` of ``n``: a fixed seed gives each choice its own
    reproducible stream; without one each draws a random seed anyway."""
    if index == 0 or config.seed is None:
        return config
    return config.replace(seed=(config.seed + index) % (MAX_SEED + 1))


def chat_config(req: ChatCompletionRequest, settings: ServerSettings,
                n_ctx: int, n_vocab: int) -> tuple[GenerationConfig, bool]:
    """The generation settings of a chat request, and whether only one tool
    call may be returned (``parallel_tool_calls=false``)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                       code="invalid_value")
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"messages has {len(req.messages)} entries, over this server's "
                       f"limit of {settings.max_messages}", param="messages",
                       code="limit_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens
    opts = sampling_options(req, settings, max_tokens, n_ctx, n_vocab)
    if req.logprobs:
        opts["logprobs"] = req.top_logprobs or 0
    if req.response_format is not None:
        kind = req.response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, "response_format.type must be 'text', 'json_object' or "
                           f"'json_schema', got {kind!r}", param="response_format.type",
                           code="invalid_value")
        opts["response_format"] = req.response_format
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if len(tools) > settings.max_tools:
        raise APIError(400, f"tools has {len(tools)} entries, over this server's limit of "
                       f"{settings.max_tools}", param="tools", code="limit_exceeded")
    choice = req.tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}",
                           param="tool_choice", code="invalid_value")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice", code="invalid_value")
        tools, choice = chosen, "required"
    if choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice",
                       code="invalid_value")
    if tools:
        opts["tools"] = tools
        opts["tool_choice"] = choice or "auto"
    return GenerationConfig(**opts), req.parallel_tool_calls is False


def chat_messages(messages: Sequence[ChatMessageIn]) -> list[ChatMessage]:
    """OpenAI messages as xybrid messages. Images must be data URLs: a server
    never reads files named by a client."""
    out = []
    for i, m in enumerate(messages):
        data: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                "content": m.content}
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.get("type") == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise APIError(400, "image_url must be a data: URL (the server does "
                                       "not fetch URLs or read files)",
                                       param=f"messages[{i}].content[{j}].image_url",
                                       code="invalid_value")
        if m.name:
            data["name"] = m.name
        if m.tool_call_id:
            data["tool_call_id"] = m.tool_call_id
        try:
            msg = ChatMessage.from_dict(data)
        except ValueError as exc:
            raise APIError(400, f"messages[{i}]: {exc}", param=f"messages[{i}]",
                           code="invalid_value") from exc
        if m.tool_calls:
            # Replay the assistant's earlier calls in the markup the model writes.
            calls = "".join(_replayed_call(c, i) for c in m.tool_calls)
            msg = ChatMessage(msg.role, (msg.content + "\n" if msg.content else "") + calls,
                              msg.name, msg.tool_call_id, msg.media)
        out.append(msg)
    return out


def _replayed_call(call: dict[str, Any], i: int) -> str:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, "a tool call needs function.name", param=f"messages[{i}].tool_calls",
                       code="invalid_value")
    args: Any = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            pass
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}) + "\n</tool_call>"


# --- xybrid -> response -------------------------------------------------------------

def usage(outputs: Sequence[GenerationOutput | None]) -> dict[str, Any]:
    done = [o for o in outputs if o is not None]
    prompt = done[0].prompt_tokens if done else 0
    cached = done[0].cached_prompt_tokens if done else 0
    completion = sum(o.tokens_generated for o in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def telemetry(outputs: Sequence[GenerationOutput | None]) -> dict[str, Any]:
    """xybrid's per-choice timings (an extra field; OpenAI clients ignore it)."""
    keep = ("ttft_ms", "decode_tps", "prefill_tps", "tokens_per_second", "mean_itl_ms",
            "p95_itl_ms", "generation_time_ms", "stop_reason")
    return {"choices": [{k: o.to_dict()[k] for k in keep} if o is not None else None
                        for o in outputs]}


def _finish(output: GenerationOutput | None) -> str:
    if output is None:
        return "stop"
    reason = output.finish_reason
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def _tool_calls(output: GenerationOutput, single: bool) -> list[dict[str, Any]]:
    calls = [dict(c) for c in output.tool_calls]
    return calls[:1] if single else calls


TokenBytes = Callable[[int], bytes]


def token_pieces(model: Any, special: bool) -> TokenBytes:
    """A memoised token id -> bytes of its text, for one response."""
    cache: dict[int, bytes] = {}

    def piece(token: int) -> bytes:
        raw = cache.get(token)
        if raw is None:
            raw = cache[token] = bytes(model.token_to_piece(token, special=special))
        return raw
    return piece


def chat_logprobs(output: GenerationOutput | None, piece: TokenBytes | None
                  ) -> dict[str, Any] | None:
    """OpenAI's ``choices[].logprobs`` of a chat reply: one entry per
    generated token, with its top alternatives (log-probabilities of the
    model's raw distribution, before sampling settings and logit bias)."""
    if output is None or piece is None or output.logprobs is None:
        return None
    tops = output.top_logprobs or ()
    return logprobs_content(piece, [(t, lp, tops[k] if k < len(tops) else ())
                                    for k, (t, lp) in enumerate(zip(output.token_ids,
                                                                    output.logprobs))])


def logprobs_content(piece: TokenBytes,
                     tokens: Sequence[tuple[int, float, Sequence[tuple[int, float]]]]
                     ) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``
    for (token id, log p, top alternatives) triples."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = piece(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    content = []
    for token, logprob, top in tokens:
        item = entry(token, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in top]
        content.append(item)
    return {"content": content, "refusal": None}


def chat_response(model: str, outputs: Sequence[GenerationOutput], single_tool: bool,
                  piece: TokenBytes | None = None) -> dict[str, Any]:
    """The chat.completion body; ``piece`` (token id -> bytes) when the
    request asked for logprobs."""
    choices = []
    for i, out in enumerate(outputs):
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        calls = _tool_calls(out, single_tool)
        if calls:
            message["tool_calls"] = calls
            message["content"] = out.text or None
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(out, piece),
                        "finish_reason": _finish(out)})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": _fingerprint(), "choices": choices,
            "usage": usage(outputs), "xybrid": telemetry(outputs)}


def _fingerprint() -> str:
    from xybrid import __version__

    return f"xybrid-{__version__}"


async def merge_streams(streams: Sequence[AsyncIterator[PartialToken]]
                        ) -> AsyncIterator[tuple[int, PartialToken]]:
    """Pieces of several streams as they come, tagged with the stream's index.
    Closing the merged stream closes every source (cancelling its sequence)."""
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await _aclose(streams[0])
        return
    queue: asyncio.Queue[tuple[int, PartialToken | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[PartialToken]) -> None:
        try:
            async for piece in stream:
                await queue.put((i, piece))
        except Exception as exc:
            await queue.put((i, exc))
            return
        finally:
            await _aclose(stream)
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(tasks)
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _aclose(stream: AsyncIterator[PartialToken]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                          ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def chat_chunks(model: str, pieces: AsyncIterator[tuple[int, PartialToken]], n: int,
                      single_tool: bool, include_usage: bool,
                      on_done: Any, piece_of: TokenBytes | None = None
                      ) -> AsyncIterator[dict[str, Any]]:
    """The chat.completion.chunk objects of a streamed reply; ``on_done``
    receives the final outputs. With ``piece_of`` (logprobs asked for), each
    content chunk carries the logprobs of the tokens sampled since the
    choice's previous one, and the chunk with ``finish_reason`` the rest
    (tokens whose text was held back or cut off, such as a stop string)."""
    cid, created, fp = new_id("chatcmpl"), int(time.time()), _fingerprint()
    outputs: list[GenerationOutput | None] = [None] * n

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": fp,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish}]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    def logprobs_of(piece: PartialToken) -> dict[str, Any] | None:
        if piece_of is None or not piece.logprobs:
            return None
        return logprobs_content(piece_of, piece.logprobs)

    async for i, piece in pieces:
        if piece.text:
            yield chunk(i, {"content": piece.text}, logprobs=logprobs_of(piece))
        if piece.finish_reason is None:
            continue
        out = piece.output
        outputs[i] = out
        if out is not None:
            for k, call in enumerate(_tool_calls(out, single_tool)):
                fn = call["function"]
                yield chunk(i, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                "function": {"name": fn["name"],
                                                             "arguments": ""}}]})
                args = fn["arguments"]
                for start in range(0, len(args), _ARGS_DELTA):
                    yield chunk(i, {"tool_calls": [{"index": k, "function": {
                        "arguments": args[start:start + _ARGS_DELTA]}}]})
        yield chunk(i, {}, _finish(out), logprobs_of(piece))
    on_done(outputs)
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": fp, "choices": [], "usage": usage(outputs),
               "xybrid": telemetry(outputs)}
