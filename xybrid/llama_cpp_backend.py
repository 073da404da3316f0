"""LlamaCppBackend: the llama.cpp engine behind the :class:`LlmBackend` interface.

One backend owns one model and one context, run in one of two ways:

- ``LlmConfig(parallel=1)`` (default): one sequence, calls serialised by a
  lock, on the single-sequence loop (the native loop runs with the GIL
  released, so other Python threads keep running while a call waits or
  generates). Multi-turn reuse: the backend remembers exactly which tokens
  sit in the KV cache and the next call decodes only what differs
  (:mod:`xybrid.prefix_cache`). Recurrent and hybrid models, and calls that
  would overflow the window, start from an empty cache; a failed or
  cancelled call clears it.
- ``LlmConfig(parallel=N)``: N sequences share one KV cache and a native
  :class:`~xybrid._native._engine.Scheduler` decodes every running request
  in one ``llama_decode`` per step. Calls from many threads and asyncio
  tasks run at once; each goes to the slot whose cache shares the longest
  prefix with its prompt, so a multi-turn chat keeps its cache there.

Either way a request goes through the same stages (:mod:`xybrid.pipeline`):
prepare (template, tokens, sampler), run, finish (clean-up, tool calls,
telemetry).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xybrid._native import _engine
from xybrid.backend import LlmBackend, MessageLike, StreamingCallback, stream_in_thread
from xybrid.chat_templates import ChatTemplate, resolve_chat_template
from xybrid.errors import (
    IntegrityError,
    InvalidInputError,
    ModelNotLoadedError,
    RemoteServerError,
    ToolCallError,
    UnsupportedInputError,
    XybridError,
)
from xybrid.model_files import resolve_model_path
from xybrid.pipeline import (
    ModelView,
    PieceStream,
    PreparedRequest,
    as_messages,
    build_output,
    check_config,
    check_raw_prompt,
    make_sampler,
    prepare_chat,
    prepare_raw,
)
from xybrid.prefix_cache import PrefixCacheState
from xybrid.session_state import (
    SessionState,
    capture_state,
    model_fingerprint,
    read_session_file,
    restore_state,
    write_session_file,
)
from xybrid.types import GenerationConfig, GenerationOutput, LlmConfig, PartialToken

__all__ = [
    "Capabilities",
    "LlamaCppBackend",
    "ToolCallError",
    "execution_provider",
    "sha256_file",
    "verify_sha256",
]

_SEQ = 0  # the single-sequence path drives sequence 0 of its context
# Reused prefixes end on a multiple of this, so a cached run decodes with the
# same row grouping as a fresh one and gives identical results.
_PREFIX_ALIGN = 32


def execution_provider() -> str:
    """Where this build runs the model: ``"cuda"``, ``"metal"`` or ``"cpu"``."""
    from xybrid import _build_info

    if _build_info.CUDA:
        return "cuda"
    import sys

    return "metal" if sys.platform == "darwin" else "cpu"


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where there is one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class _Loaded:
    config: LlmConfig
    path: Path
    model: Any  # _engine.Model
    context: Any  # _engine.Context
    template: ChatTemplate
    bos_text: str
    multimodal: Any = None  # _engine.Multimodal when an mmproj is loaded
    scheduler: Any = None  # _engine.Scheduler when parallel > 1
    state_bytes: int = 0  # the context's state size, measured at load
    view: ModelView = field(init=False)

    def __post_init__(self) -> None:
        self.view = ModelView(self.model, self.template, self.bos_text, int(self.context.n_ctx),
                              self.multimodal, int(self.model.max_piece_bytes))


@dataclass(frozen=True)
class Capabilities:
    """What the loaded model and this build can do."""

    model_label: str
    vision: bool
    audio: bool
    audio_sample_rate: int | None
    embeddings: bool
    tools: bool
    thinking: bool
    accelerator: str
    gpu_layers: int
    devices: tuple[str, ...] = field(default=())
    # Where the layers are: one entry per device holding any, the local CPU
    # first: {"device", "endpoint" (RPC servers), "layers"} (see xybrid.rpc).
    placement: tuple[dict[str, Any], ...] = field(default=())


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (large models stay out of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`IntegrityError` unless the file's SHA-256 is ``expected``.

    The comparison is constant-time, so a digest cannot be probed byte by byte.
    """
    actual = sha256_file(path)
    if not hmac.compare_digest(actual.encode(), expected.lower().encode()):
        raise IntegrityError(
            f"{path}: SHA-256 mismatch (expected {expected.lower()}, got {actual}); "
            "refusing to load a file that is not the one you asked for")


class LlamaCppBackend(LlmBackend):
    """Run GGUF models with llama.cpp.

    ``LlamaCppBackend(config)`` loads at once; ``LlamaCppBackend()`` waits for
    :meth:`load`. Use it as a context manager to unload on exit::

        with LlamaCppBackend(LlmConfig("model.gguf")) as llm:
            out = llm.generate([ChatMessage.user("Hi!")], GenerationConfig(max_tokens=32))

    With ``LlmConfig(parallel=N)`` every generation method may be called
    from many threads and asyncio tasks at once; the requests are decoded
    together (see the module docstring).
    """

    def __init__(self, config: LlmConfig | None = None) -> None:
        self._lock = _BackendLock()
        self._loaded: _Loaded | None = None
        self._cache = PrefixCacheState()
        self._waiting = 0  # single-sequence callers waiting for the lock
        self._waiting_guard = threading.Lock()  # `+=` on an attribute is not atomic
        self._last_cached: int | None = None  # batched: the latest request's reuse
        # Batched requests in flight, for cancel().
        self._in_flight: weakref.WeakSet[Any] = weakref.WeakSet()
        if config is not None:
            self.load(config)

    # --- identity -------------------------------------------------------------
    @property
    def name(self) -> str:
        return "llama-cpp"

    @property
    def supported_formats(self) -> tuple[str, ...]:
        return ("gguf",)

    @property
    def wire_label(self) -> str | None:
        return "llamacpp"

    @property
    def execution_provider(self) -> str:
        return execution_provider()

    # --- lifecycle ---------------------------------------------------------------
    def load(self, config: LlmConfig) -> None:
        """Load ``config``'s model, then free the one it replaces (so a failed
        load keeps the old one). With ``rpc_servers`` the old model is freed
        first when it uses any of the same servers: each serves one client."""
        if not isinstance(config, LlmConfig):
            raise InvalidInputError(f"load() needs an LlmConfig, got {type(config).__name__}")
        self._lock.check_not_held()  # before the expensive part, which it would waste
        path = resolve_model_path(config.model_path)
        if config.model_sha256:
            verify_sha256(path, config.model_sha256)
        mmproj = None
        if config.mmproj_path is not None:
            mmproj = resolve_model_path(config.mmproj_path)
            if config.mmproj_sha256:
                verify_sha256(mmproj, config.mmproj_sha256)
        elif config.mmproj_sha256:
            raise InvalidInputError("LlmConfig.mmproj_sha256 is set but mmproj_path is not")
        gpu_layers = config.gpu_layers
        if config.rpc_servers:
            from xybrid import rpc

            # A server serves one client (connection) at a time: the model
            # loaded now lets go of the servers before the new one asks.
            held = self._loaded
            if held is not None and set(held.config.rpc_servers) & set(config.rpc_servers):
                self.unload()

            # Each server answers the handshake (with a timeout, naming it
            # if not) before ggml, which would wait for good, connects.
            for server in config.rpc_servers:
                rpc.probe(server)
            gpu_layers = rpc.remote_layers(gpu_layers)
        # More compute threads than CPUs only slows ggml down: its threads
        # meet at a barrier after every graph node, and 512 threads on two
        # cores took minutes for one prompt.
        n_threads = min(config.n_threads, _usable_cpus())
        model = _engine.Model(str(path), gpu_layers=gpu_layers, use_mmap=config.use_mmap,
                              rpc_servers=config.rpc_servers, tensor_split=config.tensor_split)
        multimodal = context = scheduler = None
        try:
            if mmproj is not None:
                multimodal = _engine.Multimodal(model, str(mmproj), n_threads=n_threads,
                                                use_gpu=config.gpu_layers != 0,
                                                flash_attn=config.flash_attn)
            context = _engine.Context(
                model,
                n_ctx=config.context_length,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                n_threads=n_threads,
                flash_attn=config.flash_attn,
                n_seq_max=config.parallel,
                # Batched contexts keep only the window of sliding-window
                # layers, as llama.cpp's own servers do (the scheduler checks
                # a prefix is still usable); the single-sequence path cuts
                # its cache anywhere, so it keeps every position.
                swa_full=config.parallel == 1,
            )
            state_bytes = int(context.state_size)
            bos_text = model.token_text(model.bos_token) if model.bos_token >= 0 else ""
            eos_text = model.token_text(model.eos_token) if model.eos_token >= 0 else ""
            template = resolve_chat_template(
                config.chat_template, model.chat_template(), model.architecture,
                bos_token=bos_text, eos_token=eos_text)
            if config.parallel > 1:
                scheduler = _engine.Scheduler(context, max_queued=config.max_queued)
        except BaseException:
            # Children before the model they point into, whatever the GC does.
            if scheduler is not None:
                scheduler.close()
            if context is not None:
                context.close()
            if multimodal is not None:
                multimodal.close()
            model.close()
            raise
        loaded = _Loaded(config, path, model, context, template, bos_text, multimodal, scheduler,
                         state_bytes)
        try:
            self._lock.acquire()
        except BaseException:
            _free(loaded)
            raise
        try:
            previous, self._loaded = self._loaded, loaded
            self._cache.reset()
            self._last_cached = None
        finally:
            self._lock.release()
        if previous is not None:
            _free(previous)

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def unload(self) -> None:
        """Free the model. Batched requests still running end "cancelled"."""
        with self._lock:
            previous, self._loaded = self._loaded, None
            self._cache.reset()
        if previous is not None:
            _free(previous)

    def _require(self, live: bool = False) -> _Loaded:
        """The loaded model; with ``live``, for a call that computes, also
        refuse one that lost an RPC server (its weights there are gone)."""
        loaded = self._loaded
        if loaded is None:
            raise ModelNotLoadedError("no model is loaded: call load(LlmConfig(...)) first")
        if live and loaded.config.rpc_servers and loaded.model.rpc_lost:
            from xybrid._native import _engine

            endpoint, _, reason = _engine.rpc_last_failure().partition(": ")
            raise RemoteServerError(
                f"the model lost RPC server {endpoint or '(unknown)'} ({reason or 'no reason'}): "
                f"load it again (backend.load) once the server is back",
                endpoint=endpoint or None)
        return loaded

    # --- facts ----------------------------------------------------------------------
    @property
    def supports_streaming(self) -> bool:
        return True

    @property
    def model_path(self) -> Path | None:
        return self._loaded.path if self._loaded else None

    @property
    def chat_template_name(self) -> str | None:
        """Which template formats chat prompts (``"gemma"``, ``"jinja:model"``, ...)."""
        return self._loaded.template.name if self._loaded else None

    @property
    def model(self) -> Any:
        """The native :class:`xybrid._native._engine.Model` (tokenizer, metadata)."""
        return self._require().model

    def context_length(self) -> int | None:
        # The window llama.cpp actually made (it rounds the requested size up,
        # e.g. 100 -> 256), which is also the one the overflow checks use.
        loaded = self._loaded
        return int(loaded.context.n_ctx) if loaded else None

    @property
    def model_label(self) -> str:
        """GGUF ``general.name``, else the file name without extension."""
        loaded = self._require()
        return str(loaded.model.name or loaded.path.stem)

    def capabilities(self) -> Capabilities:
        """Vision/audio (from the projector), embeddings, tools and thinking
        (from the chat template), and where the model runs."""
        loaded = self._require()
        mm = loaded.multimodal
        source = getattr(loaded.template, "source", "") or ""
        n_layer = int(loaded.model.n_layer)
        wanted = loaded.config.gpu_layers
        offloaded = 0
        placement: tuple[dict[str, Any], ...] = ()
        remote = loaded.model.rpc_devices
        if remote:
            from xybrid.rpc import device_layers

            held = [d for d in device_layers(n_layer, wanted, remote, loaded.config.tensor_split)
                    if d["layers"]]
            offloaded = sum(d["layers"] for d in held if d["endpoint"] is not None)
            placement = tuple({k: d[k] for k in ("device", "endpoint", "layers")} for d in held)
        elif _engine.supports_gpu_offload():
            offloaded = n_layer + 1 if wanted < 0 else min(wanted, n_layer + 1)
        return Capabilities(
            model_label=self.model_label,
            vision=bool(mm is not None and mm.vision),
            audio=bool(mm is not None and mm.audio),
            audio_sample_rate=mm.audio_sample_rate if mm is not None else None,
            embeddings=True,
            tools="tools" in source,
            thinking="<think>" in source or "enable_thinking" in source,
            accelerator=execution_provider(),
            gpu_layers=offloaded,
            devices=tuple(d["description"] for d in _engine.devices())
            + tuple(f"{d['name']} ({d['endpoint']})" for d in remote),
            placement=placement,
        )

    def memory_usage(self) -> int | None:
        """Bytes of weights plus the context's state (KV cache), from llama.cpp."""
        loaded = self._loaded
        if loaded is None:
            return None
        return int(loaded.model.size) + loaded.state_bytes

    def last_cached_prefix_len(self) -> int | None:
        if self._loaded is not None and self._loaded.scheduler is not None:
            return self._last_cached
        return self._cache.last_prefix_hit

    @property
    def parallel(self) -> int:
        """How many requests are decoded together (``LlmConfig.parallel``)."""
        return self._require().config.parallel

    def stats(self) -> dict[str, int | float]:
        """Engine load now: ``parallel``, ``running`` and ``queued`` requests,
        ``kv_cells_used`` / ``kv_cells_total`` (positions the sequences hold),
        ``batch_occupancy`` (mean sequences per decode step, batched only) and
        counters since load (steps, requests, prompt tokens reused from a
        slot's cache or shared from another slot, caches evicted, requests
        ended by a full cache)."""
        loaded = self._loaded
        if loaded is None:
            return {}
        if loaded.scheduler is not None:
            return dict(loaded.scheduler.stats())
        busy = self._lock.locked()
        return {
            "parallel": 1,
            "running": int(busy),
            "queued": self._waiting,
            "kv_cells_used": len(self._cache.cached_tokens),
            "kv_cells_total": int(loaded.context.n_ctx),
        }

    def cancel(self) -> bool:
        """Stop the running generation (from any thread); with ``parallel``
        > 1, every request running or waiting on this backend. It returns
        with finish_reason "cancelled"; on the single-sequence path the KV
        cache is cleared. False when idle."""
        loaded = self._loaded
        if loaded is None:
            return False
        if loaded.scheduler is not None:
            gens = list(self._in_flight)
            for gen in gens:
                gen.cancel()
            return bool(gens)
        return bool(loaded.context.cancel())

    def reset_cache(self) -> None:
        """Forget the conversation held in the KV cache (batched: the caches
        of the idle slots; running requests keep theirs)."""
        loaded = self._require()
        if loaded.scheduler is not None:
            loaded.scheduler.clear_idle_caches()
            self._last_cached = None
            return
        with self._lock:
            loaded.context.memory_clear()
            self._cache.reset()

    # --- prompt preparation --------------------------------------------------------
    def format_chat(self, messages: Sequence[MessageLike], *, tools: Any = None) -> str:
        """The prompt text the chat template makes of ``messages``."""
        loaded = self._require()
        return loaded.template.render(as_messages(messages), add_generation_prompt=True,
                                      tools=tools)

    # --- generation ------------------------------------------------------------------
    def generate(self, messages: Sequence[MessageLike],
                 config: GenerationConfig | None = None) -> GenerationOutput:
        return self._call(_chat(messages), config, None)

    def generate_streaming(self, messages: Sequence[MessageLike], config: GenerationConfig | None,
                           on_token: StreamingCallback) -> GenerationOutput:
        if not callable(on_token):
            raise InvalidInputError("on_token must be callable")
        return self._call(_chat(messages), config, on_token)

    def generate_raw(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                     on_token: StreamingCallback | None = None) -> GenerationOutput:
        """Continue ``prompt`` verbatim: no template, and only
        ``config.stop_sequences`` stop it. The text is returned exactly as
        generated, leading space included.

        ``prompt`` is text (BOS added, special markers parsed) or a sequence
        of token ids used as they are, for callers that tokenize themselves.
        With ``on_token`` the pieces are streamed to it as they are made.
        """
        if on_token is not None and not callable(on_token):
            raise InvalidInputError("on_token must be callable")
        return self._call(_raw(prompt), config, on_token)

    def stream(self, messages: Sequence[MessageLike],
               config: GenerationConfig | None = None) -> Iterator[PartialToken]:
        """Yield the reply as it is generated, then a final empty piece with
        ``finish_reason``. Closing the generator early cancels the generation
        (on the single-sequence path the KV cache is cleared, as after any
        cancelled call)."""
        return _Stream(self, _chat(messages), check_config(config))

    def stream_raw(self, prompt: str | Sequence[int],
                   config: GenerationConfig | None = None) -> Iterator[PartialToken]:
        """:meth:`stream` for a raw prompt (text or token ids, as for
        :meth:`generate_raw`)."""
        return _Stream(self, _raw(prompt), check_config(config))

    async def astream(self, messages: Sequence[MessageLike],
                      config: GenerationConfig | None = None) -> AsyncIterator[PartialToken]:
        """Async :meth:`stream`. With ``parallel`` > 1 no thread is used: the
        scheduler pokes a pipe the event loop watches. Closing the generator
        early cancels the request."""
        prepare = _chat(messages)
        loaded = self._loaded
        if loaded is None or loaded.scheduler is None:
            async for piece in super().astream(messages, config):
                yield piece
            return
        async for piece in self._astream_batched(prepare, check_config(config)):
            yield piece

    async def astream_raw(self, prompt: str | Sequence[int],
                          config: GenerationConfig | None = None) -> AsyncIterator[PartialToken]:
        """Async :meth:`stream_raw` (see :meth:`astream`)."""
        prepare = _raw(prompt)
        config = check_config(config)
        loaded = self._loaded
        if loaded is None or loaded.scheduler is None:
            async for piece in stream_in_thread(lambda: self.stream_raw(prompt, config)):
                yield piece
            return
        async for piece in self._astream_batched(prepare, config):
            yield piece

    def generate_batch(self, requests: Sequence[Any],
                       config: GenerationConfig | Sequence[GenerationConfig] | None = None, *,
                       raw: bool = False,
                       return_exceptions: bool = False) -> list[Any]:
        """Run many requests and return their outputs in input order.

        Each request is a message list (or, with ``raw=True``, a prompt
        string or token ids). ``config`` is one config for all or one per
        request. With ``parallel`` > 1 the requests are decoded together,
        fed to the scheduler as slots and queue room free up; otherwise one
        after another. A request that fails raises its error (the others are
        cancelled), or with ``return_exceptions=True`` stands in the list as
        the exception while the others complete.
        """
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
            raise InvalidInputError("requests must be a sequence of requests")
        if config is None or isinstance(config, GenerationConfig):
            configs = [check_config(config)] * len(requests)
        else:
            configs = [check_config(c) for c in config]
            if len(configs) != len(requests):
                raise InvalidInputError(
                    f"config has {len(configs)} entries for {len(requests)} requests")
        prepares = [_raw(r) if raw else _chat(r) for r in requests]
        loaded = self._require(live=True)
        results: list[Any] = []
        if loaded.scheduler is None:
            for prepare, cfg in zip(prepares, configs):
                try:
                    results.append(self._call(prepare, cfg, None))
                except XybridError as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
            return results
        started: list[Any] = []
        try:
            for prepare, cfg in zip(prepares, configs):
                try:
                    prepared, gen = self._submit(prepare, cfg, streaming=False, block=True)
                    started.append((prepared, cfg, gen))
                except XybridError as exc:
                    if not return_exceptions:
                        raise
                    started.append(exc)
            for item in started:
                if isinstance(item, BaseException):
                    results.append(item)
                    continue
                prepared, cfg, gen = item
                try:
                    results.append(self._finish_batched(prepared, cfg, gen.wait()))
                except XybridError as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        except BaseException:
            for item in started:
                if not isinstance(item, BaseException):
                    item[2].cancel()
            raise
        return results

    # --- running: the single-sequence path -----------------------------------------
    def _call(self, prepare: _Prepare, config: GenerationConfig | None,
              on_token: StreamingCallback | None) -> GenerationOutput:
        config = check_config(config)
        loaded = self._require(live=True)
        if loaded.scheduler is not None:
            return self._call_batched(prepare, config, on_token)
        with self._locked():
            loaded = self._require(live=True)
            prepared = prepare(loaded.view, config)
            # The sampler (which can refuse the grammar) before any cache
            # surgery: a refused request leaves the cache as it was.
            sampler = make_sampler(loaded.model, config, loaded.view.n_ctx)
            tail, n_past, start_ns = self._apply_plan(loaded, prepared, config)
            run = dict(max_tokens=config.max_tokens, n_past=n_past, seq_id=_SEQ,
                       stop=prepared.stops or None, logits_ready=not tail,
                       render_special=bool(prepared.tool_names), logprobs=config.logprobs)
            if on_token is None:
                try:
                    result = loaded.context.generate(tail, sampler, **run)
                except BaseException:
                    self._forget(loaded)
                    raise
                return self._finish(loaded, prepared, config, result, n_past, start_ns)
            gen = loaded.context.stream(tail, sampler, **run)
            return _drive_callback(
                gen, prepared, on_token,
                finish=lambda r: self._finish(loaded, prepared, config, r, n_past, start_ns),
                abandon=lambda: self._forget(loaded))

    def _stream(self, prepare: _Prepare, config: GenerationConfig,
                handle: _StreamHandle) -> Generator[PartialToken, None, None]:
        """The generator behind :meth:`stream` and :meth:`stream_raw`. On the
        single-sequence path it holds the lock from the first ``next()``
        until it is exhausted or closed. ``handle.gen`` is the native
        generation once it runs, for :meth:`_Stream.cancel`."""
        try:
            yield from self._stream_pieces(prepare, config, handle)
        finally:
            handle.ended()

    def _stream_pieces(self, prepare: _Prepare, config: GenerationConfig,
                       handle: _StreamHandle) -> Generator[PartialToken, None, None]:
        loaded = self._require(live=True)
        if loaded.scheduler is not None:
            prepared, gen = self._submit(prepare, config, streaming=True)
            handle.started(gen)
            yield from _drive_iter(gen, prepared,
                                   finish=lambda r: self._finish_batched(prepared, config, r),
                                   abandon=_nothing)
            return
        with self._locked():
            loaded = self._require(live=True)
            prepared = prepare(loaded.view, config)
            sampler = make_sampler(loaded.model, config, loaded.view.n_ctx)
            tail, n_past, start_ns = self._apply_plan(loaded, prepared, config)
            gen = loaded.context.stream(tail, sampler, max_tokens=config.max_tokens,
                                        n_past=n_past, seq_id=_SEQ, stop=prepared.stops or None,
                                        logits_ready=not tail,
                                        render_special=bool(prepared.tool_names),
                                        logprobs=config.logprobs)
            handle.started(gen)
            hold = self._lock
            for piece in _drive_iter(
                    gen, prepared,
                    finish=lambda r: self._finish(loaded, prepared, config, r, n_past, start_ns),
                    abandon=lambda: self._forget(loaded)):
                yield piece
                hold.resumed()  # the stream may go on on another thread

    def _locked(self) -> _Hold:
        """The backend lock, counting the callers that wait for it (stats)."""
        return _Hold(self)

    def _apply_plan(self, loaded: _Loaded, prepared: PreparedRequest,
                    config: GenerationConfig) -> tuple[list[int], int, int | None]:
        """Make the cache ready for ``prepared`` (lock held). Returns the
        tokens still to decode, the cached positions they follow, and when a
        media prompt's evaluation began (None for text)."""
        context = loaded.context
        if prepared.chunks is not None:
            # Media prompts always start from an empty cache: their positions
            # do not map to token ids.
            start_ns = _engine.monotonic_ns()
            context.memory_clear()
            self._cache.reset()
            try:
                n_past = context.eval_chunks(loaded.multimodal, prepared.chunks, 0, _SEQ)
            except BaseException:
                self._forget(loaded)
                raise
            return [], n_past, start_ns
        exact = loaded.config.prefix_reuse == "exact"
        plan = self._cache.plan(prepared.tokens, config.max_tokens, int(context.n_ctx),
                                loaded.model.has_recurrent_state,
                                align=_PREFIX_ALIGN if exact else 1)
        if plan.full_clear or not context.seq_rm(_SEQ, plan.keep, -1):
            context.memory_clear()
            self._cache.reset()
            return prepared.tokens, 0, None
        return plan.tail, plan.keep, None

    def _forget(self, loaded: _Loaded) -> None:
        """After a failed or cancelled run nothing in the cache can be trusted."""
        loaded.context.memory_clear()
        self._cache.reset()

    def _finish(self, loaded: _Loaded, prepared: PreparedRequest, config: GenerationConfig,
                result: Any, n_past: int, start_ns: int | None) -> GenerationOutput:
        """Record what the cache holds now, then build the output."""
        if result.stop_reason == "cancelled" or prepared.chunks is not None:
            # Cancelled: the cache is in an unknown state. Multimodal: its
            # positions do not correspond to token ids, so nothing can be reused.
            self._forget(loaded)
        else:
            # prefix_reuse="exact" records only the prompt. The generated tokens
            # are in the cache too, but they were decoded one at a time, and
            # their values differ slightly from a batched prefill of the same
            # tokens; reusing them would make the next turn differ from a fresh
            # run. seq_rm drops them when the next call keeps a prefix.
            cached = prepared.tokens
            if loaded.config.prefix_reuse == "longest":
                # The reply tokens that went through llama_decode (not the
                # last one sampled) are in the cache after the prompt.
                cached = cached + list(result.tokens[:result.n_past - len(cached)])
            self._cache.commit(cached, n_past)
        if prepared.chunks is not None:
            return build_output(prepared, config, result, start_ns=start_ns,
                                prefilled=prepared.n_prompt)
        return build_output(prepared, config, result)

    # --- running: the batched path -----------------------------------------------------
    def _submit(self, prepare: _Prepare, config: GenerationConfig, *, streaming: bool,
                wake_pipe: bool = False, block: bool = False) -> tuple[PreparedRequest, Any]:
        """Prepare a request and queue it on the scheduler. Under the lock,
        which only load() and unload() hold for long: the model must not be
        freed while its tokenizer and template run. The decode runs after,
        without it."""
        with self._lock:
            loaded = self._require(live=True)
            prepared = prepare(loaded.view, config)
            sampler = make_sampler(loaded.model, config, loaded.view.n_ctx)
            media = {}
            if prepared.chunks is not None:
                media = {"mm": loaded.multimodal, "chunks": prepared.chunks}
            gen = loaded.scheduler.submit(
                prepared.tokens, sampler, max_tokens=config.max_tokens,
                stop=prepared.stops or None, render_special=bool(prepared.tool_names),
                streaming=streaming, wake_pipe=wake_pipe, block=block,
                logprobs=config.logprobs, **media)
        self._in_flight.add(gen)
        return prepared, gen

    def _finish_batched(self, prepared: PreparedRequest, config: GenerationConfig,
                        result: Any) -> GenerationOutput:
        self._last_cached = result.n_cached
        if prepared.chunks is not None:
            return build_output(prepared, config, result, prefilled=prepared.n_prompt)
        return build_output(prepared, config, result)

    def _call_batched(self, prepare: _Prepare, config: GenerationConfig,
                      on_token: StreamingCallback | None) -> GenerationOutput:
        if on_token is None:
            prepared, gen = self._submit(prepare, config, streaming=False)
            try:
                result = gen.wait()
            except BaseException:
                gen.cancel()
                raise
            return self._finish_batched(prepared, config, result)
        prepared, gen = self._submit(prepare, config, streaming=True)
        return _drive_callback(gen, prepared, on_token,
                               finish=lambda r: self._finish_batched(prepared, config, r),
                               abandon=_nothing)

    async def _astream_batched(self, prepare: _Prepare,
                               config: GenerationConfig) -> AsyncIterator[PartialToken]:
        import asyncio

        prepared, gen = self._submit(prepare, config, streaming=True, wake_pipe=True)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = gen.wake_fd
        loop.add_reader(fd, ready.set)
        pieces = _Pieces(prepared)
        ended = False
        try:
            while True:
                ready.clear()
                chunk = gen.poll()
                if chunk is None:
                    break
                if not chunk:
                    await ready.wait()
                    continue
                piece = pieces.chunk(chunk, gen)
                if piece is not None:
                    yield piece
            piece = pieces.tail()
            if piece is not None:
                yield piece
            ended = True
        finally:
            if not ended:
                await _cancel_async(gen, ready)
            loop.remove_reader(fd)
        yield pieces.final(self._finish_batched(prepared, config, gen.result))


    # --- session state (see xybrid.session_state) -------------------------------------
    def save_state(self) -> SessionState:
        """The conversation held in the KV cache, to restore with :meth:`load_state`."""
        with self._lock:
            loaded = self._single_sequence("save_state")
            return capture_state(model_fingerprint(loaded.model, loaded.path), loaded.context,
                                 self._cache, _SEQ)

    def load_state(self, state: SessionState) -> None:
        """Put a saved conversation back into the KV cache; the next call
        continues exactly as it would have on the backend that saved it.
        A state from another model raises :class:`SessionStateError`."""
        with self._lock:
            loaded = self._single_sequence("load_state")
            restore_state(state, model_fingerprint(loaded.model, loaded.path), loaded.context,
                          self._cache, _SEQ)

    def save_session(self, path: str | Path) -> None:
        """:meth:`save_state` into a file."""
        write_session_file(path, self.save_state())

    def load_session(self, path: str | Path) -> None:
        """:meth:`load_state` from a file written by :meth:`save_session`."""
        self.load_state(read_session_file(path))

    def _single_sequence(self, what: str) -> _Loaded:
        loaded = self._require(live=True)
        if loaded.scheduler is not None:
            raise UnsupportedInputError(
                f"{what}() saves and restores the one sequence of a parallel=1 backend; this "
                f"backend runs {loaded.config.parallel} slots (load it with parallel=1)")
        return loaded


class _StreamHandle:
    """The native generation of a stream once it runs, and whether it was
    cancelled before that."""

    def __init__(self) -> None:
        self.gen: Any = None
        self.cancelled = False

    def started(self, gen: Any) -> None:
        self.gen = gen
        if self.cancelled:  # cancel() came first; under the GIL one side sees the other
            gen.cancel()

    def ended(self) -> None:
        # Let go of the generation: backend.cancel() finds the ones in flight
        # through weak references, which this would otherwise keep alive.
        self.gen = None

    def cancel(self) -> None:
        self.cancelled = True
        gen = self.gen
        if gen is not None:
            gen.cancel()


class _Stream(Generator[PartialToken, None, None]):
    """What :meth:`LlamaCppBackend.stream` returns: the pieces, plus
    ``cancel()``, which any thread may call (``close()`` belongs to the
    thread iterating). It stops the generation at its next decode step,
    prefill included; the iterator then ends with ``finish_reason``
    "cancelled". :func:`xybrid.backend.stream_in_thread` uses it so that an
    asyncio timeout or a closed connection does not wait for the prefill."""

    def __init__(self, backend: LlamaCppBackend, prepare: _Prepare,
                 config: GenerationConfig) -> None:
        # The generator gets the handle, not self: a cycle through it would
        # leave an abandoned stream (and the backend lock) to the cyclic GC.
        self._handle = _StreamHandle()
        self._pieces = backend._stream(prepare, config, self._handle)

    def cancel(self) -> None:
        self._handle.cancel()

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> PartialToken:
        return next(self._pieces)

    def send(self, value: None) -> PartialToken:
        return self._pieces.send(value)

    def throw(self, *args: Any) -> PartialToken:
        return self._pieces.throw(*args)

    def close(self) -> None:
        self._pieces.close()


class _BackendLock:
    """The single-sequence lock of a backend.

    Not tied to a thread, unlike an RLock: a stream holds it from its first
    ``next()`` to its end, and may be resumed, finished or closed on another
    thread than the one that opened it (a web framework moves iterators
    between worker threads). ``holder`` follows the thread the holder runs
    on, which makes it not re-entrant in a useful way: a call from that
    thread (from inside an ``on_token`` callback, or while the thread keeps
    one of the backend's streams open) raises at once instead of waiting
    for itself, or, worse, of swapping the model under the open stream.
    Other threads wait, as for any lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None

    def check_not_held(self) -> None:
        if self.holder == threading.get_ident():  # only this thread sets its own ident
            raise XybridError(
                "a generation is already running on this backend in this thread (a stream "
                "still open, or a call from inside its callback): finish or close it first")

    def acquire(self) -> None:
        self.check_not_held()
        self._lock.acquire()
        self.holder = threading.get_ident()

    def release(self) -> None:
        self.holder = None
        self._lock.release()

    def resumed(self) -> None:
        """The holding stream now runs on the calling thread."""
        self.holder = threading.get_ident()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Hold:
    """Holds a backend's lock for one single-sequence call; while it waits
    for the lock it counts in the backend's ``_waiting`` (``stats()["queued"]``)."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.backend = backend

    def __enter__(self) -> None:
        b = self.backend
        with b._waiting_guard:
            b._waiting += 1
        try:
            b._lock.acquire()
        finally:
            with b._waiting_guard:
                b._waiting -= 1

    def __exit__(self, *exc: object) -> None:
        self.backend._lock.release()


_Prepare = Callable[[ModelView, GenerationConfig], PreparedRequest]


def _chat(messages: Sequence[MessageLike]) -> _Prepare:
    """Validate ``messages`` now; prepare them against a model later."""
    msgs = as_messages(messages)
    return lambda view, config: prepare_chat(view, msgs, config)


def _raw(prompt: str | Sequence[int]) -> _Prepare:
    check_raw_prompt(prompt)
    return lambda view, config: prepare_raw(view, prompt, config)


def _nothing() -> None:
    pass


class _Pieces:
    """Numbered :class:`PartialToken` pieces of one generation: the engine's
    chunks filtered for the user (PieceStream), then the final piece."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self.stream = PieceStream(prepared)
        self.index = 0
        self.reported = 0  # tokens whose logprobs went out with a piece
        self.with_logprobs = True  # until the engine says none are collected

    def _piece(self, text: str, token: int | None = None,
               logprobs: Any = None) -> PartialToken | None:
        if not text:
            return None
        piece = PartialToken(text, self.index, self.stream.cumulative, token, logprobs=logprobs)
        self.index += 1
        return piece

    def chunk(self, chunk: str, gen: Any = None) -> PartialToken | None:
        """The piece for an engine chunk (None when the filter holds it all
        back); with ``gen``, it names the chunk's last token and carries the
        logprobs of the tokens since the last piece (when collected)."""
        text = self.stream.push(chunk)
        n = gen.tokens_at_last_chunk if gen is not None and text else 0
        logprobs = None
        if n and self.with_logprobs:
            got = gen.logprobs_between(self.reported, n)
            if got is None:
                self.with_logprobs = False
            else:
                logprobs = tuple((t, lp, tuple(top)) for t, lp, top in got)
                self.reported = n
        return self._piece(text, gen.token_at(n - 1) if n else None, logprobs)

    def tail(self) -> PartialToken | None:
        """What the filter held back, once the generation has ended."""
        return self._piece(self.stream.finish())

    def final(self, output: GenerationOutput) -> PartialToken:
        rest = None
        if output.logprobs is not None:
            tops = output.top_logprobs or ()
            rest = tuple((output.token_ids[k], output.logprobs[k],
                          tops[k] if k < len(tops) else ())
                         for k in range(self.reported, len(output.logprobs)))
        return PartialToken("", self.index, output.text, None, output.finish_reason,
                            output.tool_calls, output, logprobs=rest)


def _drive_iter(gen: Any, prepared: PreparedRequest, *, finish: Callable[[Any], GenerationOutput],
                abandon: Callable[[], None]) -> Iterator[PartialToken]:
    """Pieces of a running generation, then the final piece with the
    output. Closing early cancels the generation and calls ``abandon``."""
    pieces = _Pieces(prepared)
    finished = False
    try:
        for chunk in gen:
            piece = pieces.chunk(chunk, gen)
            if piece is not None:
                yield piece
        piece = pieces.tail()
        if piece is not None:
            yield piece
        finished = True
    finally:
        if not finished:
            gen.close()
            abandon()
    yield pieces.final(finish(gen.result))


def _drive_callback(gen: Any, prepared: PreparedRequest, on_token: StreamingCallback, *,
                    finish: Callable[[Any], GenerationOutput],
                    abandon: Callable[[], None]) -> GenerationOutput:
    """Feed a running generation's pieces to ``on_token``; ``False`` from it
    cancels. An exception from it (or from the generation) cancels, calls
    ``abandon`` and propagates. The final piece carries the output."""
    pieces = _Pieces(prepared)
    try:
        for chunk in gen:
            piece = pieces.chunk(chunk)
            if piece is not None and on_token(piece) is False:
                gen.close()
                break
    except BaseException:
        gen.close()
        abandon()
        raise
    result = gen.result
    if result.stop_reason != "cancelled":
        piece = pieces.tail()
        if piece is not None:
            on_token(piece)
    output = finish(result)
    on_token(pieces.final(output))
    return output


async def _cancel_async(gen: Any, ready: Any) -> None:
    """Cancel a batched generation from a coroutine and wait for the
    scheduler to let it go without blocking the event loop."""
    gen.cancel()
    try:
        while True:
            ready.clear()
            chunk = gen.poll()
            if chunk is None:
                return
            if not chunk:
                await ready.wait()
    except BaseException:
        # Cancelled again while waiting, or the generation's own error: the
        # blocking close still releases it safely (within one step).
        gen.close()


def _free(loaded: _Loaded) -> None:
    # Children first: the scheduler's thread uses the context, which points
    # into the model.
    if loaded.scheduler is not None:
        loaded.scheduler.close()
    if loaded.multimodal is not None:
        loaded.multimodal.close()
    loaded.context.close()
    loaded.model.close()
