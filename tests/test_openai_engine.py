"""OpenAIEngine against the real stub server over a socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.testing.stub_server import GARBAGE, GARBAGE_TEXT, RESET, StubServer

pytestmark = pytest.mark.timeout(60)

PARAMS = SamplingParams(max_tokens=32)


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Solve it."}, {"role": "user", "content": text}]


def make_engine(server: StubServer, **overrides) -> OpenAIEngine:
    fields = dict(engine="openai", model="stub-teacher", base_url=server.base_url, api_key_env=None,
                  max_in_flight=8, request_timeout_s=10.0, max_retries=0)
    return OpenAIEngine(OpenAIModel(**{**fields, **overrides}))


def run(engine: OpenAIEngine, chats: list[list[dict]]):
    async def generate_then_close():
        try:
            return await engine.agenerate(chats, PARAMS)
        finally:
            await engine.aclose()

    return asyncio.run(generate_then_close())


def test_batch_in_order_with_usage():
    seen = []

    def reply(messages):
        seen.append(messages)
        return f"echo {messages[-1]['content']}"

    with StubServer(reply=reply, latency_s=0.01) as server:
        engine = make_engine(server)
        assert engine.name == "stub-teacher"
        assert engine._bound is None  # constructing opens nothing
        out = run(engine, [chat(f"question number {i}") for i in range(10)])
    assert [c.text for c in out] == [f"echo question number {i}" for i in range(10)]
    assert all(c.error is None for c in out)
    assert all(c.prompt_tokens == 5 and c.completion_tokens == 4 for c in out)  # "Solve it." + 3 words
    assert all(c.latency_s > 0 for c in out)
    assert sorted(m[-1]["content"] for m in seen) == sorted(f"question number {i}" for i in range(10))
    assert seen[0][0] == {"role": "system", "content": "Solve it."}


def test_concurrency_is_bounded_by_max_in_flight():
    with StubServer(latency_s=0.2) as server:
        out = run(make_engine(server, max_in_flight=8), [chat(str(i)) for i in range(32)])
        assert len(server.requests) == 32
        assert server.max_in_flight_seen == 8
    assert all(c.text == "The answer is: 42" for c in out)


@pytest.mark.parametrize("status", [429, 500])
def test_retries_then_succeeds(status):
    with StubServer(fail=lambda i, m: status if i < 2 else None) as server:
        out = run(make_engine(server, max_retries=3), [chat("retry me")])
        assert len(server.requests) == 3
    assert out[0].error is None and out[0].text == "The answer is: 42"


def test_one_failing_chat_does_not_fail_the_batch():
    fail = lambda i, m: 500 if m[-1]["content"] == "bad" else None  # noqa: E731
    with StubServer(fail=fail) as server:
        out = run(make_engine(server, max_retries=1), [chat("good 1"), chat("bad"), chat("good 2")])
        assert sum(m[-1]["content"] == "bad" for m in server.requests) == 2  # tried, retried once
    assert out[0].text == out[2].text == "The answer is: 42"
    assert out[1].text is None and out[1].error.startswith("InternalServerError:")


def test_timeout_becomes_an_error():
    with StubServer(latency_s=2.0) as server:
        out = run(make_engine(server, request_timeout_s=0.5, max_retries=0), [chat("slow")])
    assert out[0].text is None and "timeout" in out[0].error.lower()


def test_garbage_response_becomes_an_error():
    fail = lambda i, m: GARBAGE if m[-1]["content"] == "garbage" else None  # noqa: E731
    with StubServer(fail=fail) as server:
        out = run(make_engine(server), [chat("garbage"), chat("fine")])
    assert out[0].text is None and out[0].error.startswith("MalformedResponse:")
    assert out[1].text == "The answer is: 42"


def test_api_key_is_sent_and_never_leaks(monkeypatch):
    monkeypatch.setenv("DNC_TEST_KEY", "sk-secret-123")
    fail = lambda i, m: 401 if m[-1]["content"] == "denied" else None  # noqa: E731
    with StubServer(fail=fail, reply=lambda m: "key sk-secret-123 seen") as server:
        out = run(make_engine(server, api_key_env="DNC_TEST_KEY"), [chat("ok"), chat("denied")])
        assert server.headers["authorization"] == "Bearer sk-secret-123"
    assert out[1].error is not None
    assert all("sk-secret-123" not in (c.error or "") for c in out)

    monkeypatch.delenv("DNC_TEST_KEY")
    with pytest.raises(RuntimeError, match="DNC_TEST_KEY"):
        OpenAIEngine(OpenAIModel(engine="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="DNC_TEST_KEY"))


def test_error_message_is_redacted():
    class Leaky(Exception):
        pass

    engine = OpenAIEngine(OpenAIModel(engine="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None))
    engine._api_key = "sk-secret-123"
    assert engine._describe(Leaky("bad key sk-secret-123")) == "Leaky: bad key ***"


def test_connection_refused_becomes_an_error():
    with StubServer() as server:
        base_url = server.base_url  # the port is free again once the server stopped
    engine = OpenAIEngine(OpenAIModel(engine="openai", model="m", base_url=base_url, api_key_env=None, max_retries=0))
    out = run(engine, [chat("anyone?")])
    assert out[0].text is None and out[0].error.startswith("APIConnectionError:")


def test_official_sync_client_talks_to_stub():
    with StubServer(reply=lambda m: "hello there") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10)
        try:
            assert [m.id for m in client.models.list()] == ["stub-teacher"]
            response = client.chat.completions.create(model="stub-teacher", messages=chat("hi"))
        finally:
            client.close()
    assert response.choices[0].message.content == "hello there"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == 3 and response.usage.completion_tokens == 2


# ---------------------------------------------------------------- unusable 200 replies are retried (issue 12, item 10)


@pytest.mark.parametrize("fault", [GARBAGE, GARBAGE_TEXT, RESET])
def test_an_unusable_reply_is_retried_like_a_5xx(fault):
    with StubServer(fail=lambda i, m: fault if i < 2 else None) as server:
        out = run(make_engine(server, max_retries=3), [chat("flaky")])
        assert len(server.requests) == 3
    assert out[0].error is None and out[0].text == "The answer is: 42"


def test_an_unusable_reply_fails_the_chat_after_max_retries():
    with StubServer(fail=lambda i, m: GARBAGE_TEXT) as server:
        out = run(make_engine(server, max_retries=2), [chat("always garbage")])
        assert len(server.requests) == 3
    assert out[0].text is None and out[0].error == "MalformedResponse: response body is not JSON (Expecting value)"


def test_retry_after_is_honoured():
    with StubServer(fail=lambda i, m: 429 if i == 0 else None, retry_after_s=1.5) as server:
        start = time.monotonic()
        out = run(make_engine(server, max_retries=1), [chat("wait for me")])
        assert time.monotonic() - start >= 1.5 and len(server.requests) == 2  # the backoff alone would be <= 0.5 s
    assert out[0].error is None


def test_a_client_error_is_not_retried():
    with StubServer(fail=lambda i, m: 400) as server:
        out = run(make_engine(server, max_retries=3), [chat("bad request")])
        assert len(server.requests) == 1
    assert out[0].error.startswith("BadRequestError:")


# ---------------------------------------------------------------- upstream down: fail fast (issue 12, item 13)


def test_a_refused_connection_fails_at_once_whatever_max_retries():
    with StubServer() as server:
        base_url = server.base_url  # nobody listens there once the server stopped
    engine = OpenAIEngine(OpenAIModel(engine="openai", model="m", base_url=base_url, api_key_env=None, max_retries=5))
    start = time.monotonic()
    out = run(engine, [chat("anyone?")])
    assert time.monotonic() - start < 2.0  # the client's own retries took ~14 s here
    assert out[0].error.startswith("APIConnectionError:")


def test_the_breaker_opens_after_connection_failures_then_a_probe_closes_it():
    with StubServer() as server:
        port = server.port
    engine = OpenAIEngine(OpenAIModel(engine="openai", model="stub-teacher", base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key_env=None, breaker_failures=2, breaker_open_s=1.0))

    async def scenario():
        try:
            down = [(await engine.agenerate([chat(str(i))], PARAMS))[0].error for i in range(4)]
            with StubServer(port=port) as server:  # the upstream is back, the circuit still open
                still_open = (await engine.agenerate([chat("early")], PARAMS))[0].error
                await asyncio.sleep(1.0)
                probe = (await engine.agenerate([chat("probe")], PARAMS))[0]
                after = await engine.agenerate([chat("a"), chat("b")], PARAMS)
                return down, still_open, probe, after, len(server.requests)
        finally:
            await engine.aclose()

    down, still_open, probe, after, requests = asyncio.run(scenario())
    assert [e.split(":")[0] for e in down] == ["APIConnectionError", "APIConnectionError", "CircuitOpen", "CircuitOpen"]
    assert still_open.startswith("CircuitOpen: the upstream could not be reached (2 connection failures in a row)")
    assert probe.error is None and all(c.error is None for c in after)
    assert requests == 3  # the probe and the two after it: an open circuit sends nothing
