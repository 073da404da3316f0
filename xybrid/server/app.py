"""The FastAPI application of ``xybrid serve``: routes and request flow.

A generation request is checked (schema, limits), admitted (or refused with
429), then run as concurrent streams on the engine. Streams are peeked
before the response starts, so an error the engine finds in the prompt is
an ordinary 4xx; an error after that is sent as an SSE ``error`` event and
the stream ends. A client that goes away cancels its sequences: the
streaming response watches for the disconnect and closes the engine's
generators, which cancels them at their next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from xybrid.errors import OverloadedError
from xybrid.server.chat import (
    chat_chunks,
    chat_config,
    chat_messages,
    chat_response,
    merge_streams,
    seeded,
    sse,
    token_pieces,
)
from xybrid.server.completions import (
    completion_chunks,
    completion_config,
    completion_prompts,
    completion_response,
)
from xybrid.server.engine import Engine, astream_raw
from xybrid.server.errors import APIError, from_exception, install_handlers
from xybrid.server.metrics import Metrics
from xybrid.server.middleware import AccessLog, ApiKey, BodyLimit
from xybrid.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from xybrid.server.settings import ServerSettings
from xybrid.types import GenerationOutput, PartialToken

__all__ = ["create_app"]

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then it is cancelled)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the
    client disconnects, even while no event is being written."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watch(scope_: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope_.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                try:
                    await self.stream_response(send)
                except OSError:  # the socket went away mid-write
                    pass
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()


async def _chain(first: tuple[int, PartialToken],
                 rest: AsyncIterator[tuple[int, PartialToken]]
                 ) -> AsyncIterator[tuple[int, PartialToken]]:
    yield first
    async for item in rest:
        yield item


async def _collect(pieces: AsyncIterator[tuple[int, PartialToken]], n: int
                   ) -> list[GenerationOutput]:
    outputs: list[GenerationOutput | None] = [None] * n
    try:
        async for i, piece in pieces:
            if piece.finish_reason is not None:
                outputs[i] = piece.output
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:
        raise APIError(500, f"the engine ended choice {missing[0]} without a result",
                       code="engine_error")
    return [o for o in outputs if o is not None]


def create_app(settings: ServerSettings | None = None, *, engine: Engine | None = None,
               on_load_failed: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app. The model loads on a thread once the app starts, so
    ``/health`` answers 503 ("loading") until it is ready."""
    settings = settings or ServerSettings()
    engine = engine or Engine(settings)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await asyncio.to_thread(engine.load)
            except BaseException as exc:
                if on_load_failed is not None:
                    on_load_failed(exc)

        loading = asyncio.ensure_future(load())
        try:
            yield
        finally:
            if engine.state == "ready":
                engine.state = "stopping"
            await loading
            await asyncio.to_thread(engine.close)

    from xybrid import __version__

    app = FastAPI(title="xybrid serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API on xybrid's llama.cpp engine.")
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    install_handlers(app, settings.retry_after_s)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ApiKey, key=settings.api_key)
    app.add_middleware(AccessLog, metrics=metrics, enabled=settings.log_requests)

    def route(request: Request, name: str) -> None:
        request.state.route = name

    def check_model(name: str | None, *, embedding: bool = False) -> str:
        served = engine.embedding_model_id if embedding else engine.model_id
        path = engine.model_path
        if name in (None, "", served) or (not embedding and path is not None
                                          and name in (path.name, str(path))):
            return served
        raise APIError(404, f"the model {name!r} is not served here; this server serves "
                       f"{served!r} (see GET /v1/models)", param="model",
                       code="model_not_found")

    def admit(n: int) -> None:
        try:
            engine.admission.acquire(n)
        except OverloadedError:
            metrics.rejected.inc()
            raise

    def record(request: Request, outputs: list[GenerationOutput | None], t0: float) -> None:
        done = [o for o in outputs if o is not None]
        prompt = sum(o.prompt_tokens for o in done[:1])
        completion = sum(o.tokens_generated for o in done)
        request.state.tokens = (prompt, completion)
        metrics.prompt_tokens.inc(prompt)
        metrics.cached_tokens.inc(sum(o.cached_prompt_tokens for o in done[:1]))
        metrics.completion_tokens.inc(completion)
        if done and done[0].ttft_ms is not None:
            metrics.ttft.observe(done[0].ttft_ms / 1000.0)

    async def respond(request: Request, streams: list[AsyncIterator[PartialToken]], n: int,
                      stream: bool, make_chunks: Callable[..., AsyncIterator[dict[str, Any]]],
                      make_response: Callable[[list[GenerationOutput]], dict[str, Any]]
                      ) -> Response:
        """Run admitted streams (``n`` slots held) as SSE or one JSON body."""
        t0 = time.perf_counter()
        pieces = merge_streams(streams)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                engine.admission.release(n)

        try:
            if not stream:
                try:
                    outputs = await until_disconnect(request, _collect(pieces, n))
                except ClientGone:
                    metrics.disconnects.inc()
                    return Response(status_code=499)
                finally:
                    release()
                record(request, list(outputs), t0)
                return JSONResponse(make_response(outputs))
            try:
                first = await until_disconnect(request, pieces.__anext__())
            except StopAsyncIteration:
                raise APIError(500, "the engine produced no output", code="engine_error") \
                    from None
            except ClientGone:
                metrics.disconnects.inc()
                await pieces.aclose()  # type: ignore[attr-defined]
                return Response(status_code=499)
        except BaseException:
            release()
            await pieces.aclose()  # type: ignore[attr-defined]
            raise

        async def body() -> AsyncIterator[bytes]:
            completed = False
            try:
                async for obj in make_chunks(_chain(first, pieces),
                                             lambda outs: record(request, outs, t0)):
                    yield sse(obj)
                yield sse("[DONE]")
                completed = True
            except Exception as exc:  # after the start: an SSE error event, then the end
                yield sse(from_exception(exc, settings.retry_after_s).body())
                completed = True
            finally:
                if not completed:
                    metrics.disconnects.inc()
                await pieces.aclose()  # type: ignore[attr-defined]
                release()

        return SSEResponse(body(), headers={"Cache-Control": "no-cache",
                                            "X-Accel-Buffering": "no"})

    # --- generation ----------------------------------------------------------------------
    @app.post("/v1/chat/completions", summary="Chat completion (plain or SSE)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        route(request, "/v1/chat/completions")
        backend = engine.require()
        model = check_model(body.model)
        config, single_tool = chat_config(body, settings, engine.n_ctx,
                                          int(backend.model.n_vocab))
        piece = token_pieces(backend.model, special=True) if config.logprobs is not None \
            else None
        messages = chat_messages(body.messages)
        n = body.n
        admit(n)
        streams = [backend.astream(messages, seeded(config, i)) for i in range(n)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(
            request, streams, n, body.stream,
            lambda pieces, done: chat_chunks(model, pieces, n, single_tool, include_usage, done,
                                             piece),
            lambda outputs: chat_response(model, outputs, single_tool, piece))

    @app.post("/v1/completions", summary="Raw text completion (plain or SSE)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        route(request, "/v1/completions")
        backend = engine.require()
        model = check_model(body.model)
        config = completion_config(body, settings, engine.n_ctx, int(backend.model.n_vocab))
        # The engine writes a raw continuation's text without control tokens.
        piece = token_pieces(backend.model, special=False) if config.logprobs is not None \
            else None
        prompts = completion_prompts(body, settings)
        n = body.n
        echoes = [(p if isinstance(p, str) else _detokenize(backend, p, "prompt"))
                  if body.echo else "" for p in prompts]
        count = len(prompts) * n
        admit(count)
        streams = [astream_raw(backend, prompts[k // n], seeded(config, k % n))
                   for k in range(count)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(
            request, streams, count, body.stream,
            lambda pieces, done: completion_chunks(model, pieces, count, n, echoes,
                                                   include_usage, done, piece),
            lambda outputs: completion_response(model, outputs, echoes, n, piece))

    # --- embeddings -------------------------------------------------------------------------
    @app.post("/v1/embeddings", summary="Text embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        route(request, "/v1/embeddings")
        engine.require()
        model = check_model(body.model, embedding=True)
        given: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        if not given:
            raise APIError(400, "input is empty", param="input", code="invalid_value")
        texts = [t for t in given if isinstance(t, str)]
        if len(texts) != len(given):
            raise APIError(400, "input as token ids is not supported: send text (the ids of "
                           "another tokenizer would not mean anything to this model)",
                           param="input", code="unsupported_parameter")
        if len(texts) > settings.max_embedding_inputs:
            raise APIError(400, f"input holds {len(texts)} texts, over this server's limit of "
                           f"{settings.max_embedding_inputs}", param="input",
                           code="limit_exceeded")
        for i, t in enumerate(texts):
            if not t.strip():
                raise APIError(400, f"input[{i}] is empty", param="input", code="invalid_value")
        embedder = await asyncio.to_thread(engine.embedder)
        if body.dimensions is not None and body.dimensions > embedder.dimensions:
            raise APIError(400, f"dimensions = {body.dimensions} is over the model's "
                           f"{embedder.dimensions}", param="dimensions", code="invalid_value")

        def run() -> tuple[Any, int]:
            tokens = sum(len(t) for t in embedder.tokenize(texts))
            return embedder.embed(texts, dimensions=body.dimensions), tokens

        vectors, n_tokens = await asyncio.to_thread(run)
        request.state.tokens = (n_tokens, 0)
        metrics.prompt_tokens.inc(n_tokens)
        data = []
        for i, row in enumerate(vectors):
            value: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else row.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # --- models, tokenizer -------------------------------------------------------------------
    def model_cards() -> list[dict[str, Any]]:
        engine.require()
        cards = [{"id": engine.model_id, "object": "model", "created": engine.created,
                  "owned_by": "xybrid", "meta": {"n_ctx": engine.n_ctx,
                                                  "parallel": settings.parallel}}]
        if settings.embedding_model is not None:
            cards.append({"id": engine.embedding_model_id, "object": "model",
                          "created": engine.created, "owned_by": "xybrid"})
        return cards

    @app.get("/v1/models", summary="The served models")
    async def list_models(request: Request) -> JSONResponse:
        route(request, "/v1/models")
        return JSONResponse({"object": "list", "data": model_cards()})

    @app.get("/v1/models/{model_id:path}", summary="One served model")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        route(request, "/v1/models/{model_id}")
        for card in model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise APIError(404, f"the model {model_id!r} is not served here", param="model",
                       code="model_not_found")

    @app.post("/tokenize", summary="Text to token ids (llama.cpp server's shape)")
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        route(request, "/tokenize")
        model = engine.require().model
        tokens = model.tokenize(body.content, add_special=body.add_special, parse_special=True)
        if body.with_pieces:
            # A byte-level token may hold part of a UTF-8 character: its piece
            # is then the list of its bytes, as llama.cpp's server sends it.
            return JSONResponse({"tokens": [
                {"id": t, "piece": _piece(model.token_to_piece(t, special=True))}
                for t in tokens]})
        return JSONResponse({"tokens": tokens})

    @app.post("/detokenize", summary="Token ids to text")
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        route(request, "/detokenize")
        return JSONResponse({"content": _detokenize(engine.require(), body.tokens, "tokens")})

    # --- operations --------------------------------------------------------------------------
    @app.get("/health", summary="200 when ready; 503 while loading or stopping")
    async def health(request: Request) -> JSONResponse:
        route(request, "/health")
        status = {"ready": "ok"}.get(engine.state, engine.state)
        body: dict[str, Any] = {"status": status, "model": engine.model_id or None,
                                "slots": {"parallel": settings.parallel,
                                          "in_flight": engine.admission.in_flight,
                                          "capacity": engine.admission.capacity,
                                          **engine.stats()}}
        if engine.error:
            body["error"] = engine.error
        headers = None if status == "ok" else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        route(request, "/metrics")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _detokenize(backend: Any, tokens: list[int], param: str) -> str:
    model = backend.model
    n_vocab = int(model.n_vocab)
    for i, t in enumerate(tokens):
        if not 0 <= t < n_vocab:
            raise APIError(400, f"{param}[{i}] = {t} is not a token id of this model "
                           f"(0..{n_vocab - 1})", param=f"{param}[{i}]", code="invalid_value")
    return str(model.detokenize(tokens))
