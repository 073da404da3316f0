"""`xybrid serve` driven by the clients people point at it: the official
`openai` client (sync and async, streaming and not, every endpoint, tools,
json_schema, its error classes) and LangChain's ChatOpenAI.

One real server process (the default chat model, SmolLM2-135M-Instruct)
serves the whole module over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from server_support import API_KEY, ServerProcess, start_server

MODEL = "smol"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server("--alias", MODEL, "--parallel", "2", "--max-tokens-limit", "256")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=60)


# --- models -------------------------------------------------------------------------

def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --- chat -----------------------------------------------------------------------------

def test_chat_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None and u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens >= 0
    extra = r.model_extra or {}
    assert extra["xybrid"]["choices"][0]["ttft_ms"] > 0  # xybrid's telemetry rides along


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_chat_stop_cuts_at_the_stop_string(client: openai.OpenAI) -> None:
    # Greedy replies to this prompt always contain a space within a few tokens.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32,
                                       temperature=0, stop=[" "])
    assert " " not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < 32


def test_chat_n_choices_and_seed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2,
                                       seed=7, temperature=0.8)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content is not None for c in r.choices)


def test_chat_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_chat_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, max_tokens=48, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_chat_tools_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                       tool_choice=choice, max_tokens=64, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)  # a JSON string, not an object
    args = json.loads(call.function.arguments)
    assert isinstance(args.get("city"), str)

    stream = client.chat.completions.create(model=MODEL, messages=messages,
                                            tools=[WEATHER_TOOL], tool_choice="required",
                                            max_tokens=64, temperature=0, stream=True)
    names: dict[int, str] = {}
    pieces: dict[int, str] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.function.name:
                assert tc.index not in names and tc.id  # the first delta of a call
                names[tc.index] = tc.function.name
            pieces[tc.index] = pieces.get(tc.index, "") + (tc.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and sorted(names) == list(range(len(names))) and names
    assert set(names.values()) == {"get_weather"}
    for k in names:  # the deltas of each call join into its JSON arguments
        assert isinstance(json.loads(pieces[k]).get("city"), str)

    # The call and its result go back to the model as history.
    follow = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0, tools=[WEATHER_TOOL],
        messages=[*messages, c.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_async_client_plain_stream_and_concurrent(server: ServerProcess) -> None:
    asyncio.run(_async_client_session(server))


async def _async_client_session(server: ServerProcess) -> None:
    aclient = openai.AsyncOpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0,
                                 timeout=60)
    r = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content is not None
    stream = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                   stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    many = await asyncio.gather(*[
        aclient.chat.completions.create(model=MODEL, max_tokens=8, messages=[
            {"role": "user", "content": f"Count to {i}."}]) for i in range(4)])
    assert all(m.choices[0].finish_reason in ("stop", "length") for m in many)
    emb = await aclient.embeddings.create(model=MODEL, input="hello")
    assert len(emb.data[0].embedding) > 0
    assert [m.id async for m in aclient.models.list()] == [MODEL]
    comp = await aclient.completions.create(model=MODEL, prompt="Two plus two is", max_tokens=4)
    assert comp.choices[0].text
    cstream = await aclient.completions.create(model=MODEL, prompt="Red, green,", max_tokens=4,
                                               stream=True)
    assert "".join([c.choices[0].text async for c in cstream if c.choices])
    with pytest.raises(openai.BadRequestError):
        await aclient.chat.completions.create(model=MODEL, messages=HELLO, n=1000)
    await aclient.close()


# --- logprobs and logit_bias ------------------------------------------------------------

def _check_chat_logprobs(content: list, n_top: int, greedy: bool) -> None:  # type: ignore[type-arg]
    assert content
    for item in content:
        assert item.logprob <= 0.0
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == n_top
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        for alt in item.top_logprobs:
            assert alt.logprob <= 0.0 and bytes(alt.bytes).decode("utf-8", "replace") == alt.token
        if greedy and n_top:
            # Greedy: the chosen token is the most likely one.
            assert item.top_logprobs[0].token == item.token
            assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)


def test_chat_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert r.usage is not None and len(content) == r.usage.completion_tokens
    _check_chat_logprobs(content, 3, greedy=True)
    # The tokens spell the reply (the chat clean-up only trims around it).
    assert choice.message.content.strip() in "".join(t.token for t in content)

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs is not None
                for item in (c.choices[0].logprobs.content or [])]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content],
                                                          abs=1e-5)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    # They come with the content deltas, not all at the end.
    with_content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert sum(1 for c in with_content if c.choices[0].logprobs is not None) >= 2

    # logprobs without top_logprobs: the chosen tokens only; without logprobs: none.
    bare = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                          temperature=0, logprobs=True)
    assert bare.choices[0].logprobs is not None
    _check_chat_logprobs(bare.choices[0].logprobs.content or [], 0, greedy=True)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                          temperature=0).choices[0].logprobs is None
    # n choices, sampled: each its own logprobs.
    many = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=2,
                                          seed=3, temperature=0.9, logprobs=True,
                                          top_logprobs=2)
    for c in many.choices:
        assert c.logprobs is not None
        _check_chat_logprobs(c.logprobs.content or [], 2, greedy=False)


def test_completions_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0
    for token, value, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                         lp.text_offset):
        assert choice.text[offset:].startswith(token)
        assert value <= 0 and len(top) <= 2
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the best
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                            temperature=0, logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(parts) == 1 and parts[0].tokens == lp.tokens
    assert parts[0].token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    # A stop string: tokens after the cut are not reported.
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                        temperature=0, logprobs=0, stop=[lp.tokens[2]])
    slp = stopped.choices[0].logprobs
    assert slp is not None and slp.tokens == lp.tokens[:2]
    assert slp.top_logprobs == [{}, {}]


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, server: ServerProcess) -> None:
    def ids(text: str) -> list[int]:
        return list(httpx.post(server.base_url + "/tokenize", headers=server.headers,
                               json={"content": text, "add_special": False}).json()["tokens"])

    def reply(**kw: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                              temperature=0, logprobs=True, **kw)  # type: ignore[call-overload, no-any-return]

    base = reply()
    first = base.choices[0].logprobs.content[0]  # type: ignore[union-attr, index]
    first_id = ids(first.token)[0]
    banned = reply(logit_bias={str(first_id): -100})
    assert banned.choices[0].message.content != base.choices[0].message.content
    assert banned.choices[0].logprobs.content[0].token != first.token  # type: ignore[union-attr, index]
    forced_id = ids(" banana")[-1]
    forced = reply(logit_bias={str(forced_id): 100})
    assert [t.token for t in forced.choices[0].logprobs.content] == [" banana"] * 8  # type: ignore[union-attr]
    assert forced.choices[0].message.content == " ".join(["banana"] * 8)
    # Streamed and sampled: still forced.
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, temperature=1.0, seed=5, stream=True,
        logit_bias={str(forced_id): 100}) if c.choices)
    # (A stream keeps the reply's leading space; the plain reply is stripped.)
    assert text.strip() == "banana banana banana banana"
    # Raw completions too.
    comp = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3,
                                     temperature=0, logit_bias={str(forced_id): 100})
    assert comp.choices[0].text == " banana banana banana"


# --- completions ------------------------------------------------------------------------

def test_completions_text_tokens_echo_and_stream(client: openai.OpenAI,
                                                 server: ServerProcess) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")

    tokens = httpx.post(server.base_url + "/tokenize", headers=server.headers,
                        json={"content": "The capital of France is"}).json()["tokens"]
    r2 = client.completions.create(model=MODEL, prompt=tokens, max_tokens=4, temperature=0)
    assert r2.usage is not None and r2.usage.prompt_tokens == len(tokens)

    r3 = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, echo=True)
    assert r3.choices[0].text.startswith("One, two,")

    r4 = client.completions.create(model=MODEL, prompt=["A", "B"], max_tokens=2, n=2)
    assert sorted(c.index for c in r4.choices) == [0, 1, 2, 3]

    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True) if c.choices)
    assert text

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=4)
    assert "suffix" in str(info.value)


# --- embeddings ---------------------------------------------------------------------------

def test_embeddings_float_and_base64(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.embeddings.create(model=MODEL, input=["red apples", "green pears"])
    assert [d.index for d in r.data] == [0, 1]
    vectors = np.array([d.embedding for d in r.data])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(server.api_url + "/embeddings", headers=server.headers,
                     json={"input": "red apples", "encoding_format": "float",
                           "dimensions": 64}).json()
    assert len(raw["data"][0]["embedding"]) == 64


# --- tokenizer -----------------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(server: ServerProcess) -> None:
    text = "Hello, world! Ünïcödé ✓"
    tok = httpx.post(server.base_url + "/tokenize", headers=server.headers,
                     json={"content": text, "add_special": False, "with_pieces": True}).json()
    ids = [t["id"] for t in tok["tokens"]]
    pieces = [t["piece"] for t in tok["tokens"]]
    assert any(isinstance(p, list) for p in pieces)  # part of a character: its bytes
    raw = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in pieces)
    assert raw.decode() == text
    back = httpx.post(server.base_url + "/detokenize", headers=server.headers,
                      json={"tokens": ids}).json()
    assert back["content"] == text


# --- errors through the client's classes ----------------------------------------------------

def test_client_error_classes(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100000)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True,
                                       top_logprobs=21)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, logit_bias={"49152": 5})
    assert info.value.param == "logit_bias"
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert nf.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "https://example.invalid/x.png"}}]}])
    assert "data: URL" in str(info.value)


# --- LangChain -------------------------------------------------------------------------------

def test_langchain_chat_openai_invoke_and_stream(server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.api_url, api_key=API_KEY, max_tokens=16,
                     temperature=0, max_retries=0)
    reply = llm.invoke("Name a colour.")
    assert isinstance(reply.content, str) and reply.content.strip()
    parts = [chunk.content for chunk in llm.stream("Name a fruit.")]
    assert len(parts) >= 2 and "".join(parts).strip()


# --- operations --------------------------------------------------------------------------------

def test_health_and_metrics(server: ServerProcess) -> None:
    h = httpx.get(server.base_url + "/health")  # no key needed
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    m = httpx.get(server.base_url + "/metrics", headers=server.headers)
    assert m.status_code == 200
    text = m.text
    assert 'xybrid_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert "xybrid_completion_tokens_total" in text
    assert "xybrid_request_duration_seconds_bucket" in text
    assert "xybrid_sequences_in_flight" in text
    log = server.log()
    assert "POST /v1/chat/completions 200 tokens=" in log  # one line per request


# --- multimodal (--mmproj) ---------------------------------------------------------------------

def test_projector_and_embedding_model(tmp_path, llama_cpp_dir) -> None:  # type: ignore[no-untyped-def]
    import base64
    import io
    import wave

    from PIL import Image

    from xybrid.testing.tiny_models import write_tiny_vlm

    model, mmproj = write_tiny_vlm(tmp_path, vision=True, audio=True,
                                   llama_cpp_dir=llama_cpp_dir)
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.linspace(0, 2 * np.pi * 440, 8000)) * 3000)
                      .astype("<i2").tobytes())
    from xybrid.testing.tiny_models import write_tiny_llama

    embed = write_tiny_llama(tmp_path / "embed.gguf", n_embd=32, llama_cpp_dir=llama_cpp_dir)
    srv = start_server("--model", str(model), "--mmproj", str(mmproj), "--alias", "vlm",
                       "--embedding-model", str(embed))
    try:
        client = openai.OpenAI(base_url=srv.api_url, api_key=API_KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model="vlm", max_tokens=4, temperature=0, messages=[{
            "role": "user", "content": [
                {"type": "text", "text": "Describe these."},
                {"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
                {"type": "input_audio", "input_audio": {
                    "data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}}]}])
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage is not None and r.usage.prompt_tokens > 0
        # --embedding-model: its own model id and its own vector size.
        assert [m.id for m in client.models.list()] == ["vlm", "embed"]
        e = client.embeddings.create(model="embed", input=["one", "two"])
        assert [len(d.embedding) for d in e.data] == [32, 32]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="vlm", input="one")
    finally:
        assert srv.stop() == 0, srv.log()
