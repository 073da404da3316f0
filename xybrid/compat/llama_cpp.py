"""A drop-in for llama-cpp-python's high-level API, running on xybrid.

``from xybrid.compat.llama_cpp import Llama`` (or
:func:`xybrid.compat.install_llama_cpp` and then ``from llama_cpp import
Llama``) gives the ``Llama`` class of llama-cpp-python 0.3.x: the same
constructor keywords, methods and result dicts, with the same defaults per
method (kept in :mod:`xybrid.compat.defaults`).

Two paths carry a completion:

- The fast path (no ``logits_processor`` or ``stopping_criteria``): the
  prompt's token ids go to :meth:`LlamaCppBackend.generate_raw` /
  :meth:`~LlamaCppBackend.stream_raw`, so the whole token loop runs in C with
  the GIL released, and the facade only reshapes the result into dicts.
  ``logit_bias`` is a stage of the engine's sampler chain and takes this path
  (biases beyond +-100, ``inf`` included, count as +-100: a ban or a force).
- The token-level path: logits processors and stopping criteria are Python
  callables that must see every token's logits, so such calls
  re-enter Python per token through :meth:`Llama.generate` (``eval`` ->
  ``sample`` on the engine's step primitives), as llama-cpp-python itself
  does. Expect its speed there, not xybrid's.

What differs from llama-cpp-python is listed in the README ("Migrating from
llama-cpp-python"); the short version: ``suffix`` (infill), mirostat,
``typical_p != 1``, LoRA, draft models, KV-type and metadata overrides are
refused with a clear error; logprobs need no ``logits_all=True``; chat
formats are xybrid's templates (``chatml``, ``llama-2``, ``gemma`` or the
model's own); the ctypes functions ``llama_cpp.llama_*`` do not exist.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import numbers
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from xybrid.compat import defaults as D
from xybrid.errors import (
    ContextOverflowError,
    InvalidInputError,
    UnsupportedInputError,
    XybridError,
)
from xybrid.grammar import json_schema_to_gbnf
from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.streaming import CHAT_STOP_PATTERNS
from xybrid.types import MAX_LOGIT_BIAS, MAX_SEED, GenerationConfig, GenerationOutput, LlmConfig

__all__ = [
    "Llama",
    "LlamaState",
    "LlamaTokenizer",
    "LlamaGrammar",
    "LogitsProcessor",
    "LogitsProcessorList",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "MinTokensLogitsProcessor",
    "BaseLlamaCache",
    "LlamaRAMCache",
    "LlamaCache",
    "LLAMA_DEFAULT_SEED",
]

LLAMA_DEFAULT_SEED = D.LLAMA_DEFAULT_SEED

LogitsProcessor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]
StoppingCriteria = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class LogitsProcessorList(list):  # type: ignore[type-arg]
    """Processors applied in order to each step's logits (re-enters Python per token)."""

    def __call__(self, input_ids: npt.NDArray[np.intc],
                 scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):  # type: ignore[type-arg]
    """Stop when any criterion says so (checked in Python after every token)."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any(criterion(input_ids, logits) for criterion in self)


class MinTokensLogitsProcessor:
    """Forbid the end-of-sequence token until ``min_tokens`` have been generated."""

    def __init__(self, min_tokens: int, token_eos: int) -> None:
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: int | None = None

    def __call__(self, input_ids: npt.NDArray[np.intc],
                 scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


class LlamaGrammar:
    """A GBNF grammar for constrained sampling (``from_string``,
    ``from_file``, ``from_json_schema``). llama.cpp parses it when a
    generation uses it; a bad grammar raises :class:`~xybrid.errors.GrammarError`."""

    def __init__(self, *args: Any, _grammar: str, **kwargs: Any) -> None:
        self._grammar = _grammar
        self._root = "root"

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: str | os.PathLike[str], verbose: bool = True) -> LlamaGrammar:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
        if not text:
            raise InvalidInputError(f"{os.fspath(file)}: the grammar file is empty")
        return cls.from_string(text, verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> LlamaGrammar:
        return cls.from_string(json_schema_to_gbnf(json.loads(json_schema)), verbose=verbose)

    @property
    def grammar(self) -> str:
        return self._grammar


class LlamaTokenizer:
    """The peer's tokenizer object over a :class:`Llama`."""

    def __init__(self, llama: Llama) -> None:
        self._llama = llama

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None,
                   special: bool = False) -> bytes:
        return self._llama.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: list[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")


class LlamaState:
    """What :meth:`Llama.save_state` captured: the token record, the last
    logits row and llama.cpp's sequence state bytes."""

    def __init__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single],
                 n_tokens: int, llama_state: bytes, llama_state_size: int, seed: int,
                 fingerprint: str = "") -> None:
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed
        self.fingerprint = fingerprint


class BaseLlamaCache:
    """Prompt-state cache keyed by token sequences (see :class:`LlamaRAMCache`)."""

    def __init__(self, capacity_bytes: int = D.RAM_CACHE_CAPACITY) -> None:
        self.capacity_bytes = capacity_bytes

    @property
    def cache_size(self) -> int:
        raise NotImplementedError

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        raise NotImplementedError

    def __contains__(self, key: Sequence[int]) -> bool:
        raise NotImplementedError

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        raise NotImplementedError


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, least recently used evicted past ``capacity_bytes``.
    A lookup returns the state whose key shares the longest prefix with the
    asked tokens (``KeyError`` when none shares any)."""

    def __init__(self, capacity_bytes: int = D.RAM_CACHE_CAPACITY) -> None:
        super().__init__(capacity_bytes)
        self.cache_state: OrderedDict[tuple[int, ...], LlamaState] = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.llama_state_size for state in self.cache_state.values())

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_key = 0, None
        for k in self.cache_state:
            n = Llama.longest_token_prefix(k, key)
            if n > best:
                best, best_key = n, k
        return best_key

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(found)
        return self.cache_state[found]

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and self.cache_state:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache

# Constructor keywords that need machinery xybrid does not have: refused when set.
_UNSUPPORTED_WHEN_SET = {
    "lora_path": "LoRA adapters", "lora_base": "LoRA adapters", "draft_model": "draft models",
    "kv_overrides": "metadata overrides", "type_k": "KV cache types", "type_v": "KV cache types",
    "chat_handler": "custom chat handlers (use chat_format)", "tokenizer": "tokenizer overrides",
}
_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last"}


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4()}"


class Llama:
    """llama-cpp-python's ``Llama`` on xybrid's engine.

    ``Llama(model_path, n_ctx=512, n_gpu_layers=0, n_threads=None, seed=...,
    chat_format=None, embedding=False, vocab_only=False, ...)``. Keywords
    with no meaning here are accepted and ignored (see
    :data:`xybrid.compat.defaults.IGNORED_KEYWORDS`), unknown ones too, as
    the peer does; those that cannot work (LoRA, draft models, KV types,
    metadata overrides, chat handlers) raise :class:`UnsupportedInputError`.
    """

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        opts = {**D.CONSTRUCTOR, **kwargs}
        for key, what in _UNSUPPORTED_WHEN_SET.items():
            if opts.get(key) is not None:
                raise UnsupportedInputError(f"Llama({key}=...): {what} are not supported by xybrid")
        self.model_path = os.fspath(model_path)
        if not os.path.exists(self.model_path):
            raise InvalidInputError(f"Model path does not exist: {model_path}")
        self.verbose = bool(opts["verbose"])
        self.chat_format = opts["chat_format"]
        template: str | None = None
        if self.chat_format is not None:
            if self.chat_format not in D.CHAT_FORMATS:
                raise UnsupportedInputError(
                    f"chat_format={self.chat_format!r} is not available; xybrid knows "
                    + ", ".join(repr(k) for k in D.CHAT_FORMATS))
            template = D.CHAT_FORMATS[self.chat_format]
        cpus = multiprocessing.cpu_count()
        self.n_threads = int(opts["n_threads"] or max(cpus // 2, 1))
        self.n_threads_batch = int(opts["n_threads_batch"] or cpus)
        self.last_n_tokens_size = int(opts["last_n_tokens_size"])
        self._seed = opts["seed"] or LLAMA_DEFAULT_SEED
        self.cache: BaseLlamaCache | None = None
        self._embedding = bool(opts["embedding"])
        self._pooling_type = int(opts["pooling_type"])
        self._embedder: Any = None
        self._vocab_only = bool(opts["vocab_only"])
        self._backend: LlamaCppBackend | None = None
        self._closed = False
        from xybrid._native import _engine

        n_ctx = int(opts["n_ctx"])
        if self._vocab_only:
            self._model = _engine.Model(self.model_path, vocab_only=True,
                                        use_mmap=bool(opts["use_mmap"]))
            self._n_ctx = n_ctx or int(self._model.n_ctx_train)
            self.n_batch = min(self._n_ctx, int(opts["n_batch"]))
        else:
            if n_ctx == 0:  # 0: the model's training context, as in the peer
                with _engine.Model(self.model_path, vocab_only=True) as probe:
                    n_ctx = int(probe.n_ctx_train)
            self.n_batch = min(n_ctx, int(opts["n_batch"]))
            self._backend = LlamaCppBackend(LlmConfig(
                self.model_path, context_length=n_ctx, gpu_layers=int(opts["n_gpu_layers"]),
                n_threads=self.n_threads, n_batch=self.n_batch,
                n_ubatch=min(self.n_batch, int(opts["n_ubatch"])),
                flash_attn=bool(opts["flash_attn"]), chat_template=template,
                use_mmap=bool(opts["use_mmap"])))
            self._model = self._backend.model
            self._n_ctx = int(self._backend.context_length() or n_ctx)
        self._n_vocab = int(self._model.n_vocab)
        self.metadata: dict[str, str] = dict(self._model.metadata())
        # The token-level layer's view of the sequence (peer: input_ids/scores).
        self.n_tokens = 0
        self.input_ids: npt.NDArray[np.intc] = np.zeros((self._n_ctx,), dtype=np.intc)
        self.scores: npt.NDArray[np.single] = np.zeros((1, self._n_vocab), dtype=np.single)
        self._sampler: Any = None

    # --- facts -------------------------------------------------------------------
    def _engine_backend(self) -> LlamaCppBackend:
        if self._closed:
            raise XybridError("this Llama has been closed")
        if self._backend is None:
            raise InvalidInputError("the model was loaded with vocab_only=True: it has no weights to run")
        return self._backend

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_embd(self) -> int:
        return int(self._model.n_embd)

    def n_vocab(self) -> int:
        return self._n_vocab

    def token_bos(self) -> int:
        return int(self._model.bos_token)

    def token_eos(self) -> int:
        return int(self._model.eos_token)

    def token_nl(self) -> int:
        ids = self._model.tokenize("\n", add_special=False, parse_special=False)
        return int(ids[-1]) if ids else -1

    def pooling_type(self) -> str:
        return _POOLING.get(self._pooling_type, "mean")

    def tokenizer(self) -> LlamaTokenizer:
        return LlamaTokenizer(self)

    @property
    def tokenizer_(self) -> LlamaTokenizer:
        return LlamaTokenizer(self)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, **kwargs: Any) -> Llama:
        raise UnsupportedInputError(
            "Llama.from_pretrained downloads from a model hub, which xybrid does not do; "
            "download the GGUF file and pass its path: Llama(model_path)")

    @property
    def _input_ids(self) -> npt.NDArray[np.intc]:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> npt.NDArray[np.single]:
        return self.scores

    @property
    def eval_tokens(self) -> list[int]:
        return [int(t) for t in self._input_ids]

    # --- tokenizer -------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool = D.TOKENIZE["add_bos"],
                 special: bool = D.TOKENIZE["special"]) -> list[int]:
        """Token ids of UTF-8 ``text`` (``add_bos``: the model's BOS/EOS
        rules; ``special``: parse control-token text)."""
        s = text.decode("utf-8", errors="ignore") if isinstance(text, (bytes, bytearray)) else str(text)
        return list(self._model.tokenize(s, add_special=add_bos, parse_special=special))

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = D.TOKENIZE["special"]) -> bytes:
        """The bytes of ``tokens`` (a leading space after BOS dropped, as the peer does)."""
        out = b"".join(self._model.token_to_piece(int(t), special=special) for t in tokens)
        if tokens and int(tokens[0]) == self.token_bos() and out[:1] == b" ":
            out = out[1:]
        return out

    # --- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Free the model and its contexts now."""
        if self._closed:
            return
        self._closed = True
        if self._embedder is not None:
            self._embedder.close()
        if self._backend is not None:
            self._backend.unload()
        elif self._model is not None:
            self._model.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_cache(self, cache: BaseLlamaCache | None) -> None:
        self.cache = cache

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def reset(self) -> None:
        """Forget the token record; the next call decodes its prompt afresh."""
        self.n_tokens = 0
        backend = self._engine_backend()
        backend.reset_cache()

    # --- the peer's seed rule ----------------------------------------------------------
    def _next_seed(self, seed: int | None) -> int | None:
        """A call with ``seed`` uses it; one without draws the next seed from
        the previous one (so a fixed constructor seed makes a reproducible
        series of calls, as in llama-cpp-python). Returns the engine seed
        (None: llama.cpp picks one)."""
        if seed is not None:
            self.set_seed(seed)
        else:
            self.set_seed(random.Random(self._seed).randint(0, 2**32))
        value = int(self._seed) & 0xFFFFFFFF
        return value if value <= MAX_SEED else None

    def _config(self, *, max_tokens: int, temperature: float, top_p: float, min_p: float,
                typical_p: float, top_k: int, repeat_penalty: float, frequency_penalty: float,
                presence_penalty: float, mirostat_mode: int, stop: Any, seed: int | None,
                grammar: LlamaGrammar | None, logprobs: int | None = None,
                **extra: Any) -> GenerationConfig:
        if mirostat_mode:
            raise UnsupportedInputError("mirostat sampling is not supported by xybrid (mirostat_mode must be 0)")
        if typical_p != 1.0:
            raise UnsupportedInputError("typical sampling is not supported by xybrid (typical_p must be 1.0)")
        temperature, top_k, top_p, min_p = _truncation(temperature, top_k, top_p, min_p)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return GenerationConfig(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            min_p=min_p, top_k=top_k, repetition_penalty=float(repeat_penalty),
            repetition_penalty_window=self.last_n_tokens_size,
            frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
            seed=self._next_seed(seed), stop_sequences=[s for s in stops if s],
            grammar=grammar._grammar if grammar is not None else None, logprobs=logprobs, **extra)

    # --- completions ----------------------------------------------------------------------
    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        return [int(t) for t in prompt]

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
        if n_prompt >= self._n_ctx:
            raise ContextOverflowError(
                f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._n_ctx - n_prompt
        return max_tokens if max_tokens + n_prompt < self._n_ctx else self._n_ctx - n_prompt

    def create_completion(self, prompt: str | list[int], suffix: str | None = D.COMPLETION["suffix"],
                          max_tokens: int | None = D.COMPLETION["max_tokens"],
                          temperature: float = D.COMPLETION["temperature"],
                          top_p: float = D.COMPLETION["top_p"], min_p: float = D.COMPLETION["min_p"],
                          typical_p: float = D.COMPLETION["typical_p"],
                          logprobs: int | None = D.COMPLETION["logprobs"],
                          echo: bool = D.COMPLETION["echo"],
                          stop: str | list[str] | None = D.COMPLETION["stop"],
                          frequency_penalty: float = D.COMPLETION["frequency_penalty"],
                          presence_penalty: float = D.COMPLETION["presence_penalty"],
                          repeat_penalty: float = D.COMPLETION["repeat_penalty"],
                          top_k: int = D.COMPLETION["top_k"], stream: bool = D.COMPLETION["stream"],
                          seed: int | None = D.COMPLETION["seed"], tfs_z: float = D.COMPLETION["tfs_z"],
                          mirostat_mode: int = D.COMPLETION["mirostat_mode"],
                          mirostat_tau: float = D.COMPLETION["mirostat_tau"],
                          mirostat_eta: float = D.COMPLETION["mirostat_eta"],
                          model: str | None = D.COMPLETION["model"],
                          stopping_criteria: StoppingCriteriaList | None = D.COMPLETION["stopping_criteria"],
                          logits_processor: LogitsProcessorList | None = D.COMPLETION["logits_processor"],
                          grammar: LlamaGrammar | None = D.COMPLETION["grammar"],
                          logit_bias: dict[int, float] | None = D.COMPLETION["logit_bias"],
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Continue ``prompt`` (text or token ids). Returns a ``text_completion``
        dict, or with ``stream=True`` an iterator of chunks ending with one
        that carries ``finish_reason``."""
        backend = self._engine_backend()
        if suffix is not None:
            raise UnsupportedInputError("suffix (fill-in-the-middle) is not supported by xybrid")
        if logprobs is not None and echo:
            raise UnsupportedInputError("logprobs together with echo=True (prompt logprobs) is not supported")
        tokens = self._prompt_tokens(prompt)
        budget = self._budget(len(tokens), max_tokens)
        sampling: dict[str, Any] = dict(max_tokens=budget, temperature=temperature, top_p=top_p, min_p=min_p,
                        typical_p=typical_p, top_k=top_k, repeat_penalty=repeat_penalty,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                        mirostat_mode=mirostat_mode, stop=stop, seed=seed, grammar=grammar)
        meta = {"id": _completion_id(), "created": int(time.time()),
                "model": model if model is not None else self.model_path}
        prompt_text = prompt if isinstance(prompt, str) else \
            self.detokenize(tokens).decode("utf-8", errors="ignore")
        if logits_processor is not None or stopping_criteria is not None:
            it = self._completion_python(tokens, prompt_text, sampling, logprobs, meta, stream,
                                         stopping_criteria, logits_processor, logit_bias)
            return it if stream else _last(it, echo, prompt_text)
        self._restore_from_cache(tokens)
        config = self._config(**sampling, logprobs=logprobs, logit_bias=_engine_bias(logit_bias))
        if stream:
            return self._stream_fast(backend, tokens, config, logprobs, meta, prompt_text)
        output = backend.generate_raw(tokens, config)
        self._sync_tokens(backend)
        self._save_to_cache(tokens, output)
        text = output.text
        return _completion(meta, (prompt_text + text) if echo else text,
                           self._completion_logprobs(output, prompt_text) if logprobs is not None else None,
                           _finish(output), len(tokens), output.tokens_generated)

    __call__ = create_completion

    def _stream_fast(self, backend: LlamaCppBackend, tokens: list[int], config: GenerationConfig,
                     logprobs: int | None, meta: dict[str, Any], prompt_text: str,
                     ) -> Iterator[dict[str, Any]]:
        if logprobs is not None:
            # Per-token logprob chunks: the engine reports logprobs with the
            # result, so this stream is cut from the finished generation.
            output = backend.generate_raw(tokens, config)
            self._sync_tokens(backend)
            lp = self._completion_logprobs(output, prompt_text)
            for i, text in enumerate(_pieces_within(lp["tokens"], output.text)):
                one = {k: [v[i]] for k, v in lp.items()}
                yield _chunk(meta, text, one, None)
            yield _chunk(meta, "", None, _finish(output))
            return
        final: GenerationOutput | None = None
        for piece in backend.stream_raw(tokens, config):
            if piece.finish_reason is not None:
                final = piece.output
            elif piece.text:
                yield _chunk(meta, piece.text, None, None)
        self._sync_tokens(backend)
        if final is not None:
            self._save_to_cache(tokens, final)
        yield _chunk(meta, "", None, _finish(final) if final is not None else "stop")

    def _completion_logprobs(self, output: GenerationOutput, prompt_text: str) -> dict[str, Any]:
        """The peer's ``CompletionLogprobs``: pieces, text offsets, the chosen
        tokens' logprobs and the top alternatives (chosen token included)."""
        ids = list(output.token_ids)
        lps = list(output.logprobs or ())
        tops = list(output.top_logprobs or ())
        pieces, offsets, top_dicts = [], [], []
        offset = len(prompt_text)
        for i, tok in enumerate(ids):
            piece = self.detokenize([tok]).decode("utf-8", errors="ignore")
            pieces.append(piece)
            offsets.append(offset)
            offset += len(piece)
            d = {self.detokenize([t]).decode("utf-8", errors="ignore"): lp
                 for t, lp in (tops[i] if i < len(tops) else ())}
            d[piece] = lps[i]
            top_dicts.append(d)
        return {"tokens": pieces, "text_offset": offsets, "token_logprobs": lps[:len(ids)],
                "top_logprobs": top_dicts}

    def _sync_tokens(self, backend: LlamaCppBackend) -> None:
        """After a C-loop call: the token record is what the backend cached."""
        cached = _BackendParts(backend).cached_tokens()
        self.n_tokens = len(cached)
        self.input_ids[: len(cached)] = cached

    # --- prompt-state cache (LlamaRAMCache) ---------------------------------------------
    def _restore_from_cache(self, tokens: list[int]) -> None:
        """The peer's hit rule: load the cached state with the longest common
        prefix when it beats what the context already holds."""
        if not self.cache:
            return
        try:
            item = self.cache[tokens]
        except KeyError:
            return
        cached = self.longest_token_prefix(item.input_ids[: item.n_tokens].tolist(), tokens)
        current = self.longest_token_prefix(self._input_ids.tolist(), tokens)
        if cached > current:
            self.load_state(item)

    def _save_to_cache(self, tokens: list[int], output: GenerationOutput) -> None:
        if self.cache:
            self.cache[tokens + list(output.token_ids)] = self.save_state()

    # --- the token-level path ---------------------------------------------------------------
    def _completion_python(self, tokens: list[int], prompt_text: str, sampling: dict[str, Any],
                           logprobs: int | None, meta: dict[str, Any], stream: bool,
                           stopping_criteria: StoppingCriteriaList | None,
                           logits_processor: LogitsProcessorList | None,
                           logit_bias: dict[int, float] | None) -> Iterator[dict[str, Any]]:
        """A completion driven token by token from Python (processors,
        criteria, with any logit bias added to the scores), with the peer's
        stop and UTF-8 rules."""
        if logprobs is not None:
            raise UnsupportedInputError(
                "logprobs with logits_processor/stopping_criteria is not supported")
        processors = LogitsProcessorList(logits_processor or [])
        if logit_bias:
            bias = {int(k): float(v) for k, v in logit_bias.items()}

            def add_bias(_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
                for tok, b in bias.items():
                    scores[tok] += b
                return scores
            processors.append(add_bias)
        config = self._config(**sampling)
        self._restore_from_cache(tokens)
        stops = [s.encode("utf-8") for s in config.stop_sequences]
        completion: list[int] = []
        finish = "length"
        sent = 0  # bytes already streamed
        text = b""
        for tok in self.generate(tokens, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                                 temp=config.temperature, repeat_penalty=config.repetition_penalty,
                                 frequency_penalty=config.frequency_penalty,
                                 presence_penalty=config.presence_penalty,
                                 logits_processor=processors or None,
                                 stopping_criteria=stopping_criteria, grammar=sampling["grammar"],
                                 _seed=config.seed):
            if self._model.is_eog(tok):
                finish = "stop"
                break
            completion.append(tok)
            text = self.detokenize(completion)
            hit = [text.index(s) for s in stops if s in text]
            if hit:
                text = text[: min(hit)]
                finish = "stop"
                break
            if stream:
                hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                safe = _utf8_complete(text[sent: len(text) - hold])
                if safe:
                    yield _chunk(meta, safe.decode("utf-8"), None, None)
                    sent += len(safe)
            if len(completion) >= config.max_tokens:
                break
        else:
            if stopping_criteria is not None:
                finish = "stop"
        self._sampler = None
        if stream:
            rest = text[sent:]
            if rest:
                yield _chunk(meta, rest.decode("utf-8", errors="ignore"), None, None)
            yield _chunk(meta, "", None, finish)
            return
        out = _completion(meta, text.decode("utf-8", errors="ignore"), None, finish,
                          len(tokens), len(completion))
        if self.cache:
            self.cache[tokens + completion] = self.save_state()
        yield out

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` after the ``n_tokens`` already in the context
        (whatever lies beyond is dropped first)."""
        backend = self._engine_backend()
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        parts = _BackendParts(backend)
        ctx = parts.context
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ContextOverflowError(
                f"{self.n_tokens + len(tokens)} tokens do not fit the context window of {self._n_ctx}")
        with parts.lock:
            if not ctx.seq_rm(0, self.n_tokens, -1):
                ctx.memory_clear()
                tokens = self._input_ids.tolist() + tokens
                self.n_tokens = 0
            try:
                ctx.decode(tokens, pos0=self.n_tokens, seq_id=0, logits_last=True)
            except BaseException:
                parts.forget()
                self.n_tokens = 0
                raise
            self.input_ids[self.n_tokens: self.n_tokens + len(tokens)] = tokens
            self.n_tokens += len(tokens)
            ctx.logits_into(-1, self.scores[0])
            # The backend's prefix cache now describes these tokens, so a
            # following create_completion reuses them.
            parts.record([int(t) for t in self._input_ids])

    def sample(self, top_k: int = D.SAMPLE["top_k"], top_p: float = D.SAMPLE["top_p"],
               min_p: float = D.SAMPLE["min_p"], typical_p: float = D.SAMPLE["typical_p"],
               temp: float = D.SAMPLE["temp"], repeat_penalty: float = D.SAMPLE["repeat_penalty"],
               frequency_penalty: float = D.SAMPLE["frequency_penalty"],
               presence_penalty: float = D.SAMPLE["presence_penalty"], tfs_z: float = D.SAMPLE["tfs_z"],
               mirostat_mode: int = D.SAMPLE["mirostat_mode"], mirostat_eta: float = D.SAMPLE["mirostat_eta"],
               mirostat_tau: float = D.SAMPLE["mirostat_tau"], penalize_nl: bool = D.SAMPLE["penalize_nl"],
               logits_processor: LogitsProcessorList | None = D.SAMPLE["logits_processor"],
               grammar: LlamaGrammar | None = D.SAMPLE["grammar"], idx: int | None = None,
               _seed: int | None = None) -> int:
        """Sample the next token from the logits of the last :meth:`eval`
        (``logits_processor`` sees and may change them first)."""
        backend = self._engine_backend()
        if self.n_tokens <= 0:
            raise InvalidInputError("sample() needs a prior eval() of at least one token")
        parts = _BackendParts(backend)
        ctx = parts.context
        sampler = self._sampler
        if sampler is None:
            sampler = self._make_sampler(top_k, top_p, min_p, typical_p, temp, repeat_penalty,
                                         frequency_penalty, presence_penalty, mirostat_mode, grammar,
                                         _seed)
        if logits_processor:
            scores = np.ascontiguousarray(self.scores[0], dtype=np.single)
            scores = np.ascontiguousarray(logits_processor(self._input_ids, scores), dtype=np.single)
            ctx.set_logits(-1, scores)
        with parts.lock:
            return int(sampler.sample(ctx, -1))

    def _make_sampler(self, top_k: int, top_p: float, min_p: float, typical_p: float, temp: float,
                      repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                      mirostat_mode: int, grammar: LlamaGrammar | None, seed: int | None) -> Any:
        from xybrid._native import _engine

        if mirostat_mode:
            raise UnsupportedInputError("mirostat sampling is not supported by xybrid (mirostat_mode must be 0)")
        if typical_p != 1.0:
            raise UnsupportedInputError("typical sampling is not supported by xybrid (typical_p must be 1.0)")
        temp, top_k, top_p, min_p = _truncation(temp, top_k, top_p, min_p)
        if seed is None:
            value = int(self._seed) & 0xFFFFFFFF
            seed = value if value <= MAX_SEED else None
        return _engine.Sampler(
            self._model, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
            repeat_penalty=float(repeat_penalty), repeat_last_n=self.last_n_tokens_size,
            frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
            seed=seed, grammar=grammar._grammar if grammar is not None else None,
            n_ctx=self._n_ctx)

    def generate(self, tokens: Sequence[int], top_k: int = D.SAMPLE["top_k"],
                 top_p: float = D.SAMPLE["top_p"], min_p: float = D.SAMPLE["min_p"],
                 typical_p: float = D.SAMPLE["typical_p"], temp: float = D.SAMPLE["temp"],
                 repeat_penalty: float = D.SAMPLE["repeat_penalty"], reset: bool = True,
                 frequency_penalty: float = D.SAMPLE["frequency_penalty"],
                 presence_penalty: float = D.SAMPLE["presence_penalty"], tfs_z: float = D.SAMPLE["tfs_z"],
                 mirostat_mode: int = D.SAMPLE["mirostat_mode"], mirostat_tau: float = D.SAMPLE["mirostat_tau"],
                 mirostat_eta: float = D.SAMPLE["mirostat_eta"], penalize_nl: bool = D.SAMPLE["penalize_nl"],
                 logits_processor: LogitsProcessorList | None = D.SAMPLE["logits_processor"],
                 stopping_criteria: StoppingCriteriaList | None = None,
                 grammar: LlamaGrammar | None = D.SAMPLE["grammar"],
                 _seed: int | None = None) -> Iterator[int]:
        """Yield sampled tokens after ``tokens``, one Python step each
        (``eval`` -> ``sample``); it never stops by itself, the caller does.
        With ``reset`` the longest prefix already in the context is kept."""
        self._engine_backend()
        self._sampler = self._make_sampler(top_k, top_p, min_p, typical_p, temp, repeat_penalty,
                                           frequency_penalty, presence_penalty, mirostat_mode,
                                           grammar, _seed)
        tokens = [int(t) for t in tokens]
        if reset and self.n_tokens > 0:
            keep = self.longest_token_prefix(self._input_ids.tolist(), tokens)
            if keep >= len(tokens):
                keep = len(tokens) - 1  # re-decode one token for fresh logits
            self.n_tokens = max(keep, 0)
            tokens = tokens[self.n_tokens:]
        elif reset:
            self.n_tokens = 0
        try:
            while True:
                self.eval(tokens)
                token = self.sample(logits_processor=logits_processor)
                if stopping_criteria is not None and stopping_criteria(self._input_ids, self.scores[0]):
                    return
                extra = yield token
                tokens = [token] + (list(extra) if extra else [])
                if self.n_tokens + len(tokens) > self._n_ctx:
                    return
        finally:
            self._sampler = None

    # --- chat -------------------------------------------------------------------------------------
    def create_chat_completion(self, messages: list[dict[str, Any]],
                               functions: list[dict[str, Any]] | None = D.CHAT_COMPLETION["functions"],
                               function_call: Any = D.CHAT_COMPLETION["function_call"],
                               tools: list[dict[str, Any]] | None = D.CHAT_COMPLETION["tools"],
                               tool_choice: Any = D.CHAT_COMPLETION["tool_choice"],
                               temperature: float = D.CHAT_COMPLETION["temperature"],
                               top_p: float = D.CHAT_COMPLETION["top_p"],
                               top_k: int = D.CHAT_COMPLETION["top_k"],
                               min_p: float = D.CHAT_COMPLETION["min_p"],
                               typical_p: float = D.CHAT_COMPLETION["typical_p"],
                               stream: bool = D.CHAT_COMPLETION["stream"],
                               stop: str | list[str] | None = D.CHAT_COMPLETION["stop"],
                               seed: int | None = D.CHAT_COMPLETION["seed"],
                               response_format: dict[str, Any] | None = D.CHAT_COMPLETION["response_format"],
                               max_tokens: int | None = D.CHAT_COMPLETION["max_tokens"],
                               presence_penalty: float = D.CHAT_COMPLETION["presence_penalty"],
                               frequency_penalty: float = D.CHAT_COMPLETION["frequency_penalty"],
                               repeat_penalty: float = D.CHAT_COMPLETION["repeat_penalty"],
                               tfs_z: float = D.CHAT_COMPLETION["tfs_z"],
                               mirostat_mode: int = D.CHAT_COMPLETION["mirostat_mode"],
                               mirostat_tau: float = D.CHAT_COMPLETION["mirostat_tau"],
                               mirostat_eta: float = D.CHAT_COMPLETION["mirostat_eta"],
                               model: str | None = D.CHAT_COMPLETION["model"],
                               logits_processor: LogitsProcessorList | None = D.CHAT_COMPLETION["logits_processor"],
                               grammar: LlamaGrammar | None = D.CHAT_COMPLETION["grammar"],
                               logit_bias: dict[int, float] | None = D.CHAT_COMPLETION["logit_bias"],
                               logprobs: bool | None = D.CHAT_COMPLETION["logprobs"],
                               top_logprobs: int | None = D.CHAT_COMPLETION["top_logprobs"],
                               ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Reply to ``messages`` (OpenAI-style dicts) with the model's chat
        template. Returns a ``chat.completion`` dict or, with ``stream=True``,
        ``chat.completion.chunk`` dicts (role first, then content deltas,
        then an empty delta with ``finish_reason``)."""
        backend = self._engine_backend()
        if functions is not None and tools is None:
            tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and tool_choice is None:
            tool_choice = function_call if isinstance(function_call, str) else \
                {"type": "function", "function": {"name": function_call["name"]}}
        tools_arg, choice_arg = _tools_and_choice(tools, tool_choice)
        n_lp = (top_logprobs or 0) if logprobs else None
        meta = {"id": "chat" + _completion_id(), "created": int(time.time()),
                "model": model if model is not None else self.model_path}
        if logits_processor is not None:
            return self._chat_via_completion(backend, messages, tools_arg, meta, stream, dict(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                min_p=min_p, typical_p=typical_p, stop=stop, seed=seed,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                repeat_penalty=repeat_penalty, mirostat_mode=mirostat_mode,
                logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias))
        # The budget counts the prompt without tool descriptions (the backend
        # adds them its own way); the loop stops at the window either way.
        prompt = backend.format_chat(messages)
        n_prompt = len(self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        fmt = response_format if response_format and response_format.get("type") != "text" else None
        config = self._config(max_tokens=self._budget(n_prompt, max_tokens), temperature=temperature,
                              top_p=top_p, min_p=min_p, typical_p=typical_p, top_k=top_k,
                              repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
                              stop=stop, seed=seed, grammar=grammar, logprobs=n_lp,
                              response_format=fmt, tools=tools_arg, tool_choice=choice_arg,
                              logit_bias=_engine_bias(logit_bias))
        if stream:
            return self._chat_stream(backend, messages, config, meta)
        output = backend.generate(messages, config)
        self._sync_tokens(backend)
        return _chat_completion(meta, output, self._chat_logprobs(output) if n_lp is not None else None)

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`create_chat_completion` as ``openai`` package objects
        (``ChatCompletion`` / ``ChatCompletionChunk``); needs ``openai``."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise ImportError("create_chat_completion_openai_v1 needs the openai package") from exc
        result = self.create_chat_completion(*args, **kwargs)
        if kwargs.get("stream", False):
            chunks = cast(Iterator[dict[str, Any]], result)
            return (ChatCompletionChunk(**chunk) for chunk in chunks)
        return ChatCompletion(**result)  # type: ignore[arg-type]

    def _chat_stream(self, backend: LlamaCppBackend, messages: list[dict[str, Any]],
                     config: GenerationConfig, meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield _chat_chunk(meta, {"role": "assistant"}, None)
        output: GenerationOutput | None = None
        for piece in backend.stream(messages, config):
            if piece.finish_reason is not None:
                output = piece.output
            elif piece.text:
                yield _chat_chunk(meta, {"content": piece.text}, None)
        self._sync_tokens(backend)
        if output is not None and output.tool_calls:
            yield _chat_chunk(meta, {"tool_calls": [dict(call, index=i)
                                                    for i, call in enumerate(output.tool_calls)]}, None)
        finish = _finish(output) if output is not None else "stop"
        lp = self._chat_logprobs(output) if output is not None and output.logprobs is not None else None
        yield _chat_chunk(meta, {}, finish, lp)

    def _chat_via_completion(self, backend: LlamaCppBackend, messages: list[dict[str, Any]],
                             tools: list[dict[str, Any]], meta: dict[str, Any], stream: bool,
                             sampling: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Chat with logits processors: the template's prompt through the
        token-level completion path, stopped at the chat markers."""
        if tools:
            raise UnsupportedInputError("tools together with logits_processor are not supported")
        prompt = backend.format_chat(messages)
        stop = sampling.pop("stop")
        stops = ([stop] if isinstance(stop, str) else list(stop or [])) + list(CHAT_STOP_PATTERNS)
        result = self.create_completion(self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True),
                                        stream=stream, stop=stops, model=meta["model"], **sampling)
        if not stream:
            assert isinstance(result, dict)
            c = result["choices"][0]
            return {"id": meta["id"], "object": "chat.completion", "created": meta["created"],
                    "model": meta["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c["text"]},
                                 "logprobs": None, "finish_reason": c["finish_reason"]}],
                    "usage": result["usage"]}

        parts = cast(Iterator[dict[str, Any]], result)

        def chunks() -> Iterator[dict[str, Any]]:
            yield _chat_chunk(meta, {"role": "assistant"}, None)
            for chunk in parts:
                c = chunk["choices"][0]
                if c["finish_reason"] is None:
                    yield _chat_chunk(meta, {"content": c["text"]}, None)
                else:
                    yield _chat_chunk(meta, {}, c["finish_reason"])
        return chunks()

    def _chat_logprobs(self, output: GenerationOutput) -> dict[str, Any]:
        content = []
        tops = list(output.top_logprobs or ())
        for i, (tok, lp) in enumerate(zip(output.token_ids, output.logprobs or ())):
            piece = self.detokenize([tok]).decode("utf-8", errors="ignore")
            alts = [{"token": self.detokenize([t]).decode("utf-8", errors="ignore"), "logprob": v,
                     "bytes": None} for t, v in (tops[i] if i < len(tops) else ())]
            content.append({"token": piece, "bytes": None, "logprob": lp, "top_logprobs": alts})
        return {"content": content, "refusal": None}

    # --- embeddings ---------------------------------------------------------------------------
    def _get_embedder(self) -> Any:
        if not self._embedding:
            raise InvalidInputError("Llama model must be created with embedding=True to call this method")
        if self._embedder is None:
            from xybrid.embeddings import Embedder

            pooling = _POOLING.get(self._pooling_type, "mean")
            if pooling == "none":
                raise UnsupportedInputError("per-token embeddings (pooling_type=NONE) are not supported")
            self._embedder = Embedder.from_model(self._model, pooling=pooling,
                                                 context_length=self.n_batch, n_threads=self.n_threads)
        return self._embedder

    def embed(self, input: str | list[str], normalize: bool = D.EMBED["normalize"],
              truncate: bool = D.EMBED["truncate"], return_count: bool = D.EMBED["return_count"],
              ) -> Any:
        """Pooled embedding(s) of ``input``: one list of floats for a str, a
        list of them for a list (``return_count`` adds the token count)."""
        embedder = self._get_embedder()
        inputs = [input] if isinstance(input, str) else list(input)
        seqs = []
        for text in inputs:
            toks = self.tokenize(text.encode("utf-8"))
            if truncate:
                toks = toks[: self.n_batch]
            elif len(toks) > self.n_batch:
                raise ContextOverflowError(f"Requested tokens ({len(toks)}) exceed batch size of {self.n_batch}")
            seqs.append(toks)
        rows: list[npt.NDArray[np.float32]] = []
        for group in embedder._groups(seqs):
            with embedder._lock:
                data, n_embd = embedder._ctx.embed(group)
            rows.extend(np.frombuffer(data, dtype=np.float32).reshape(len(group), n_embd))
        out = []
        for row in rows:
            vec = row.astype(np.float64)
            if normalize:
                norm = float(np.linalg.norm(vec))
                vec = vec / norm if norm > 0 else vec
            out.append(vec.tolist())
        total = sum(len(s) for s in seqs)
        result = out[0] if isinstance(input, str) else out
        return (result, total) if return_count else result

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict[str, Any]:
        """The peer's ``CreateEmbeddingResponse``."""
        embeds, total = self.embed(input if isinstance(input, list) else [input], return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # --- state ----------------------------------------------------------------------------------
    def save_state(self) -> LlamaState:
        """The context's state now (restore with :meth:`load_state`)."""
        backend = self._engine_backend()
        state = backend.save_state()
        ids = np.zeros((self._n_ctx,), dtype=np.intc)
        ids[: state.n_tokens] = state.tokens
        return LlamaState(ids, self.scores.copy(), state.n_tokens, state.data, len(state.data),
                          self._seed, state.fingerprint)

    def load_state(self, state: LlamaState) -> None:
        """Restore a :meth:`save_state` (of this same model)."""
        from xybrid.session_state import SessionState

        backend = self._engine_backend()
        tokens = tuple(int(t) for t in state.input_ids[: state.n_tokens])
        backend.load_state(SessionState(state.fingerprint, tokens, 0, bytes(state.llama_state)))
        self.input_ids[: state.n_tokens] = tokens
        self.n_tokens = state.n_tokens
        self.scores = state.scores.copy()
        self._seed = state.seed

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def logits_to_logprobs(logits: Any, axis: int = -1) -> npt.NDArray[np.single]:
        x = np.asarray(logits, dtype=np.single)
        m = np.amax(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        shifted = x - m
        with np.errstate(divide="ignore"):
            out: npt.NDArray[np.single] = (
                shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))).astype(np.single)
        return out

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n


class _BackendParts:
    """What the token-level layer needs from inside a LlamaCppBackend: its
    context, its lock and its prefix-cache record (kept in step with what
    eval() decodes, so a following fast-path call reuses those tokens). The
    one place that knows the backend's internals."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.backend = backend
        loaded = backend._require()
        self.context: Any = loaded.context
        self.lock: Any = backend._lock

    def cached_tokens(self) -> list[int]:
        return list(self.backend._cache.cached_tokens)

    def record(self, tokens: list[int]) -> None:
        self.backend._cache.commit(tokens, 0)

    def forget(self) -> None:
        self.backend._forget(self.backend._require())


def _truncation(temp: float, top_k: int, top_p: float, min_p: float) -> tuple[float, int, float, float]:
    """The peer's sampling knobs in xybrid's ranges: temp < 0 is a plain
    draw from the softmax; top_k <= 0 is off; top_p <= 0 keeps one token."""
    if temp < 0:
        return 1.0, 0, 1.0, 0.0
    k = max(int(top_k), 0)
    p = min(float(top_p), 1.0)
    if p <= 0.0:
        k, p = 1, 1.0
    return float(temp), k, p, min(max(float(min_p), 0.0), 1.0)


# --- result shapes -------------------------------------------------------------------------------
def _finish(output: GenerationOutput) -> str:
    if output.tool_calls:
        return "tool_calls"
    return "length" if output.finish_reason == "length" else "stop"


def _engine_bias(logit_bias: dict[int, float] | None) -> dict[int, float] | None:
    """The peer's ``logit_bias`` for the engine's sampler chain. Biases
    beyond +-100 (``-inf``, a common way to ban a token, included) act as
    +-100, which bans or forces the token; NaN and non-int ids are refused by
    GenerationConfig."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise InvalidInputError(f"logit_bias must be a dict of token id -> bias, got "
                                f"{type(logit_bias).__name__}")
    out: dict[int, float] = {}
    for tok, bias in logit_bias.items():
        key: Any = int(tok) if isinstance(tok, str) and tok.strip().isdigit() else tok
        value: Any = bias
        if isinstance(bias, numbers.Real) and not isinstance(bias, bool) and not math.isnan(bias):
            value = max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(bias)))
        out[key] = value
    return out


def _completion(meta: dict[str, Any], text: str, logprobs: dict[str, Any] | None, finish: str,
                n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": meta["id"], "object": "text_completion", "created": meta["created"],
            "model": meta["model"],
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}}


def _chunk(meta: dict[str, Any], text: str, logprobs: dict[str, Any] | None,
           finish: str | None) -> dict[str, Any]:
    return {"id": meta["id"], "object": "text_completion", "created": meta["created"],
            "model": meta["model"],
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def _chat_completion(meta: dict[str, Any], output: GenerationOutput,
                     logprobs: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.text}
    if output.tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": [dict(c) for c in output.tool_calls]}
        first = output.tool_calls[0]["function"]
        message["function_call"] = {"name": first["name"], "arguments": first["arguments"]}
    return {"id": meta["id"], "object": "chat.completion", "created": meta["created"],
            "model": meta["model"],
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": _finish(output)}],
            "usage": {"prompt_tokens": output.prompt_tokens,
                      "completion_tokens": output.tokens_generated,
                      "total_tokens": output.prompt_tokens + output.tokens_generated}}


def _chat_chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": meta["id"], "model": meta["model"], "created": meta["created"],
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def _tools_and_choice(tools: list[dict[str, Any]] | None,
                      tool_choice: Any) -> tuple[list[dict[str, Any]], str]:
    """The peer's tools/tool_choice as GenerationConfig's: a named function
    choice offers only that tool and requires a call."""
    tools = list(tools or [])
    if tool_choice is None or tool_choice == "auto":
        return tools, "auto" if tools else "auto"
    if tool_choice in ("none", "required"):
        return tools, tool_choice if tools or tool_choice == "none" else "auto"
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        chosen = [t for t in tools if t.get("function", {}).get("name") == name]
        if not chosen:
            raise InvalidInputError(f"Tool choice '{name}' not found in tools.")
        return chosen, "required"
    raise InvalidInputError(f"tool_choice must be 'auto', 'none', 'required' or a function dict, got {tool_choice!r}")


def _utf8_complete(data: bytes) -> bytes:
    """The longest prefix of ``data`` that ends on a whole UTF-8 character."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            data[:cut].decode("utf-8")
            return data[:cut]
        except UnicodeDecodeError:
            continue
    return b""


def _pieces_within(pieces: list[str], text: str) -> list[str]:
    """Token pieces clipped so they concatenate to ``text`` (a stop string
    may have cut the last one)."""
    out, used = [], 0
    for p in pieces:
        take = p[: max(len(text) - used, 0)]
        out.append(take)
        used += len(take)
    return out


def _last(it: Iterator[dict[str, Any]], echo: bool, prompt_text: str) -> dict[str, Any]:
    result = list(it)[-1]
    if echo:
        result["choices"][0]["text"] = prompt_text + result["choices"][0]["text"]
    return result


def __getattr__(name: str) -> Any:
    # The ctypes layer of llama-cpp-python (llama_cpp.llama_decode, ...) has
    # no counterpart: say so instead of a bare AttributeError.
    if name.startswith(("llama_", "LLAMA_", "ggml_", "GGML_")):
        raise AttributeError(
            f"llama_cpp.{name} is part of llama-cpp-python's low-level ctypes API, which xybrid's "
            "compatibility layer does not provide; use the Llama class (or xybrid's own API)")
    raise AttributeError(f"module 'llama_cpp' (xybrid.compat.llama_cpp) has no attribute {name!r}")

