"""LlmRuntimeAdapter: text-in, text-out over envelopes, for pipeline runtimes.

A pipeline hands the adapter an :class:`Envelope` (a payload plus string
metadata) and gets one back. Generation settings arrive as metadata strings
(``"max_tokens": "64"``); a value that does not parse is an error naming the
key, never silently ignored. The response metadata carries the telemetry
under its canonical keys so an SDK can forward them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from xybrid.backend import LlmBackend
from xybrid.errors import InvalidInputError, ModelNotLoadedError, UnsupportedInputError
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig

__all__ = ["Envelope", "ModelMetadata", "LlmRuntimeAdapter"]

EnvelopeKind = Literal["text", "audio", "embedding"]


@dataclass(frozen=True)
class Envelope:
    """A unit of data flowing through a pipeline: text, audio or an embedding."""

    kind: EnvelopeKind
    payload: Any
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, **metadata: str) -> Envelope:
        return cls("text", text, dict(metadata))


@dataclass(frozen=True)
class ModelMetadata:
    """What the adapter knows about its loaded model."""

    model_id: str
    runtime_type: str
    model_path: str
    execution_provider: str


# Metadata keys that set generation parameters, with their parser.
def _parse_int(key: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise InvalidInputError(f"metadata {key!r} must be an integer, got {value!r}") from None


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise InvalidInputError(f"metadata {key!r} must be a number, got {value!r}") from None


def _parse_stop(key: str, value: str) -> tuple[str, ...]:
    # A JSON list of strings, or one plain stop string.
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise InvalidInputError(f"metadata {key!r} is not a valid JSON list: {value!r}") from None
        if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
            raise InvalidInputError(f"metadata {key!r} must be a JSON list of strings")
        return tuple(parsed)
    return (value,)


_PARAMS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "max_tokens": ("max_tokens", _parse_int),
    "temperature": ("temperature", _parse_float),
    "top_p": ("top_p", _parse_float),
    "min_p": ("min_p", _parse_float),
    "top_k": ("top_k", _parse_int),
    "seed": ("seed", _parse_int),
    "repetition_penalty": ("repetition_penalty", _parse_float),
    "frequency_penalty": ("frequency_penalty", _parse_float),
    "presence_penalty": ("presence_penalty", _parse_float),
    "stop": ("stop_sequences", _parse_stop),
}


class LlmRuntimeAdapter:
    """Expose an :class:`LlmBackend` through envelopes.

    ``LlmRuntimeAdapter()`` uses a :class:`~xybrid.LlamaCppBackend`; pass
    another backend to wrap it instead.
    """

    def __init__(self, backend: LlmBackend | None = None,
                 generation_config: GenerationConfig | None = None) -> None:
        if backend is None:
            from xybrid.llama_cpp_backend import LlamaCppBackend

            backend = LlamaCppBackend()
        self.backend = backend
        self.generation_config = generation_config or GenerationConfig()
        self._metadata: ModelMetadata | None = None

    @property
    def name(self) -> str:
        return "llm"

    @property
    def supported_formats(self) -> tuple[str, ...]:
        return self.backend.supported_formats

    @property
    def wire_label(self) -> str | None:
        return self.backend.wire_label

    @property
    def execution_provider(self) -> str:
        """``cuda``, ``metal`` or ``cpu`` for llama.cpp; ``cpu`` for unknown backends."""
        return str(getattr(self.backend, "execution_provider", "cpu"))

    def memory_usage(self) -> int | None:
        return self.backend.memory_usage()

    def context_length(self) -> int | None:
        return self.backend.context_length()

    # --- models ------------------------------------------------------------------
    def load_model(self, path: str | Path, **config: Any) -> None:
        """Load a model file (or folder) with default settings, or ``config`` overrides."""
        self.load_model_with_config(LlmConfig(path, **config))

    def load_model_with_config(self, config: LlmConfig) -> None:
        self.backend.load(config)
        path = Path(config.model_path)
        self._metadata = ModelMetadata(
            model_id=path.stem if path.suffix else path.name,
            runtime_type=self.backend.name,
            model_path=str(path),
            execution_provider=self.execution_provider,
        )

    def is_loaded(self) -> bool:
        return self.backend.is_loaded

    def metadata(self) -> ModelMetadata:
        if self._metadata is None or not self.backend.is_loaded:
            raise ModelNotLoadedError("no model is loaded: call load_model() first")
        return self._metadata

    def list_loaded_models(self) -> list[str]:
        if self._metadata is not None and self.backend.is_loaded:
            return [self._metadata.model_id]
        return []

    def unload_model(self) -> None:
        self.backend.unload()
        self._metadata = None

    # --- execution -----------------------------------------------------------------
    def parse_generation_config(self, metadata: Mapping[str, str]) -> GenerationConfig:
        """The adapter's defaults with the generation keys of ``metadata`` applied."""
        changes: dict[str, Any] = {}
        for key, (field_name, parse) in _PARAMS.items():
            if key in metadata:
                value = metadata[key]
                if not isinstance(value, str):
                    raise InvalidInputError(f"metadata {key!r} must be a string, got {type(value).__name__}")
                changes[field_name] = parse(key, value)
        return self.generation_config.replace(**changes) if changes else self.generation_config

    def execute(self, envelope: Envelope) -> Envelope:
        """Generate a reply to a text envelope; the reply's metadata holds the telemetry."""
        if not isinstance(envelope, Envelope):
            raise InvalidInputError(f"execute() needs an Envelope, got {type(envelope).__name__}")
        if envelope.kind != "text":
            raise UnsupportedInputError(
                f"the LLM adapter takes text envelopes, not {envelope.kind!r}; "
                "route audio through a speech model and embeddings through an embedder first")
        if not isinstance(envelope.payload, str):
            raise InvalidInputError("a text envelope's payload must be a str")
        if not self.backend.is_loaded:
            raise ModelNotLoadedError("no model is loaded: call load_model() first")
        config = self.parse_generation_config(envelope.metadata)
        messages = []
        system = envelope.metadata.get("system_prompt")
        if system:
            messages.append(ChatMessage.system(system))
        messages.append(ChatMessage.user(envelope.payload))
        output = self.backend.generate(messages, config)
        return Envelope("text", output.text, self.response_metadata(output))

    infer = execute

    def response_metadata(self, output: GenerationOutput) -> dict[str, str]:
        """Telemetry as strings under the canonical keys, plus the provider label."""
        meta: dict[str, str] = {}
        for key, value in output.to_dict().items():
            if value is None or key in ("text", "token_ids"):
                continue
            if key == "prompt_cached_tokens" and not value:
                continue  # only reported when a prefix was actually reused
            meta[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
        meta["execution_provider"] = self.execution_provider
        if self.wire_label:
            meta["backend"] = self.wire_label
        return meta
