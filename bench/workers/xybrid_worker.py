"""The xybrid contestant: one workload in this process (see _common.py).

Variants (``spec["variants"]``, the first one is the primary):

- ``engine``: ``Context.generate(tokens, sampler)``, no callback; the whole
  loop runs in C with the GIL released and Python sees only the result.
- ``engine-stream``: the same call with ``on_text=callback``: the loop runs on
  a native thread and the callback gets each chunk of text.
- ``backend``: the user-level API, ``LlamaCppBackend.generate_raw(token_ids,
  config)``: its prefix cache, validation, text clean-up and telemetry
  included. It loads its own model and context.
- ``backend-stream``: ``LlamaCppBackend.stream_raw(token_ids, config)``,
  iterating the ``PartialToken`` pieces.
- ``compat-stream``: llama-cpp-python code run on xybrid: the facade
  ``xybrid.compat.llama_cpp.Llama.create_completion(token_ids, stream=True)``
  with the peer worker's keywords, iterating its chunk dicts.

To add a variant, write a class with the methods of :class:`Engine`
(``generate``, ``turn1``, ``turn2``) and register it in :data:`VARIANTS`; the
harness picks it up with ``--xybrid-variants`` (see bench/README.md).
"""

from __future__ import annotations

from typing import Any

from _common import Run, load_spec, now_ns, rss_kb, serve

RSS_START = rss_kb()

from xybrid._native._engine import Context, Model, Sampler  # noqa: E402

_shared: dict[str, Any] = {}


def _model_and_context(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """One model, context and sampler per process, shared by the variants."""
    if not _shared:
        model = Model(spec["model"])
        ctx = Context(model, n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], n_ubatch=spec["n_batch"],
                      n_threads=spec["threads"], n_threads_batch=spec["threads"],
                      flash_attn=spec["flash_attn"])
        s = spec["sampler"]
        sampler = Sampler(model, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                          min_p=s["min_p"], seed=s["seed"], grammar=spec.get("grammar"))
        _shared.update(model=model, ctx=ctx, sampler=sampler)
    return _shared["model"], _shared["ctx"], _shared["sampler"]


def _loop(res: Any) -> tuple[int, ...]:
    """The loop's first and last token stamps and its thread's usage."""
    first_last = (res.token_ns[0], res.token_ns[-1]) if res.token_ns else (0, 0)
    usage = ((res.t_end_ns - res.t_start_ns, res.loop_cpu_ns, res.loop_waits, res.loop_preemptions)
             if res.loop_cpu_ns is not None else (-1, -1, -1, -1))
    return (*first_last, *usage)


class Engine:
    """``xybrid._native._engine.Context.generate`` without a callback."""

    streaming = False

    def __init__(self, spec: dict[str, Any]) -> None:
        self.model, self.ctx, self.sampler = _model_and_context(spec)

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.ctx.memory_clear()
        t0 = now_ns()
        res = self.ctx.generate(tokens, self.sampler, max_tokens=n_predict)
        t1 = now_ns()
        first = res.token_ns[0] if res.token_ns else t1
        return Run(t0, first, t1, len(res.tokens), list(res.tokens), 1, res.stop_reason, *_loop(res))

    def turn1(self, prefix: list[int]) -> None:
        self.ctx.memory_clear()
        self.ctx.generate(prefix, self.sampler, max_tokens=1)

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        """TTFT of the next turn, keeping the cached prefix or not."""
        t0 = now_ns()
        if reuse:
            self.ctx.seq_rm(0, prefix_len, -1)
            self.ctx.generate(tokens[prefix_len:], self.sampler, max_tokens=1, n_past=prefix_len)
        else:
            self.ctx.memory_clear()
            self.ctx.generate(tokens, self.sampler, max_tokens=1)
        return now_ns() - t0


class EngineStream(Engine):
    """``Context.generate(..., on_text=callback)``: a callback per chunk."""

    streaming = True

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.ctx.memory_clear()
        chunk_ns: list[int] = []
        on_text = lambda chunk: chunk_ns.append(now_ns())  # noqa: E731 - the cheapest consumer
        t0 = now_ns()
        res = self.ctx.generate(tokens, self.sampler, max_tokens=n_predict, on_text=on_text)
        t1 = now_ns()
        first = chunk_ns[0] if chunk_ns else t1
        return Run(t0, first, t1, len(res.tokens), list(res.tokens), len(chunk_ns), res.stop_reason,
                   *_loop(res))

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        first: list[int] = []

        def on_text(chunk: str) -> bool:
            first.append(now_ns())
            return False  # the first chunk is all we time

        t0 = now_ns()
        if reuse:
            self.ctx.seq_rm(0, prefix_len, -1)
            self.ctx.generate(tokens[prefix_len:], self.sampler, max_tokens=1, n_past=prefix_len,
                              on_text=on_text)
        else:
            self.ctx.memory_clear()
            self.ctx.generate(tokens, self.sampler, max_tokens=1, on_text=on_text)
        return (first[0] if first else now_ns()) - t0


_backend: dict[str, Any] = {}


def _user_backend(spec: dict[str, Any]) -> tuple[Any, Any]:
    """One ``LlamaCppBackend`` per process, shared by the backend variants,
    set up like the engine variants' context, and the GenerationConfig of the
    benchmark's sampler."""
    from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig

    if not _backend:
        backend = LlamaCppBackend()
        backend.load(LlmConfig(spec["model"], context_length=spec["n_ctx"], n_threads=spec["threads"],
                               n_batch=spec["n_batch"], n_ubatch=spec["n_batch"],
                               flash_attn=spec["flash_attn"],
                               prefix_reuse=spec["prefix_reuse"]))
        s = spec["sampler"]
        config = GenerationConfig(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                  min_p=s["min_p"], seed=s["seed"], max_tokens=spec["n_predict"],
                                  grammar=spec.get("grammar"))
        _backend.update(backend=backend, config=config)
    return _backend["backend"], _backend["config"]


class Backend:
    """``LlamaCppBackend.generate_raw(token_ids, config)``, no callback.

    Its prefix cache is reset before each measured generation (every
    contestant starts from an empty cache). ``LlmConfig.prefix_reuse`` comes
    from ``--backend-prefix-reuse``: with "longest" (the library's default)
    the multi-turn turn re-decodes what the engine's ``seq_rm`` does; with
    "exact" reuse ends on a multiple of 32 tokens, up to 31 more.
    """

    streaming = False

    def __init__(self, spec: dict[str, Any]) -> None:
        self.backend, self.config = _user_backend(spec)

    def _config(self, n_predict: int) -> Any:
        return self.config.replace(max_tokens=n_predict)

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.backend.reset_cache()
        t0 = now_ns()
        out = self.backend.generate_raw(tokens, self._config(n_predict))
        t1 = now_ns()
        # The backend reports TTFT from the start of its engine call; adding
        # it to t0 counts the backend's own set-up as decode time.
        first = t0 + int((out.ttft_ms or 0.0) * 1e6)
        return Run(t0, first, t1, out.tokens_generated, list(out.token_ids), 1, out.stop_reason)

    def turn1(self, prefix: list[int]) -> None:
        self.backend.reset_cache()
        self.backend.generate_raw(prefix, self._config(1))

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        if reuse:
            self.turn1(tokens[:prefix_len])  # the cache holds the previous turn only
        else:
            self.backend.reset_cache()
        t0 = now_ns()
        out = self.backend.generate_raw(tokens, self._config(1))
        return int((out.ttft_ms or 0.0) * 1e6) + (out.ttft_ms is None) * (now_ns() - t0)


class BackendStream(Backend):
    """``LlamaCppBackend.stream_raw(token_ids, config)``: a piece per chunk."""

    streaming = True

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.backend.reset_cache()
        first = 0
        n_chunks = 0
        last: Any = None
        t0 = now_ns()
        for piece in self.backend.stream_raw(tokens, self._config(n_predict)):
            if not first and piece.text:
                first = now_ns()
            n_chunks += bool(piece.text)
            last = piece
        t1 = now_ns()
        out = last.output  # the final piece carries the whole GenerationOutput
        return Run(t0, first or t1, t1, out.tokens_generated, list(out.token_ids), n_chunks,
                   out.stop_reason)

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        if reuse:
            self.turn1(tokens[:prefix_len])
        else:
            self.backend.reset_cache()
        t0 = now_ns()
        pieces = self.backend.stream_raw(tokens, self._config(1))
        first = 0
        for piece in pieces:
            if piece.text:
                first = now_ns()
                break
        pieces.close()
        return (first or now_ns()) - t0


class CompatStream:
    """The llama-cpp-python facade, called as the peer worker calls the
    peer: ``create_completion(tokens, max_tokens=N, stream=True, ...)``."""

    streaming = True

    def __init__(self, spec: dict[str, Any]) -> None:
        from xybrid.compat.llama_cpp import Llama

        self.llm = Llama(spec["model"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"],
                         n_ubatch=spec["n_batch"], n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], flash_attn=spec["flash_attn"],
                         n_gpu_layers=0, use_mmap=True, verbose=False)
        s = spec["sampler"]
        self.kwargs = dict(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                           min_p=s["min_p"], typical_p=1.0, repeat_penalty=1.0,
                           frequency_penalty=0.0, presence_penalty=0.0, seed=s["seed"])
        if spec.get("grammar"):
            from xybrid.compat.llama_cpp import LlamaGrammar

            self.kwargs["grammar"] = LlamaGrammar.from_string(spec["grammar"])

    def _new_tokens(self, n_prompt: int) -> list[int]:
        return [int(t) for t in self.llm.input_ids[n_prompt:self.llm.n_tokens]]

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.llm.reset()
        chunk_ns: list[int] = []
        finish = ""
        t0 = now_ns()
        for chunk in self.llm.create_completion(tokens, max_tokens=n_predict, stream=True, **self.kwargs):
            chunk_ns.append(now_ns())
            finish = chunk["choices"][0]["finish_reason"] or finish
        t1 = now_ns()
        new = self._new_tokens(len(tokens))
        # Chunks with text; the last one carries only the finish reason.
        first = chunk_ns[0] if len(chunk_ns) > 1 else t1
        return Run(t0, first, t1, len(new) + (finish == "length"), new, len(chunk_ns) - 1, finish)

    def turn1(self, prefix: list[int]) -> None:
        self.llm.reset()
        for _chunk in self.llm.create_completion(prefix, max_tokens=1, stream=True, **self.kwargs):
            pass

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        if reuse:
            self.turn1(tokens[:prefix_len])
        else:
            self.llm.reset()
        t0 = now_ns()
        first = 0
        for _chunk in self.llm.create_completion(tokens, max_tokens=1, stream=True, **self.kwargs):
            first = first or now_ns()
        return (first or now_ns()) - t0


VARIANTS: dict[str, type] = {
    "engine": Engine,
    "engine-stream": EngineStream,
    "backend": Backend,
    "backend-stream": BackendStream,
    "compat-stream": CompatStream,
}


def main() -> None:
    spec = load_spec()
    serve(spec, "xybrid", lambda name, s: VARIANTS[name](s), spec["variants"], RSS_START)


if __name__ == "__main__":
    main()
