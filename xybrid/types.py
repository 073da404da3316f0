"""Public value types of xybrid: messages, configurations and generation results.

Every type here is an immutable dataclass that checks its own values when it is
built, so a bad setting fails at the call site with a message naming the field
instead of deep inside the native engine. ``InvalidInputError`` (a
``ValueError``) is raised for both wrong types and out-of-range values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, get_args

from xybrid.errors import InvalidInputError, UnsupportedInputError

__all__ = [
    "Role",
    "ChatMessage",
    "LlmConfig",
    "GenerationConfig",
    "PartialToken",
    "GenerationOutput",
    "MAX_SEED",
    "MAX_LOGIT_BIAS",
    "MAX_LOGIT_BIAS_ENTRIES",
]

Role = Literal["system", "user", "assistant", "tool"]
_ROLES: Final[frozenset[str]] = frozenset(get_args(Role))

#: Largest accepted sampling seed. llama.cpp takes a 32-bit seed and reads
#: 0xFFFFFFFF as "pick a random seed", so that value is kept out of range: a
#: caller who asks for a fixed seed must get a reproducible run.
MAX_SEED: Final[int] = 0xFFFFFFFE

#: Bounds of ``GenerationConfig.logit_bias`` (OpenAI's range): a bias of -100
#: bans a token and +100 forces it on any real logits row; the number of
#: entries is bounded so one request cannot slow every sampling step.
MAX_LOGIT_BIAS: Final[float] = 100.0
MAX_LOGIT_BIAS_ENTRIES: Final[int] = 1024

# ---------------------------------------------------------------------------
# Validation helpers. Each returns the normalised value or raises with a
# message of the form "<Class>.<field> must be ..., got <repr>".
# ---------------------------------------------------------------------------


def _fail(owner: str, name: str, requirement: str, value: object) -> InvalidInputError:
    return InvalidInputError(f"{owner}.{name} must be {requirement}, got {value!r}")


def _is_int(value: object) -> bool:
    # bool is a subclass of int; True as a context length is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


#: The C side holds these numbers as int32_t / float: the bounds every
#: numeric setting is checked against (one place, here), so a value past
#: them is InvalidInputError instead of an OverflowError or a silent inf.
INT32_MAX: Final[int] = 0x7FFFFFFF
FLOAT32_MAX: Final[float] = 3.4028234663852886e38
#: llama.cpp's own limits: sequences per context (LLAMA_MAX_SEQ) and compute
#: threads (GGML_MAX_N_THREADS).
MAX_PARALLEL: Final[int] = 256
MAX_THREADS: Final[int] = 512
#: Largest ``context_length`` (and ``n_batch`` / ``n_ubatch``): llama.cpp
#: sizes per-cell bookkeeping by the context before it allocates the KV
#: cache, so a context of 2**31 cells touched 8 GiB and took seconds before
#: failing. 2**20 cells is past the trained context of the models this
#: package targets; the KV cache of a context that large still has to fit.
MAX_CONTEXT_LENGTH: Final[int] = 1 << 20
#: Most requests that may wait for a slot (``LlmConfig.max_queued``): the
#: scheduler allocates their queue up front (2**31 overflowed its C size).
MAX_QUEUED: Final[int] = 1 << 16


def _check_int(owner: str, name: str, value: object, minimum: int, requirement: str,
               maximum: int = INT32_MAX) -> int:
    if not _is_int(value) or not minimum <= cast(int, value) <= maximum:
        if _is_int(value) and cast(int, value) > maximum:
            requirement += f" and at most {maximum}"
        raise _fail(owner, name, requirement, value)
    return cast(int, value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(owner: str, name: str, value: str | None) -> None:
    """Text must be UTF-8 encodable: a lone surrogate (what a broken JSON
    ``\\ud800`` escape decodes to) is not a character."""
    if value is None:
        return
    found = _SURROGATE.search(value)
    if found is not None:
        raise InvalidInputError(
            f"{owner}.{name} contains a lone surrogate U+{ord(found.group()):04X} at index "
            f"{found.start()}; it is not a character and cannot be encoded")


def _check_bool(owner: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(owner, name, "a bool", value)
    return value


def _as_finite_float(owner: str, name: str, value: object, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(owner, name, requirement, value)
    try:
        number = float(value)
    except OverflowError:  # an int past the largest double
        raise _fail(owner, name, requirement, value) from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise _fail(owner, name, requirement + " (and finite as a C float)", value)
    return number


# llama.cpp splits a model over at most this many devices (llama_max_devices).
MAX_RPC_SERVERS: Final[int] = 16


def _check_rpc_servers(owner: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise _fail(owner, "rpc_servers", "'host:port' strings", value)
    servers = tuple(value)
    if len(servers) > MAX_RPC_SERVERS:
        raise _fail(owner, "rpc_servers", f"at most {MAX_RPC_SERVERS} servers", len(servers))
    if servers:
        from xybrid.rpc import parse_endpoint  # not imported by configs without servers

        for server in servers:
            try:
                parse_endpoint(server)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{owner}.rpc_servers: {exc}") from None
        if len(set(servers)) != len(servers):
            raise _fail(owner, "rpc_servers", "distinct servers", servers)
    return servers


def _check_tensor_split(owner: str, value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(owner, "tensor_split", "numbers, one weight per RPC device", value)
    weights = tuple(
        _as_finite_float(owner, "tensor_split", w, "finite numbers >= 0") for w in value)
    if any(w < 0 for w in weights):
        raise _fail(owner, "tensor_split", "finite numbers >= 0", value)
    if weights and sum(weights) <= 0:
        raise _fail(owner, "tensor_split", "weights with a positive sum", value)
    if len(weights) > MAX_RPC_SERVERS:
        raise _fail(owner, "tensor_split", f"at most {MAX_RPC_SERVERS} weights", len(weights))
    return weights


PREFIX_REUSE_MODES = ("exact", "longest")


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def _check_optional_str(owner: str, name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(owner, name, "a non-empty str or None", value)
    return value


def _check_sha256(owner: str, name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64 or any(
        c not in "0123456789abcdefABCDEF" for c in value
    ):
        raise _fail(owner, name, "None or a 64-character hex SHA-256 digest", value)
    return value.lower()


# ---------------------------------------------------------------------------
# ChatMessage
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, in the shape chat templates consume.

    ``name`` is the optional participant name of the OpenAI schema;
    ``tool_call_id`` links a ``tool`` message to the call it answers.
    ``media`` holds images and audio clips (:class:`xybrid.media.Image`,
    :class:`xybrid.media.Audio`) shown to a multimodal model before the text.
    """

    role: Role
    content: str
    name: str | None = None
    tool_call_id: str | None = None
    media: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or self.role not in _ROLES:
            allowed = ", ".join(sorted(_ROLES))
            raise _fail("ChatMessage", "role", f"one of {allowed}", self.role)
        if not isinstance(self.content, str):
            raise _fail("ChatMessage", "content", "a str", self.content)
        _check_optional_str("ChatMessage", "name", self.name)
        _check_optional_str("ChatMessage", "tool_call_id", self.tool_call_id)
        for field_name in ("content", "name", "tool_call_id"):
            _check_encodable("ChatMessage", field_name, getattr(self, field_name))
        from xybrid.media import Audio, Image

        media = tuple(self.media) if not isinstance(self.media, tuple) else self.media
        for i, item in enumerate(media):
            if not isinstance(item, (Image, Audio)):
                raise _fail("ChatMessage", f"media[{i}]", "an xybrid.media.Image or Audio", item)
        object.__setattr__(self, "media", media)

    @classmethod
    def system(cls, text: str) -> ChatMessage:
        """A system prompt."""
        return cls("system", text)

    @classmethod
    def user(cls, text: str, *, images: Iterable[Any] = (), audio: Iterable[Any] = ()) -> ChatMessage:
        """A user turn, optionally with images and audio for a multimodal model.

        Each image is a path, encoded bytes (PNG, JPEG, ...), an ``H x W x 3``
        uint8 array or a PIL image; each audio clip is a float32 PCM array at
        the projector's sample rate, or a wav/mp3/flac path or bytes.
        """
        from xybrid.media import Audio, Image

        media: tuple[Image | Audio, ...] = tuple(
            i if isinstance(i, Image) else Image(i) for i in images)
        media += tuple(a if isinstance(a, Audio) else Audio(a) for a in audio)
        return cls("user", text, media=media)

    @classmethod
    def assistant(cls, text: str) -> ChatMessage:
        """A previous model reply, replayed as history."""
        return cls("assistant", text)

    @classmethod
    def tool(cls, text: str, tool_call_id: str | None = None) -> ChatMessage:
        """The result of a tool call, fed back to the model."""
        return cls("tool", text, tool_call_id=tool_call_id)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        """Build a message from an OpenAI-style mapping.

        ``content`` may be a str, ``None`` (an assistant turn that only made
        tool calls; read as ``""``) or a list of ``{"type": "text", "text": ...}``
        parts, which are joined. Non-text parts raise ``UnsupportedInputError``
        because this type carries text only. Unknown keys are ignored so whole
        request messages can be passed through.
        """
        if not isinstance(data, Mapping):
            raise _fail("ChatMessage", "from_dict argument", "a mapping", data)
        if "role" not in data:
            raise InvalidInputError("ChatMessage.role is missing from the message mapping")
        content, media = _split_content(data.get("content"))
        return cls(
            role=data["role"],
            content=content,
            name=data.get("name"),
            tool_call_id=data.get("tool_call_id"),
            media=media,
        )

    def to_dict(self) -> dict[str, str]:
        """OpenAI-style mapping; optional keys appear only when set."""
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _content_to_text(content: object) -> str:
    text, media = _split_content(content)
    if media:
        raise UnsupportedInputError("this content carries media; use ChatMessage.from_dict")
    return text


def _split_content(content: object) -> tuple[str, tuple[Any, ...]]:
    """Text and media of OpenAI-style content: a str, None, or a list of
    ``text``, ``image_url`` and ``input_audio`` parts. Other part types (video,
    files) raise ``UnsupportedInputError``."""
    if content is None:
        return "", ()
    if isinstance(content, str):
        return content, ()
    if isinstance(content, list):
        from xybrid.media import media_from_openai_part

        pieces: list[str] = []
        media: list[Any] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise _fail("ChatMessage", "content part", "a mapping", part)
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _fail("ChatMessage", "content part text", "a str", text)
                pieces.append(text)
            else:
                media.append(media_from_openai_part(part))
        return "".join(pieces), tuple(media)
    raise _fail("ChatMessage", "content", "a str", content)


# ---------------------------------------------------------------------------
# LlmConfig
# ---------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class LlmConfig:
    """How to load a model and size its context.

    ``model_path`` accepts any path-like and is stored as ``str``.
    ``gpu_layers=-1`` offloads every layer; ``n_threads=0`` lets llama.cpp pick.
    ``chat_template`` is a format name (``"chatml"``, ``"llama2"``, ``"gemma"``)
    or a full Jinja template; ``None`` means the model's own template, or one
    inferred from the model when it carries none.

    ``prefix_reuse`` says what a call may keep from the previous one's KV cache:

    - ``"longest"`` (default): the longest common prefix with everything in
      the cache, the previous reply included, as llama.cpp's server and
      llama-cpp-python do. The fastest multi-turn chat; results may differ
      from a fresh run in the last bits, which can change a close sampling
      decision.
    - ``"exact"``: the previous prompt, cut to a multiple of 32 tokens. A
      cached call then gives bit-identical results to a fresh one (llama.cpp's
      CPU kernels group batch rows, so a token's values depend on where it sat
      in its decode batch). Costs up to 31 tokens of re-prefill per turn, plus
      the previous reply, which is decoded again. For reproducible evaluations.

    ``parallel`` is how many requests the backend decodes together: that
    many sequences (slots) share one KV cache of ``context_length`` cells,
    and calls made at once from many threads or asyncio tasks are batched
    into one ``llama_decode`` per step. ``1`` (default) runs one request at
    a time on the single-sequence loop. ``max_queued`` bounds the requests
    waiting for a free slot; one more raises :class:`OverloadedError`.

    ``rpc_servers`` ("host:port" each, ``xybrid rpc-server`` processes)
    puts layers on other machines: ``gpu_layers`` of them (``0``, the
    default, then means every layer; a positive number keeps the first
    layers on the local CPU), split over the servers' devices by
    ``tensor_split`` (one weight per device, in order; empty: by the memory
    each reports). See :mod:`xybrid.rpc` for the security caveat.
    """

    model_path: str
    context_length: int
    gpu_layers: int
    n_threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    chat_template: str | None
    use_mmap: bool
    prefix_reuse: str
    mmproj_path: str | None
    model_sha256: str | None
    mmproj_sha256: str | None
    parallel: int
    max_queued: int
    rpc_servers: tuple[str, ...]
    tensor_split: tuple[float, ...]

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        context_length: int = 4096,
        gpu_layers: int = 0,
        n_threads: int = 0,
        n_batch: int = 512,
        n_ubatch: int = 512,
        flash_attn: bool = False,
        chat_template: str | None = None,
        use_mmap: bool = True,
        prefix_reuse: str = "longest",
        mmproj_path: str | os.PathLike[str] | None = None,
        model_sha256: str | None = None,
        mmproj_sha256: str | None = None,
        parallel: int = 1,
        max_queued: int = 64,
        rpc_servers: Iterable[str] | str = (),
        tensor_split: Iterable[float] = (),
    ) -> None:
        owner = "LlmConfig"
        if isinstance(mmproj_path, os.PathLike):
            mmproj_path = os.fspath(mmproj_path)
        if isinstance(model_path, os.PathLike):
            model_path = os.fspath(model_path)
        if not isinstance(model_path, str) or not model_path:
            raise _fail(owner, "model_path", "a non-empty str or os.PathLike[str]", model_path)
        values: dict[str, object] = {
            "model_path": model_path,
            "context_length": _check_int(
                owner, "context_length", context_length, 1, "a positive integer",
                MAX_CONTEXT_LENGTH,
            ),
            "gpu_layers": _check_int(
                owner, "gpu_layers", gpu_layers, -1, "an integer >= -1 (-1 offloads all layers)"
            ),
            "n_threads": _check_int(
                owner, "n_threads", n_threads, 0, "an integer >= 0 (0 picks automatically)",
                MAX_THREADS,
            ),
            "n_batch": _check_int(owner, "n_batch", n_batch, 1, "a positive integer",
                                  MAX_CONTEXT_LENGTH),
            "n_ubatch": _check_int(owner, "n_ubatch", n_ubatch, 1, "a positive integer",
                                   MAX_CONTEXT_LENGTH),
            "flash_attn": _check_bool(owner, "flash_attn", flash_attn),
            "chat_template": _check_optional_str(owner, "chat_template", chat_template),
            "use_mmap": _check_bool(owner, "use_mmap", use_mmap),
            "prefix_reuse": _check_choice(owner, "prefix_reuse", prefix_reuse, PREFIX_REUSE_MODES),
            "mmproj_path": _check_optional_str(owner, "mmproj_path", mmproj_path),
            "model_sha256": _check_sha256(owner, "model_sha256", model_sha256),
            "mmproj_sha256": _check_sha256(owner, "mmproj_sha256", mmproj_sha256),
            "parallel": _check_int(owner, "parallel", parallel, 1, "a positive integer",
                                   MAX_PARALLEL),
            "max_queued": _check_int(
                owner, "max_queued", max_queued, 0, "an integer >= 0 (0: no waiting requests)",
                MAX_QUEUED,
            ),
            "rpc_servers": _check_rpc_servers(owner, rpc_servers),
            "tensor_split": _check_tensor_split(owner, tensor_split),
        }
        if values["tensor_split"] and not values["rpc_servers"]:
            raise InvalidInputError(f"{owner}.tensor_split is set but rpc_servers is not")
        # Every running sequence needs a row in each decode batch, and
        # llama.cpp cuts the batch to the context length (a causal model
        # never decodes more tokens at once than its context holds).
        rows = min(cast(int, values["n_batch"]), cast(int, values["context_length"]))
        if cast(int, values["parallel"]) > rows:
            raise InvalidInputError(
                f"{owner}.parallel ({values['parallel']}) must not exceed min(n_batch, "
                f"context_length) ({rows}): every running sequence needs a row in each decode")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> LlmConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# GenerationConfig
# ---------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class GenerationConfig:
    """Sampling and stopping settings for one generation.

    Defaults (the seed's backend interface leaves them to the implementation,
    so these follow common llama.cpp practice):

    - ``max_tokens=256``
    - ``temperature=0.7``; ``0`` means greedy decoding.
    - ``top_p=0.9``, ``min_p=0.05``, ``top_k=40`` (``top_k=0`` disables it).
    - ``repetition_penalty=1.0``: off by default because it changes output
      quality; values above 1 discourage repeats.
    - ``repetition_penalty_window=64``: how many recent tokens the penalties
      look at; ``0`` turns the window (and so all penalties) off and ``-1``
      means the whole context (the backend's ``context_length``). A window
      larger than the context is capped at it.

    Every integer must fit the C ``int32_t`` that llama.cpp holds it in and
    every float must be finite as a C ``float``; anything else is
    :class:`~xybrid.errors.InvalidInputError`.
    - ``frequency_penalty=0.0``, ``presence_penalty=0.0`` (OpenAI semantics).
    - ``seed=None``: a fresh random seed per call; an int in
      ``0..MAX_SEED`` makes sampling reproducible.
    - ``stop_sequences=()``: any iterable of non-empty strings, stored as a
      tuple; a single ``str`` is taken as one sequence, as the OpenAI API does.
    - ``grammar=None``: GBNF text constraining the output.
    - ``json_schema=None``: a JSON schema the reply must satisfy (converted to
      a grammar, so the output always parses and validates).
    - ``response_format=None``: OpenAI style, ``{"type": "json_object"}`` for
      any JSON object or ``{"type": "json_schema", "json_schema": {...}}``.
      At most one of ``grammar``, ``json_schema`` and a JSON
      ``response_format`` may be given.
    - ``tools=()``: OpenAI-style function tools offered to the model; calls it
      makes come back in ``GenerationOutput.tool_calls``.
    - ``tool_choice="auto"``: ``"none"`` hides the tools, ``"required"``
      constrains the reply to tool calls with a grammar.
    - ``logprobs=None``: an int ``n >= 0`` makes the engine report the
      log-probability of every generated token and its ``n`` most likely
      alternatives (``GenerationOutput.logprobs`` / ``top_logprobs``).
    - ``logit_bias=None``: a mapping token id -> bias added to that token's
      logit before sampling, each bias a finite number in [-100, 100]
      (``-100`` bans the token, ``+100`` forces it), at most
      ``MAX_LOGIT_BIAS_ENTRIES`` entries. Stored as a dict with int keys and
      float values (an empty mapping is ``None``). Token ids are checked
      against the model's vocabulary when the sampler is built. Logprobs are
      still those of the model's raw logits, before the bias.
    """

    max_tokens: int
    temperature: float
    top_p: float
    min_p: float
    top_k: int
    repetition_penalty: float
    repetition_penalty_window: int
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    stop_sequences: tuple[str, ...]
    grammar: str | None
    json_schema: Mapping[str, Any] | None
    response_format: Mapping[str, Any] | None
    tools: tuple[Mapping[str, Any], ...]
    tool_choice: str
    logprobs: int | None
    logit_bias: Mapping[int, float] | None

    def __init__(
        self,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        min_p: float = 0.05,
        top_k: int = 40,
        repetition_penalty: float = 1.0,
        repetition_penalty_window: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
        stop_sequences: Iterable[str] | str = (),
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        tools: Iterable[Mapping[str, Any]] = (),
        tool_choice: str = "auto",
        logprobs: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
    ) -> None:
        owner = "GenerationConfig"
        if json_schema is not None and not isinstance(json_schema, Mapping):
            raise _fail(owner, "json_schema", "None or a JSON schema mapping", json_schema)
        if response_format is not None and not isinstance(response_format, Mapping):
            raise _fail(owner, "response_format", "None or a mapping like {'type': 'json_object'}",
                        response_format)
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
            raise _fail(owner, "tools", "an iterable of OpenAI-style tool mappings", tools)
        tools_value = tuple(tools)
        if any(not isinstance(t, Mapping) for t in tools_value):
            raise _fail(owner, "tools", "an iterable of OpenAI-style tool mappings", tools)
        if tool_choice not in ("auto", "none", "required"):
            raise _fail(owner, "tool_choice", "'auto', 'none' or 'required'", tool_choice)
        if tool_choice == "required" and not tools_value:
            raise _fail(owner, "tool_choice", "'auto' or 'none' when no tools are given", tool_choice)
        json_format = response_format is not None and response_format.get("type") != "text"
        constraints = [name for name, on in (("grammar", grammar is not None),
                                             ("json_schema", json_schema is not None),
                                             ("response_format", json_format),
                                             ("tool_choice='required'", tool_choice == "required"))
                       if on]
        if len(constraints) > 1:
            raise InvalidInputError(
                f"GenerationConfig: {' and '.join(constraints)} both constrain the output; give one")
        top_p_value = _as_finite_float(owner, "top_p", top_p, "a number in (0, 1]")
        if not 0.0 < top_p_value <= 1.0:
            raise _fail(owner, "top_p", "a number in (0, 1]", top_p)
        min_p_value = _as_finite_float(owner, "min_p", min_p, "a number in [0, 1]")
        if not 0.0 <= min_p_value <= 1.0:
            raise _fail(owner, "min_p", "a number in [0, 1]", min_p)
        temperature_value = _as_finite_float(
            owner, "temperature", temperature, "a finite number >= 0"
        )
        if temperature_value < 0.0:
            raise _fail(owner, "temperature", "a finite number >= 0", temperature)
        penalty = _as_finite_float(
            owner, "repetition_penalty", repetition_penalty, "a finite number > 0"
        )
        if penalty <= 0.0 or struct.unpack("f", struct.pack("f", penalty))[0] == 0.0:
            # (a positive double that a C float rounds to 0 would divide by 0)
            raise _fail(owner, "repetition_penalty", "a finite number > 0", repetition_penalty)
        if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
            raise _fail(owner, "seed", f"None or an integer in [0, {MAX_SEED}]", seed)
        grammar_value = _check_optional_str(owner, "grammar", grammar)
        values: dict[str, object] = {
            "max_tokens": _check_int(owner, "max_tokens", max_tokens, 1, "a positive integer"),
            "temperature": temperature_value,
            "top_p": top_p_value,
            "min_p": min_p_value,
            "top_k": _check_int(owner, "top_k", top_k, 0, "an integer >= 0 (0 disables)"),
            "repetition_penalty": penalty,
            "repetition_penalty_window": _check_int(
                owner,
                "repetition_penalty_window",
                repetition_penalty_window,
                -1,
                "an integer >= -1 (-1 means the whole context)",
            ),
            "frequency_penalty": _as_finite_float(
                owner, "frequency_penalty", frequency_penalty, "a finite number"
            ),
            "presence_penalty": _as_finite_float(
                owner, "presence_penalty", presence_penalty, "a finite number"
            ),
            "seed": seed,
            "stop_sequences": _normalise_stop_sequences(stop_sequences),
            "grammar": grammar_value,
            "json_schema": json_schema,
            "response_format": response_format,
            "tools": tools_value,
            "tool_choice": tool_choice,
            "logprobs": None if logprobs is None else _check_int(
                owner, "logprobs", logprobs, 0, "None or an integer >= 0 (alternatives per token)"),
            "logit_bias": _check_logit_bias(owner, logit_bias),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def greedy(cls, **overrides: Any) -> GenerationConfig:
        """Deterministic decoding (temperature 0); other settings may be overridden."""
        overrides.setdefault("temperature", 0.0)
        return cls(**overrides)

    @property
    def is_greedy(self) -> bool:
        """True when the engine should take the most likely token every step."""
        return self.temperature == 0.0 or self.top_k == 1

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


def _check_logit_bias(owner: str, value: object) -> dict[int, float] | None:
    name = "logit_bias"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(owner, name, "None or a mapping of int token id -> bias", value)
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidInputError(
            f"{owner}.{name} has {len(value)} entries, over the limit of {MAX_LOGIT_BIAS_ENTRIES}")
    out: dict[int, float] = {}
    for token, bias in value.items():
        if not _is_int(token) or token < 0:
            raise _fail(owner, name, "keyed by int token ids >= 0", token)
        number = _as_finite_float(owner, f"{name}[{token}]",
                                  bias, f"a finite number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise _fail(owner, f"{name}[{token}]",
                        f"a finite number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)
        out[token] = number
    return out or None


def _normalise_stop_sequences(value: object) -> tuple[str, ...]:
    owner, name = "GenerationConfig", "stop_sequences"
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise _fail(owner, name, "an iterable of non-empty str", value)
    sequences = tuple(value)
    for item in sequences:
        if not isinstance(item, str) or not item:
            raise _fail(owner, name, "an iterable of non-empty str", item)
        _check_encodable(owner, name, item)
    return sequences


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartialToken:
    """One piece of a streamed reply.

    ``text`` is the new text since the previous piece, ``cumulative_text`` all
    text emitted so far. The last piece of a stream carries ``finish_reason``
    (its ``text`` may be empty) and, where the backend has it, ``output``: the
    whole :class:`GenerationOutput` with token ids and telemetry, as the
    non-streaming call would have returned it.

    With ``GenerationConfig.logprobs``, ``logprobs`` holds the tokens sampled
    since the previous piece that had any, each as ``(token id, log p, top
    alternatives as (id, log p) pairs)``; the last piece carries the tokens
    not reported yet, so over a whole stream they are the output's
    ``token_ids`` / ``logprobs`` / ``top_logprobs``. (A token's text may
    still be held back when its logprobs arrive, for instance while it could
    be the start of a stop string.) Streams driven by a callback report them
    all in the last piece.
    """

    text: str
    index: int
    cumulative_text: str
    token_id: int | None = None
    finish_reason: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    output: GenerationOutput | None = field(default=None, repr=False, compare=False)
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] | None = field(
        default=None, repr=False)

    @property
    def is_final(self) -> bool:
        """True for the terminal piece of a stream."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """The result of one generation, with its telemetry.

    ``finish_reason`` is the user-facing reason (``"stop"``, ``"length"``,
    ``"cancelled"``, ``"tool_calls"``, ...); ``stop_reason`` is the engine's
    raw reason (``"eog"``, ``"stop"``, ``"length"``, ``"cancelled"``,
    ``"error"``). Timings are milliseconds; figures that cannot be derived
    (for instance inter-token latency of a one-token reply) are ``None``.
    ``inter_chunk_ms`` is the mean gap between chunks the consumer received.
    """

    text: str
    tokens_generated: int
    generation_time_ms: float
    tokens_per_second: float
    finish_reason: str
    ttft_ms: float | None = None
    mean_itl_ms: float | None = None
    p95_itl_ms: float | None = None
    emitted_chunks: int = 0
    inter_chunk_ms: float | None = None
    decode_tps: float | None = None
    prefill_tps: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    stop_reason: str | None = None
    token_ids: tuple[int, ...] = field(default=())
    media_tokens: int = 0
    tool_calls: tuple[dict[str, Any], ...] = ()
    thinking: str = ""
    queued_ms: float = 0.0
    #: With ``GenerationConfig.logprobs``: log p of each token of ``token_ids``
    #: under the model's raw logits, and per token its most likely
    #: alternatives as ``(token id, log p)`` pairs, most likely first.
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    def to_dict(self) -> dict[str, object]:
        """Telemetry mapping under the canonical key names.

        Keys: ``text``, ``finish_reason``, ``stop_reason``, ``tokens_in``
        (prompt tokens), ``prompt_cached_tokens`` (prompt tokens served from the
        KV cache), ``tokens_out`` and ``tokens_generated`` (both the number of
        generated tokens), ``generation_time_ms``, ``tokens_per_second``,
        ``ttft_ms``, ``mean_itl_ms``, ``p95_itl_ms``, ``emitted_chunks``,
        ``inter_chunk_ms``, ``decode_tps``, ``prefill_tps``, ``queued_ms`` (time
        waiting for a free slot of a batching backend) and ``token_ids`` (a list). Every key is always present, with ``None`` where a figure is
        unknown, so the mapping has a fixed schema and is JSON-serialisable.
        """
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "tokens_in": self.prompt_tokens,
            "prompt_cached_tokens": self.cached_prompt_tokens,
            "tokens_out": self.tokens_generated,
            "tokens_generated": self.tokens_generated,
            "generation_time_ms": self.generation_time_ms,
            "tokens_per_second": self.tokens_per_second,
            "ttft_ms": self.ttft_ms,
            "mean_itl_ms": self.mean_itl_ms,
            "p95_itl_ms": self.p95_itl_ms,
            "emitted_chunks": self.emitted_chunks,
            "inter_chunk_ms": self.inter_chunk_ms,
            "decode_tps": self.decode_tps,
            "prefill_tps": self.prefill_tps,
            "media_tokens": self.media_tokens,
            "queued_ms": self.queued_ms,
            "token_ids": list(self.token_ids),
        }
