"""`xybrid serve` over raw HTTP: malformed bodies, wrong types, huge values,
keys, limits, overload, client disconnects, a bounded soak and shutdown.

Every refusal must be a 4xx in OpenAI's error shape; nothing a client sends
may produce a 5xx, crash the process or leave a sequence in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from server_support import ServerProcess, assert_openai_error, start_server

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello."}]
LONG = 1500  # tokens an abandoned stream would run for if it were not cancelled
# A grammar that completes only after 2,000 words, more tokens than any
# request here asks for: the model cannot end the reply early. (A grammar
# that can never complete is refused: it matches nothing.)
ENDLESS = 'root ::= word{2000}\nword ::= [a-z]+ " "'


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server("--parallel", "2", "--max-queued", "30", "--max-body-bytes", "65536",
                       "--max-messages", "8", "--max-n", "2", "--max-tools", "2",
                       "--max-tokens-limit", str(LONG))
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


def post(server: ServerProcess, path: str, body: object = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {**server.headers, **(headers or {})}
    if content is not None:
        return httpx.post(server.base_url + path, content=content, headers=h, timeout=60)
    return httpx.post(server.base_url + path, json=body, headers=h, timeout=60)


# --- malformed bodies and wrong types --------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b'{"messages": [}', b"\xff\xfe"])
def test_malformed_json_is_400(server: ServerProcess, raw: bytes) -> None:
    r = post(server, CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": -1}, "temperature"),
    ({"messages": HELLO, "top_p": 2}, "top_p"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "stream": "yes please"}, "stream"),
    ({"messages": HELLO, "stop": 3}, None),
    ({"messages": HELLO, "tools": "all of them"}, "tools"),
    ({"messages": HELLO, "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HELLO, "logit_bias": {"50256": -100}}, "logit_bias"),  # not in the vocab
    ({"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"-3": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"1e3": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"99999999999999999999": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"5": -1000}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"5": "x"}}, "logit_bias.5"),
    ({"messages": HELLO, "logit_bias": [5, 1]}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": HELLO, "top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"messages": HELLO, "logprobs": "many"}, "logprobs"),
    ({"messages": HELLO, "grammar": "root ::= ("}, None),
])
def test_wrong_types_and_values_are_400_naming_the_field(server: ServerProcess, body: object,
                                                         param: str | None) -> None:
    err = assert_openai_error(post(server, CHAT, body), 400)
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 10**20}, "max_tokens"),
    ({"max_tokens": LONG + 1}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_tokens"),
    ({"n": 1000}, "n"),
    ({"seed": 10**30}, "seed"),
    ({"seed": -1}, "seed"),
    ({"top_k": -5}, "top_k"),
    ({"top_k": 10**20}, "top_k"),
    ({"repeat_penalty": 1e308, "max_tokens": 10**40}, "max_tokens"),
    ({"stop": ["x"] * 100}, "stop"),
])
def test_huge_values_are_refused(server: ServerProcess, extra: dict[str, object],
                                 param: str) -> None:
    assert_openai_error(post(server, CHAT, {"messages": HELLO, **extra}), 400, param=param)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 2, "echo": True}, "logprobs"),
    ({"logit_bias": {"70000": 5}}, "logit_bias"),
])
def test_completion_logprobs_and_bias_bounds(server: ServerProcess, extra: dict[str, object],
                                             param: str) -> None:
    body = {"prompt": "One, two,", "max_tokens": 2, **extra}
    assert_openai_error(post(server, "/v1/completions", body), 400, param=param)
    # The refusals left the server serving.
    ok = post(server, "/v1/completions", {"prompt": "One, two,", "max_tokens": 2,
                                          "logprobs": 5, "logit_bias": {"11": 3}})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"][0]["logprobs"]["tokens"]) >= 1


def test_nan_and_infinity_are_refused(server: ServerProcess) -> None:
    raw = b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    assert_openai_error(post(server, CHAT, content=raw,
                             headers={"Content-Type": "application/json"}), 400,
                        param="temperature")
    raw = b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": -Infinity}}'
    assert_openai_error(post(server, CHAT, content=raw,
                             headers={"Content-Type": "application/json"}), 400,
                        param="logit_bias.5")


def test_limits_on_messages_and_tools(server: ServerProcess) -> None:
    many = [{"role": "user", "content": "hi"}] * 9
    assert_openai_error(post(server, CHAT, {"messages": many}), 400, param="messages",
                        code="limit_exceeded")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tools = [{**tool, "function": {**tool["function"], "name": f"f{i}"}} for i in range(3)]
    assert_openai_error(post(server, CHAT, {"messages": HELLO, "tools": tools}), 400,
                        param="tools", code="limit_exceeded")


def test_context_length_exceeded(server: ServerProcess) -> None:
    huge = " ".join(["word"] * 5000)
    err = assert_openai_error(post(server, CHAT, {"messages": [{"role": "user", "content": huge}],
                                                  "max_tokens": 4}), 400,
                              code="context_length_exceeded")
    assert "context" in err["message"]


def test_bad_token_ids(server: ServerProcess) -> None:
    assert_openai_error(post(server, "/detokenize", {"tokens": [10**9]}), 400,
                        param="tokens[0]")
    assert_openai_error(post(server, "/v1/completions", {"prompt": [-3, 5], "max_tokens": 2}),
                        400)


def test_a_lone_surrogate_is_400(server: ServerProcess) -> None:
    raw = b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}], "max_tokens": 2}'
    r = post(server, CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400), r.text  # refused, or replaced by the tokenizer
    if r.status_code == 400:
        assert_openai_error(r, 400)


# --- body size ---------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(server: ServerProcess) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 70000}]}
    assert_openai_error(post(server, CHAT, big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: found while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'

    r = httpx.post(server.base_url + CHAT, content=chunks(), timeout=60,
                   headers={**server.headers, "Content-Type": "application/json"})
    assert_openai_error(r, 413)


# --- keys and routes ---------------------------------------------------------------------------

def test_api_key(server: ServerProcess) -> None:
    url = server.base_url
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}),
                        401, code="invalid_api_key")
    assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic abc"}),
                        401)
    assert httpx.get(url + "/v1/models", headers={"x-api-key": server.api_key or ""}) \
        .status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/openapi.json").status_code == 200


def test_unknown_route_and_method(server: ServerProcess) -> None:
    assert_openai_error(httpx.get(server.base_url + "/v1/nothing", headers=server.headers), 404)
    assert_openai_error(httpx.get(server.base_url + CHAT, headers=server.headers), 405)
    assert_openai_error(post(server, CHAT, {"model": "nope", "messages": HELLO}), 404,
                        code="model_not_found")


# --- errors after the stream started -------------------------------------------------------------

def test_error_after_the_stream_started_is_an_sse_error_event(server: ServerProcess) -> None:
    # The grammar forces a reply that opens a tool call and never closes it:
    # the text before it streams, then the engine fails to parse the call.
    tool = {"type": "function", "function": {"name": "get_weather",
                                             "parameters": {"type": "object"}}}
    grammar = 'root ::= "Sure. <tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arg"'
    body = {"messages": HELLO, "tools": [tool], "grammar": grammar, "max_tokens": 64,
            "stream": True}
    with httpx.stream("POST", server.base_url + CHAT, json=body, headers=server.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["code"] == "tool_call_parse_error"
    text = "".join(c["delta"].get("content") or ""
                   for e in events[:-1] for c in json.loads(e)["choices"])
    assert text.startswith("Sure.")  # streamed before the error
    server.wait_idle()


# --- overload -------------------------------------------------------------------------------------

def test_overload_is_429_with_retry_after() -> None:
    srv = start_server("--parallel", "1", "--max-queued", "0")
    try:
        body = {"messages": HELLO, "max_tokens": LONG // 2, "stream": True,
                "grammar": ENDLESS}
        with httpx.stream("POST", srv.base_url + CHAT, json=body, headers=srv.headers,
                          timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            busy = httpx.post(srv.base_url + CHAT, json={"messages": HELLO, "max_tokens": 2},
                              headers=srv.headers, timeout=30)
            assert_openai_error(busy, 429)
            assert int(busy.headers["Retry-After"]) >= 1
        srv.wait_idle()
        ok = httpx.post(srv.base_url + CHAT, json={"messages": HELLO, "max_tokens": 2},
                        headers=srv.headers, timeout=30)
        assert ok.status_code == 200
        assert "xybrid_requests_rejected_total 1.0" in httpx.get(
            srv.base_url + "/metrics", headers=srv.headers).text
    finally:
        assert srv.stop() == 0, srv.log()


# --- disconnects ------------------------------------------------------------------------------------

def _timed_request(server: ServerProcess) -> float:
    t0 = time.perf_counter()
    r = post(server, CHAT, {"messages": HELLO, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    return time.perf_counter() - t0


def test_abandoned_streams_are_cancelled(server: ServerProcess) -> None:
    solo = _timed_request(server)
    # How long one token takes, from a run that cannot stop early.
    r = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 64, "temperature": 0,
                                         "grammar": ENDLESS})
    assert r.json()["usage"]["completion_tokens"] == 64
    per_token_s = r.json()["xybrid"]["choices"][0]["generation_time_ms"] / 1000.0 / max(
        1, r.json()["usage"]["completion_tokens"])
    body = {"prompt": "Once upon a time", "max_tokens": LONG, "stream": True,
            "grammar": ENDLESS}
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                          headers=server.headers, timeout=60) as s:
            got = 0
            for line in s.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break  # leaving the block closes the connection mid-stream
    t0 = time.perf_counter()
    server.wait_idle(timeout=5)
    idle_after = time.perf_counter() - t0
    # Had the three streams run on, the server would stay busy for ~3 * LONG tokens.
    assert idle_after < LONG * per_token_s / 2, (idle_after, per_token_s)
    after = _timed_request(server)
    assert after < solo + LONG * per_token_s / 2, (solo, after)
    metrics = httpx.get(server.base_url + "/metrics", headers=server.headers).text
    line = next(x for x in metrics.splitlines() if x.startswith("xybrid_client_disconnects_total"))
    assert float(line.split()[-1]) >= 3


def test_abandoned_non_streaming_request_is_cancelled(server: ServerProcess) -> None:
    body = {"messages": HELLO, "max_tokens": LONG, "grammar": ENDLESS}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + CHAT, json=body, headers=server.headers, timeout=1.0)
    server.wait_idle(timeout=10)


# --- soak ------------------------------------------------------------------------------------------

# The size: 1,000 requests from 16 clients. It took 100-160 s on the
# shared 2-core development machine (128 requests: about 17 s); set
# XYBRID_SOAK_REQUESTS to run a smaller one.
SOAK_REQUESTS = int(os.environ.get("XYBRID_SOAK_REQUESTS", "1000"))
SOAK_CLIENTS = 16


@pytest.mark.slow
def test_soak_with_random_disconnects(server: ServerProcess) -> None:
    rng = random.Random(1234)
    statuses: list[int] = []
    rss_before = server.rss_bytes()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        kind = rng.random()
        stream = kind < 0.5
        body = {"messages": [{"role": "user", "content": f"Say a word about {i}."}],
                "max_tokens": rng.choice([1, 4, 8]), "stream": stream,
                "temperature": rng.choice([0, 0.7])}
        if kind < 0.2:  # abandon mid-stream
            body["max_tokens"] = 64
            async with client.stream("POST", CHAT, json=body) as r:
                statuses.append(r.status_code)
                async for _ in r.aiter_lines():
                    break
            return
        if 0.5 <= kind < 0.6:  # logprobs and a logit bias now and then
            body["logprobs"] = True
            body["top_logprobs"] = rng.randrange(0, 6)
            body["logit_bias"] = {str(rng.randrange(0, 49152)): rng.uniform(-100, 100)}
        if kind > 0.9:  # a bad request now and then
            body["temperature"] = "warm"
        r = await client.post(CHAT, json=body)
        statuses.append(r.status_code)

    async def run() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(SOAK_REQUESTS):
            queue.put_nowait(i)

        async def worker() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers,
                                         timeout=120) as client:
                while not queue.empty():
                    await one(client, queue.get_nowait())

        await asyncio.gather(*[worker() for _ in range(SOAK_CLIENTS)])

    asyncio.run(run())
    assert len(statuses) == SOAK_REQUESTS
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert set(statuses) <= {200, 400, 429}, sorted(set(statuses))
    assert statuses.count(200) > SOAK_REQUESTS // 2
    server.wait_idle(timeout=15)
    grown = server.rss_bytes() - rss_before
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert server.proc.poll() is None


# --- shutdown ---------------------------------------------------------------------------------------

def test_sigterm_drains_and_exits_zero() -> None:
    srv = start_server("--shutdown-timeout", "2", api_key=None)
    body = {"messages": HELLO, "max_tokens": LONG, "stream": True, "grammar": ENDLESS}
    with httpx.stream("POST", srv.base_url + CHAT, json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        try:  # the stream finishes or is cut when the grace period ends
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass
    assert srv.proc.wait(30) == 0, srv.log()
    assert time.perf_counter() - t0 < 20
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base_url + "/health", timeout=2)
    srv.stop()


# --- loading ---------------------------------------------------------------------------------------

def test_health_is_503_while_the_model_loads() -> None:
    # The app before its model has loaded (the lifespan, which loads it, is
    # not started here): the state every server is in during start-up.
    from fastapi.testclient import TestClient

    from xybrid.server.app import create_app
    from xybrid.server.settings import ServerSettings

    client = TestClient(create_app(ServerSettings(log_requests=False)))
    h = client.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "loading"
    assert int(h.headers["Retry-After"]) >= 1
    r = client.post(CHAT, json={"messages": HELLO})
    assert_openai_error(r, 503, code="model_not_loaded")
    assert "loading" in r.json()["error"]["message"]
