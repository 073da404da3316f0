"""LlmRuntimeAdapter: envelopes in, envelopes out, over the real backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from xybrid.adapter import Envelope, LlmRuntimeAdapter
from xybrid.errors import InvalidInputError, ModelNotLoadedError, UnsupportedInputError
from xybrid.llama_cpp_backend import _PREFIX_ALIGN as ALIGN
from xybrid.llama_cpp_backend import LlamaCppBackend, execution_provider
from xybrid.types import ChatMessage, GenerationConfig

QUESTION = "What is the capital of France?"
TELEMETRY_KEYS = {"tokens_in", "tokens_out", "tokens_generated", "ttft_ms", "finish_reason",
                  "stop_reason", "generation_time_ms", "tokens_per_second", "emitted_chunks",
                  "execution_provider", "backend"}


@pytest.fixture
def adapter(gemma_backend: LlamaCppBackend) -> LlmRuntimeAdapter:
    return LlmRuntimeAdapter(gemma_backend, GenerationConfig.greedy(max_tokens=16))


def test_text_in_text_out(adapter: LlmRuntimeAdapter, gemma_backend: LlamaCppBackend) -> None:
    reply = adapter.execute(Envelope.text(QUESTION, max_tokens="8"))
    assert reply.kind == "text"
    assert isinstance(reply.payload, str) and reply.payload
    meta = reply.metadata
    assert TELEMETRY_KEYS <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["tokens_out"] == meta["tokens_generated"] == "8"
    assert meta["finish_reason"] == "length"
    assert float(meta["ttft_ms"]) > 0
    assert float(meta["decode_tps"]) > 0
    from xybrid import _build_info

    assert meta["execution_provider"] == execution_provider()
    assert execution_provider() == ("cuda" if _build_info.CUDA else "cpu")
    assert meta["backend"] == "llamacpp"
    assert "text" not in meta and "token_ids" not in meta
    # First call on an empty cache: nothing reused, so the key is absent.
    assert "prompt_cached_tokens" not in meta
    # The same reply as the backend gives for the same conversation.
    gemma_backend.reset_cache()
    direct = gemma_backend.generate([ChatMessage.user(QUESTION)],
                                    GenerationConfig.greedy(max_tokens=8))
    assert reply.payload == direct.text
    assert meta["tokens_in"] == str(direct.prompt_tokens)
    assert adapter.infer(Envelope.text(QUESTION, max_tokens="2")).metadata["tokens_out"] == "2"


def test_metadata_parameters_are_parsed(adapter: LlmRuntimeAdapter) -> None:
    cfg = adapter.parse_generation_config({
        "max_tokens": " 8 ", "temperature": "0.5", "top_p": "0.8", "min_p": "0.1",
        "top_k": "20", "seed": "42", "repetition_penalty": "1.1",
        "frequency_penalty": "0.2", "presence_penalty": "-0.3", "stop": '["\\n", "END"]',
        "system_prompt": "ignored here", "unrelated": "x"})
    assert cfg.max_tokens == 8 and cfg.temperature == 0.5 and cfg.top_p == 0.8
    assert cfg.min_p == 0.1 and cfg.top_k == 20 and cfg.seed == 42
    assert cfg.repetition_penalty == 1.1
    assert cfg.frequency_penalty == 0.2 and cfg.presence_penalty == -0.3
    assert cfg.stop_sequences == ("\n", "END")
    assert adapter.parse_generation_config({"stop": "END"}).stop_sequences == ("END",)
    # Unset keys keep the adapter's defaults.
    assert adapter.parse_generation_config({}) == adapter.generation_config
    assert adapter.parse_generation_config({"top_k": "5"}).max_tokens == 16


def test_stop_from_metadata_reaches_the_backend(adapter: LlmRuntimeAdapter,
                                                gemma_backend: LlamaCppBackend) -> None:
    count = "Count: 1, 2, 3, 4, 5,"
    full = adapter.execute(Envelope.text(count))
    assert "3\n" in full.payload
    gemma_backend.reset_cache()
    cut = adapter.execute(Envelope.text(count, stop='["3\\n"]'))
    assert cut.metadata["finish_reason"] == "stop"
    assert cut.payload == full.payload[: full.payload.index("3\n")].strip()


@pytest.mark.parametrize("key,value", [
    ("max_tokens", "abc"),
    ("max_tokens", "8.5"),
    ("max_tokens", "0"),
    ("temperature", "-1"),
    ("temperature", "hot"),
    ("temperature", "nan"),
    ("top_p", "2"),
    ("top_k", "1.5"),
    ("seed", "-7"),
    ("repetition_penalty", "0"),
    ("stop", "[1, 2]"),
    ("stop", "[not json"),
])
def test_bad_metadata_values_name_the_key(adapter: LlmRuntimeAdapter,
                                          gemma_backend: LlamaCppBackend,
                                          key: str, value: str) -> None:
    with pytest.raises(InvalidInputError, match=key):
        adapter.execute(Envelope.text(QUESTION, **{key: value}))
    # Nothing ran: the backend is untouched and still answers.
    assert gemma_backend.last_cached_prefix_len() is None
    ok = adapter.execute(Envelope.text(QUESTION, max_tokens="2"))
    assert ok.metadata["tokens_out"] == "2"


def test_non_string_metadata_value(adapter: LlmRuntimeAdapter) -> None:
    with pytest.raises(InvalidInputError, match="max_tokens"):
        adapter.execute(Envelope("text", QUESTION, {"max_tokens": 8}))  # type: ignore[dict-item]


@pytest.mark.parametrize("kind,payload", [
    ("audio", b"\x00\x01" * 100),
    ("embedding", [0.1, 0.2, 0.3]),
])
def test_audio_and_embedding_are_rejected(adapter: LlmRuntimeAdapter, kind: str,
                                          payload: object) -> None:
    with pytest.raises(UnsupportedInputError, match=kind):
        adapter.execute(Envelope(kind, payload))  # type: ignore[arg-type]
    assert issubclass(UnsupportedInputError, InvalidInputError)


def test_malformed_envelopes(adapter: LlmRuntimeAdapter) -> None:
    with pytest.raises(InvalidInputError):
        adapter.execute(Envelope("text", 123))
    with pytest.raises(InvalidInputError):
        adapter.execute("just a string")  # type: ignore[arg-type]


def test_system_prompt_is_honoured(adapter: LlmRuntimeAdapter,
                                   gemma_backend: LlamaCppBackend) -> None:
    system = "You are a pirate. Answer like one."
    with_system = adapter.execute(Envelope.text(QUESTION, system_prompt=system, max_tokens="4"))
    expected = gemma_backend.format_chat([ChatMessage.system(system), ChatMessage.user(QUESTION)])
    assert system in expected
    n_expected = len(gemma_backend.model.tokenize(expected, add_special=True, parse_special=True))
    assert with_system.metadata["tokens_in"] == str(n_expected)
    gemma_backend.reset_cache()
    without = adapter.execute(Envelope.text(QUESTION, max_tokens="4"))
    assert int(without.metadata["tokens_in"]) < n_expected
    # The reply is the backend's reply to exactly that conversation.
    gemma_backend.reset_cache()
    direct = gemma_backend.generate([ChatMessage.system(system), ChatMessage.user(QUESTION)],
                                    GenerationConfig.greedy(max_tokens=4))
    assert with_system.payload == direct.text


def test_prompt_cached_tokens_on_a_shared_prefix(adapter: LlmRuntimeAdapter,
                                                 gemma_backend: LlamaCppBackend) -> None:
    # Long enough for a reusable prefix of more than ALIGN tokens (the backend
    # keeps reused prefixes on multiples of ALIGN).
    system = ("You are a careful and friendly geography assistant. You answer every question "
              "about countries, cities and rivers with the name of one city and nothing else.")
    first = adapter.execute(Envelope.text(QUESTION, system_prompt=system, max_tokens="4"))
    assert "prompt_cached_tokens" not in first.metadata
    second = adapter.execute(Envelope.text("What is the capital of Spain?",
                                           system_prompt=system, max_tokens="4"))
    cached = int(second.metadata["prompt_cached_tokens"])
    assert 0 < cached < int(second.metadata["tokens_in"])
    assert cached == gemma_backend.last_cached_prefix_len()

    # Exactly the common prefix of the two prompts (the system turn and the
    # start of the user turn) was served from the cache.
    def tokens(user: str) -> list[int]:
        text = gemma_backend.format_chat([ChatMessage.system(system), ChatMessage.user(user)])
        return gemma_backend.model.tokenize(text, add_special=True, parse_special=True)

    a, b = tokens(QUESTION), tokens("What is the capital of Spain?")
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= ALIGN
    assert cached == common - common % ALIGN


def test_not_loaded(tiny_llama_path: Path) -> None:
    adapter = LlmRuntimeAdapter()
    assert isinstance(adapter.backend, LlamaCppBackend)
    assert not adapter.is_loaded()
    assert adapter.list_loaded_models() == []
    with pytest.raises(ModelNotLoadedError):
        adapter.execute(Envelope.text(QUESTION))
    with pytest.raises(ModelNotLoadedError):
        adapter.metadata()
    # Unsupported kinds are reported as such even before a model is loaded.
    with pytest.raises(UnsupportedInputError):
        adapter.execute(Envelope("audio", b""))


def test_load_run_unload(tmp_path: Path, tiny_llama_path: Path) -> None:
    adapter = LlmRuntimeAdapter(generation_config=GenerationConfig.greedy(max_tokens=4))
    assert adapter.name == "llm"
    assert adapter.supported_formats == ("gguf",)
    assert adapter.wire_label == "llamacpp"
    adapter.load_model(tiny_llama_path, context_length=256, n_threads=1, chat_template="chatml")
    assert adapter.is_loaded()
    meta = adapter.metadata()
    assert meta.model_id == "tiny-llama"
    assert meta.runtime_type == "llama-cpp"
    assert meta.model_path == str(tiny_llama_path)
    assert meta.execution_provider == execution_provider()
    assert adapter.list_loaded_models() == ["tiny-llama"]
    assert adapter.context_length() == 256
    assert adapter.memory_usage() is not None and adapter.memory_usage() > 0
    reply = adapter.execute(Envelope.text("Hello"))
    assert reply.metadata["tokens_out"] in {"1", "2", "3", "4"}
    assert reply.metadata["backend"] == "llamacpp"
    # A folder holding the model: its id is the folder's name.
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(tiny_llama_path)
    adapter.load_model(folder, context_length=256, n_threads=1, chat_template="chatml")
    assert adapter.metadata().model_id == "my-model"
    adapter.unload_model()
    assert not adapter.is_loaded()
    assert adapter.list_loaded_models() == []
    with pytest.raises(ModelNotLoadedError):
        adapter.execute(Envelope.text("Hello"))
