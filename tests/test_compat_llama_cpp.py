"""xybrid.compat.llama_cpp: llama-cpp-python's Llama on xybrid.

Shapes and defaults follow llama-cpp-python 0.3.x's documented signatures and
``llama_types`` TypedDicts; greedy results must equal LlamaCppBackend's, and a
stream must concatenate to the non-streamed text."""

from __future__ import annotations

import inspect
import json
import sys
from unittest.mock import ANY

import numpy as np
import pytest

from xybrid import GenerationConfig, LlmConfig
from xybrid.compat import defaults as D
from xybrid.compat import install_llama_cpp, uninstall_llama_cpp
from xybrid.compat.llama_cpp import (
    Llama,
    LlamaGrammar,
    LlamaRAMCache,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from xybrid.errors import ContextOverflowError, GrammarError, InvalidInputError, UnsupportedInputError
from xybrid.llama_cpp_backend import LlamaCppBackend

PROMPT = "The three primary colours are"
COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "usage"}
CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
CHOICE_KEYS = {"text", "index", "logprobs", "finish_reason"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}


@pytest.fixture(scope="module")
def llm(gemma_path):  # type: ignore[no-untyped-def]
    model = Llama(str(gemma_path), n_ctx=1024, n_threads=1, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def backend(gemma_path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(LlmConfig(gemma_path, context_length=1024, n_threads=1)) as b:
        yield b


# --- defaults and signatures ------------------------------------------------------------
def _defaults(fn) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_method_defaults_are_the_peers() -> None:
    # Values as documented by llama-cpp-python 0.3.x's signatures.
    completion = _defaults(Llama.create_completion)
    assert completion == D.COMPLETION
    assert (completion["max_tokens"], completion["temperature"], completion["top_p"],
            completion["min_p"], completion["top_k"], completion["repeat_penalty"],
            completion["stop"], completion["echo"], completion["logprobs"]) == \
        (16, 0.8, 0.95, 0.05, 40, 1.0, [], False, None)
    chat = _defaults(Llama.create_chat_completion)
    assert chat == D.CHAT_COMPLETION
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"], chat["top_k"],
            chat["min_p"], chat["repeat_penalty"]) == (None, 0.2, 0.95, 40, 0.05, 1.0)
    sample = _defaults(Llama.sample)
    assert {k: sample[k] for k in D.SAMPLE} == D.SAMPLE
    assert sample["temp"] == 0.8 and sample["top_k"] == 40
    gen = _defaults(Llama.generate)
    assert gen["reset"] is True and gen["temp"] == 0.8
    assert _defaults(Llama.tokenize) == {"add_bos": True, "special": False}
    assert _defaults(Llama.embed) == {"normalize": False, "truncate": True, "return_count": False}
    assert D.CONSTRUCTOR["n_ctx"] == 512 and D.CONSTRUCTOR["n_batch"] == 512
    assert D.CONSTRUCTOR["seed"] == 0xFFFFFFFF and D.CONSTRUCTOR["n_gpu_layers"] == 0
    # __call__ is create_completion.
    assert Llama.__call__ is Llama.create_completion


# --- completions ------------------------------------------------------------------------------
def test_completion_shape_and_greedy_equals_backend(llm, backend) -> None:  # type: ignore[no-untyped-def]
    r = llm(PROMPT, max_tokens=12, temperature=0.0)
    assert set(r) == COMPLETION_KEYS
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert isinstance(r["created"], int) and r["model"] == llm.model_path
    (choice,) = r["choices"]
    assert set(choice) == CHOICE_KEYS
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert set(r["usage"]) == USAGE_KEYS
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    assert r["usage"]["prompt_tokens"] == len(tokens)
    assert r["usage"]["completion_tokens"] == 12
    assert r["usage"]["total_tokens"] == len(tokens) + 12
    want = backend.generate_raw(tokens, GenerationConfig.greedy(max_tokens=12))
    assert choice["text"] == want.text
    # The same through token ids, and with the default max_tokens (16).
    by_ids = llm.create_completion(tokens, max_tokens=12, temperature=0.0)
    assert by_ids["choices"][0]["text"] == want.text
    assert llm(PROMPT, temperature=0.0)["usage"]["completion_tokens"] == 16


def test_stream_chunks_concatenate_to_the_text(llm) -> None:  # type: ignore[no-untyped-def]
    whole = llm(PROMPT, max_tokens=20, temperature=0.0, stop=["."])
    chunks = list(llm(PROMPT, max_tokens=20, temperature=0.0, stop=["."], stream=True))
    assert len(chunks) >= 2
    for c in chunks:
        assert set(c) == CHUNK_KEYS and c["object"] == "text_completion"
        assert set(c["choices"][0]) == CHOICE_KEYS
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"text": "", "index": 0, "logprobs": None,
                                        "finish_reason": whole["choices"][0]["finish_reason"]}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert "." not in whole["choices"][0]["text"]


def test_echo_stop_and_finish_reasons(llm) -> None:  # type: ignore[no-untyped-def]
    plain = llm(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    echoed = llm(PROMPT, max_tokens=8, temperature=0.0, echo=True)["choices"][0]["text"]
    assert echoed == PROMPT + plain
    first_word = plain.split()[0]
    stopped = llm(PROMPT, max_tokens=8, temperature=0.0, stop=first_word)["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == plain[: plain.index(first_word)]
    # max_tokens None / <= 0: up to the end of the context window.
    tokens = llm.tokenize(b"Count: 1, 2, 3,", add_bos=True, special=True)
    small = Llama(llm.model_path, n_ctx=64, n_threads=1, verbose=False)
    try:
        r = small(list(tokens), max_tokens=None, temperature=0.0)
        assert r["usage"]["total_tokens"] <= small.n_ctx()
        assert r["choices"][0]["finish_reason"] in ("length", "stop")
        with pytest.raises(ContextOverflowError, match="exceed context window"):
            small("word " * 600)
    finally:
        small.close()


def test_seed_behaviour_matches_the_peer(gemma_path) -> None:  # type: ignore[no-untyped-def]
    a = Llama(str(gemma_path), n_ctx=256, n_threads=1, seed=1234, verbose=False)
    try:
        with_seed = [a(PROMPT, max_tokens=6, seed=42)["choices"][0]["text"] for _ in range(2)]
        assert with_seed[0] == with_seed[1]
        a.set_seed(1234)
        series_a = [a(PROMPT, max_tokens=6)["choices"][0]["text"] for _ in range(2)]
        a.set_seed(1234)
        series_b = [a(PROMPT, max_tokens=6)["choices"][0]["text"] for _ in range(2)]
        # Calls without a seed draw the next one from the previous: the same
        # constructor seed gives the same series.
        assert series_a == series_b
    finally:
        a.close()


def test_unsupported_and_legacy_keywords(gemma_path, llm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedInputError, match="suffix"):
        llm(PROMPT, suffix="end")
    with pytest.raises(UnsupportedInputError, match="mirostat"):
        llm(PROMPT, mirostat_mode=2)
    with pytest.raises(UnsupportedInputError, match="typical"):
        llm(PROMPT, typical_p=0.5)
    with pytest.raises(UnsupportedInputError, match="LoRA"):
        Llama(str(gemma_path), lora_path="adapter.gguf", verbose=False)
    with pytest.raises(UnsupportedInputError, match="chat_format"):
        Llama(str(gemma_path), chat_format="functionary-v2", verbose=False)
    with pytest.raises(InvalidInputError, match="does not exist"):
        Llama("/no/such/model.gguf")
    # Legacy and meaningless keywords are accepted, as by the peer.
    legacy = Llama(str(gemma_path), n_ctx=128, n_threads=1, n_parts=-1, f16_kv=True,
                   logits_all=False, use_mlock=False, rope_freq_base=10000.0, offload_kqv=True,
                   some_future_option=3, verbose=False)
    try:
        assert legacy.n_ctx() >= 128
        assert legacy(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
    finally:
        legacy.close()
    with pytest.raises(GrammarError):
        llm(PROMPT, grammar=LlamaGrammar.from_string("root ::= ( "))
    with pytest.raises(InvalidInputError):
        llm([0, llm.n_vocab() + 5])
    # The failed calls left the model usable.
    assert llm(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_grammar_logprobs_and_logit_bias(llm) -> None:  # type: ignore[no-untyped-def]
    grammar = LlamaGrammar.from_string('root ::= "yes" | "no"')
    r = llm("Is the sky blue? Answer:", grammar=grammar, max_tokens=4, temperature=0.0)
    assert r["choices"][0]["text"] in ("yes", "no")
    schema = LlamaGrammar.from_json_schema(json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    out = llm("Is water wet? As JSON:", grammar=schema, max_tokens=30, temperature=0.0)
    assert isinstance(json.loads(out["choices"][0]["text"])["ok"], bool)

    lp = llm(PROMPT, max_tokens=4, temperature=0.0, logprobs=2)["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert lp["text_offset"][0] == len(PROMPT)
    for token, value, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and tops[token] == value  # the chosen token is in the top dict
        assert max(tops.values()) == value  # greedy: it is the most likely
    streamed = list(llm(PROMPT, max_tokens=4, temperature=0.0, logprobs=2, stream=True))
    assert [c["choices"][0]["logprobs"]["token_logprobs"][0] for c in streamed[:-1]] == \
        lp["token_logprobs"]

    # logit_bias is a stage of the engine's sampler chain (the fast path):
    # banning the greedy first token changes it; -1000 and -inf act as -100.
    first = llm.tokenize(lp["tokens"][0].encode(), add_bos=False, special=False)[0]
    biased = llm(PROMPT, max_tokens=3, temperature=0.0, logit_bias={first: -1000.0})
    assert not biased["choices"][0]["text"].startswith(lp["tokens"][0])
    assert set(biased) == COMPLETION_KEYS
    for ban in (-100, -float("inf")):
        assert llm(PROMPT, max_tokens=3, temperature=0.0, logit_bias={first: ban}) == \
            dict(biased, id=ANY, created=ANY)
    # The same bias added by a logits processor (the token-level path) picks
    # the same tokens.
    def ban_first(_ids, scores):  # type: ignore[no-untyped-def]
        scores[first] -= 100.0
        return scores
    slow = llm(PROMPT, max_tokens=3, temperature=0.0, logits_processor=LogitsProcessorList([ban_first]))
    assert slow["choices"][0]["text"] == biased["choices"][0]["text"]
    # With logprobs (refused on the token-level path) and with a stream.
    with_lp = llm(PROMPT, max_tokens=3, temperature=0.0, logit_bias={first: -100}, logprobs=1)
    assert with_lp["choices"][0]["text"] == biased["choices"][0]["text"]
    assert len(with_lp["choices"][0]["logprobs"]["token_logprobs"]) == 3
    streamed_bias = llm(PROMPT, max_tokens=3, temperature=0.0, logit_bias={first: -100}, stream=True)
    assert "".join(c["choices"][0]["text"] for c in streamed_bias) == biased["choices"][0]["text"]
    # A +100 bias forces a token, in chat too.
    forced = llm.tokenize(b" banana", add_bos=False, special=False)[-1]
    chat = llm.create_chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=3,
                                      temperature=0.0, logit_bias={forced: 100.0})
    assert llm.tokenize(chat["choices"][0]["message"]["content"].encode(), add_bos=False,
                        special=False).count(forced) >= 2
    with pytest.raises(InvalidInputError, match="logit_bias"):
        llm(PROMPT, max_tokens=2, logit_bias={llm.n_vocab() + 3: 1.0})
    with pytest.raises(InvalidInputError, match="logit_bias"):
        llm(PROMPT, max_tokens=2, logit_bias={first: float("nan")})
    assert llm(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_token_level_layer_equals_the_fast_path(llm) -> None:  # type: ignore[no-untyped-def]
    fast = llm(PROMPT, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.reset()
    assert llm.n_tokens == 0
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert llm.input_ids[: llm.n_tokens].tolist() == tokens
    first = llm.sample(temp=0.0)
    got = []
    for tok in llm.generate(tokens, temp=0.0):
        got.append(tok)
        if len(got) == 6:
            break
    assert got[0] == first
    assert llm.detokenize(got).decode() == fast
    # A logits processor and a stopping criterion, through create_completion.
    seen = []

    def spy(ids, scores):  # type: ignore[no-untyped-def]
        seen.append(len(ids))
        return scores

    r = llm(PROMPT, max_tokens=6, temperature=0.0, logits_processor=LogitsProcessorList([spy]))
    assert r["choices"][0]["text"] == fast and len(seen) == 6
    stop_after_3 = StoppingCriteriaList([lambda ids, logits: len(ids) >= len(tokens) + 3])
    r = llm(PROMPT, max_tokens=6, temperature=0.0, stopping_criteria=stop_after_3)
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "stop"
    assert fast.startswith(r["choices"][0]["text"])
    chunks = list(llm(PROMPT, max_tokens=6, temperature=0.0, stream=True,
                      logits_processor=LogitsProcessorList([spy])))
    assert "".join(c["choices"][0]["text"] for c in chunks) == fast


def test_state_and_ram_cache(llm) -> None:  # type: ignore[no-untyped-def]
    llm(PROMPT, max_tokens=4, temperature=0.0)
    state = llm.save_state()
    assert state.n_tokens == llm.n_tokens > 0 and state.llama_state_size == len(state.llama_state)
    cont = llm(PROMPT + " red", max_tokens=6, temperature=0.0)["choices"][0]["text"]
    llm("Something else.", max_tokens=2, temperature=0.0)
    llm.load_state(state)
    assert llm.n_tokens == state.n_tokens
    assert llm(PROMPT + " red", max_tokens=6, temperature=0.0)["choices"][0]["text"] == cont

    cache = LlamaRAMCache(capacity_bytes=1 << 30)
    llm.set_cache(cache)
    try:
        a = llm(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"]
        assert len(cache.cache_state) == 1
        key = next(iter(cache.cache_state))
        assert key[: len(llm.tokenize(PROMPT.encode(), special=True))] == \
            tuple(llm.tokenize(PROMPT.encode(), special=True))
        llm("Unrelated text here.", max_tokens=2, temperature=0.0)
        assert len(cache.cache_state) == 2
        # Hit: the longest-prefix state is loaded back, the result is the same.
        assert llm(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"] == a
        with pytest.raises(KeyError):
            cache[[999999]]
        tiny = LlamaRAMCache(capacity_bytes=1)
        tiny[(1, 2)] = state
        assert len(tiny.cache_state) == 0  # evicted past its capacity
    finally:
        llm.set_cache(None)


def test_facts_tokenizer_and_vocab_only(gemma_path, llm) -> None:  # type: ignore[no-untyped-def]
    assert llm.n_ctx() == 1024 and llm.n_vocab() == 262144 and llm.n_embd() == 640
    assert llm.token_bos() == 2 and llm.token_eos() >= 0 and llm.token_nl() >= 0
    assert llm.metadata["general.architecture"] == "gemma3"
    ids = llm.tokenize(b"Hello world")
    assert ids[0] == llm.token_bos()
    assert llm.tokenize(b"Hello world", add_bos=False) == ids[1:]
    assert llm.detokenize(ids) == b"Hello world"
    assert isinstance(llm.detokenize(ids), bytes)
    assert llm.tokenize(b"<start_of_turn>", add_bos=False, special=True) != \
        llm.tokenize(b"<start_of_turn>", add_bos=False, special=False)
    assert llm.tokenizer().encode("Hello world") == llm.tokenize(b"Hello world", special=True)
    assert llm.tokenizer().decode(ids) == "Hello world"
    with pytest.raises(UnsupportedInputError, match="model hub"):
        Llama.from_pretrained("some/repo", "model.gguf")
    voc = Llama(str(gemma_path), vocab_only=True, verbose=False)
    try:
        assert voc.tokenize(b"Hello world") == ids
        with pytest.raises(InvalidInputError, match="vocab_only"):
            voc("Hello")
    finally:
        voc.close()


def test_embeddings(gemma_path, llm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="embedding=True"):
        llm.embed("hello")
    emb = Llama(str(gemma_path), embedding=True, n_ctx=256, n_threads=1, verbose=False)
    try:
        r = emb.create_embedding(["red", "blue"])
        assert set(r) == {"object", "data", "model", "usage"} and r["object"] == "list"
        assert [d["index"] for d in r["data"]] == [0, 1]
        assert all(d["object"] == "embedding" and len(d["embedding"]) == 640 for d in r["data"])
        assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] > 0
        one = emb.embed("red", normalize=True)
        assert isinstance(one, list) and np.linalg.norm(one) == pytest.approx(1.0, abs=1e-5)
        many, count = emb.embed(["red", "blue"], return_count=True)
        assert len(many) == 2 and count == r["usage"]["prompt_tokens"]
    finally:
        emb.close()


# --- chat ----------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Name a colour."}]


def test_chat_completion_shape_and_greedy_equals_backend(llm, backend) -> None:  # type: ignore[no-untyped-def]
    r = llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    assert set(r) == COMPLETION_KEYS and r["object"] == "chat.completion"
    assert r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant"
    want = backend.generate(MESSAGES, GenerationConfig.greedy(max_tokens=16))
    assert choice["message"]["content"] == want.text
    assert r["usage"]["completion_tokens"] == want.tokens_generated
    assert choice["finish_reason"] in ("stop", "length")

    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]


def test_chat_response_format_logprobs_and_tools(llm) -> None:  # type: ignore[no-untyped-def]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = llm.create_chat_completion([{"role": "user", "content": "Is water wet? Answer in JSON."}],
                                   response_format={"type": "json_object", "schema": schema},
                                   max_tokens=40, temperature=0.0)
    assert isinstance(json.loads(r["choices"][0]["message"]["content"])["ok"], bool)
    lp = llm.create_chat_completion(MESSAGES, max_tokens=4, temperature=0.0, logprobs=True,
                                    top_logprobs=2)["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"}
    assert len(lp["content"]) == 4
    for entry in lp["content"]:
        assert set(entry) == {"token", "bytes", "logprob", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    r = llm.create_chat_completion([{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   max_tokens=60, temperature=0.0)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert "city" in json.loads(call["function"]["arguments"])
    with pytest.raises(InvalidInputError, match="not found"):
        llm.create_chat_completion(MESSAGES, tools=[tool],
                                   tool_choice={"type": "function", "function": {"name": "nope"}})


# --- aliasing -------------------------------------------------------------------------------
def test_install_llama_cpp_aliases_the_module(gemma_path) -> None:  # type: ignore[no-untyped-def]
    previous = sys.modules.get("llama_cpp")
    try:
        facade = install_llama_cpp(force=True)
        import llama_cpp  # type: ignore[import-not-found]
        from llama_cpp import Llama as Aliased  # type: ignore[import-not-found]
        from llama_cpp.llama_grammar import LlamaGrammar as G  # type: ignore[import-not-found]

        assert llama_cpp is facade and Aliased is Llama and G is LlamaGrammar
        with pytest.raises(AttributeError, match="low-level ctypes API"):
            llama_cpp.llama_decode  # noqa: B018
        uninstall_llama_cpp()
        assert "llama_cpp" not in sys.modules or sys.modules["llama_cpp"] is not facade
    finally:
        if previous is not None:
            sys.modules["llama_cpp"] = previous
        else:
            uninstall_llama_cpp()
