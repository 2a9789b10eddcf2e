"""The served graph speaks the OpenAI API clients use: streaming (official client, sync and async, and raw
SSE), n, /v1/completions, refusals of fields it does not honour, auth before parsing, a client that goes
away mid-stream, time to first token, and Ray Data LLM's HTTP processor. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from urllib.parse import urlsplit

import openai
import pytest
import ray
from ray import serve

from conftest import question_of
from dnc_ray.config import ServeAppConfig
from dnc_ray.serve.app import build_app
from dnc_ray.testing.stub_server import StubServer
from test_serve import AUTH, TOKEN_ENV, call, prometheus, served

pytestmark = pytest.mark.timeout(180)

TINY = {"engine": "hf", "model": "tiny-random-smollm2", "max_tokens": 8, "batch_size": 4}
LONG = {"engine": "hf", "model": "tiny-random-smollm2", "max_tokens": 1500, "batch_size": 4}
HI = [{"role": "user", "content": "What is 2 + 3?"}]


def scripted(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    if "Question: " not in content:
        return "plain reply to a plain chat"
    return f"First the sub-questions.\nThe answer is: {len(question_of(content))}"


@pytest.fixture(scope="module")
def stub():
    with StubServer(reply=scripted) as server:
        yield server


@pytest.fixture(scope="module")
def apps(proxy, stub) -> dict[str, str]:  # noqa: F811 (the imported fixture)
    upstream = {"engine": "openai", "model": "stub-teacher", "base_url": stub.base_url, "api_key_env": None,
                "max_retries": 0}
    configs = {
        "local": {"decomposer": served(TINY), "solver": served(TINY)},
        "long": {"decomposer": served(TINY), "solver": served(LONG)},
        "remote": {"decomposer": served(TINY), "solver": served(upstream), "auth_token_env": TOKEN_ENV},
    }
    for name, cfg in configs.items():
        serve.run(build_app(ServeAppConfig.model_validate(cfg)), name=name, route_prefix=f"/{name}")
    return {name: f"{proxy}/{name}" for name in configs}


def client(url: str, **extra) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60, **extra)


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_each_model_streams_what_it_answers(apps):
    """Greedy, one request at a time: the streamed text is the non-streamed answer, usage included."""
    local = client(apps["local"])
    for model in ("decomposer", "solver", "pipeline"):
        whole = local.chat.completions.create(model=model, messages=HI)
        text, chunks = streamed(local.chat.completions.create(
            model=model, messages=HI, stream=True, stream_options={"include_usage": True}))
        assert text == whole.choices[0].message.content, model
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens > 0
        if model == "pipeline":  # the decomposition rides on the first chunk
            decomposition = chunks[0].choices[0].delta.model_extra["dnc_decomposition"]
            assert isinstance(decomposition["decomposition"], str) and isinstance(decomposition["subquestions"], list)


def test_upstream_stream_is_relayed(apps):
    remote = client(apps["remote"], default_headers=AUTH)
    text, chunks = streamed(remote.chat.completions.create(model="solver", messages=HI, stream=True))
    assert text == "plain reply to a plain chat"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 6  # word by word


def test_raw_sse_format(apps):
    status, body = call(f"{apps['local']}/v1/chat/completions",
                        {"model": "solver", "messages": HI, "stream": True})
    assert status == 200
    events = [line for line in body.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_concurrent_streams_from_a_local_model_are_batched(apps):
    async def one(i: int) -> str:
        stream = await local.chat.completions.create(
            model="solver", messages=[{"role": "user", "content": f"Count to {i}"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(8)))

    local = openai.AsyncOpenAI(base_url=f"{apps['local']}/v1", api_key="unused", max_retries=0, timeout=60)
    assert len(asyncio.run(all_of_them())) == 8

    def stream_batches() -> tuple[float, float]:
        samples = [s for s in prometheus("ray_serve_actual_batch_size")
                   if s.labels.get("application") == "local" and s.labels.get("deployment") == "Solver"
                   and "_stream_batch" in s.labels.get("function_name", "")]
        count = sum(s.value for s in samples if s.name.endswith("_count"))
        single = sum(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
        return count, single

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and stream_batches()[0] - stream_batches()[1] == 0:
        time.sleep(1)
    count, single = stream_batches()
    assert count - single > 0, "no streamed batch held more than one request"
    while time.monotonic() < deadline and not any(
            s.labels.get("model") == "solver" for s in prometheus("ray_dnc_time_to_first_token_s")):
        time.sleep(1)
    assert any(s.labels.get("model") == "solver" and s.name.endswith("_count") and s.value > 0
               for s in prometheus("ray_dnc_time_to_first_token_s"))


def test_n_choices(apps):
    local = client(apps["local"])
    reply = local.chat.completions.create(model="solver", messages=HI, n=2, temperature=1.0, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    _, chunks = streamed(local.chat.completions.create(model="solver", messages=HI, n=2, temperature=1.0, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]
    with pytest.raises(openai.BadRequestError, match="n > 1 needs temperature > 0"):
        local.chat.completions.create(model="solver", messages=HI, n=2, temperature=0)


def test_completions_route(apps):
    local = client(apps["local"])
    reply = local.completions.create(model="decomposer", prompt=["What is 2 + 3?", "Who wrote Hamlet?"])
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1]
    assert all(isinstance(c.text, str) for c in reply.choices) and reply.usage.completion_tokens > 0
    stream = local.completions.create(model="solver", prompt="What is 2 + 3?", stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == local.completions.create(
        model="solver", prompt="What is 2 + 3?").choices[0].text
    with pytest.raises(openai.NotFoundError):
        local.completions.create(model="pipeline", prompt="Hi")


@pytest.mark.parametrize(("extra", "field"), [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3, "logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_fields_not_honoured_are_refused(apps, extra, field):
    status, body = call(f"{apps['local']}/v1/chat/completions", {"model": "solver", "messages": HI, **extra})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"field `{field}` is not supported")


def test_unknown_fields_are_counted_not_repeated_and_neutral_values_pass(apps):
    url = f"{apps['local']}/v1/chat/completions"
    status, body = call(url, {"model": "solver", "messages": HI, "secret_field_x": 1, "another_one": 2})
    assert status == 400 and body["error"]["message"].startswith("the request has 2 unknown fields")
    assert "secret_field_x" not in json.dumps(body)
    status, body = call(url, {"model": "solver", "messages": HI, "logprobs": False, "top_p": 1, "user": "u1"})
    assert status == 200, body
    status, body = call(f"{apps['local']}/v1/solve", {"question": "Hi?", "strategy": "direct", "junk": "x" * 100})
    assert status == 400 and "x" * 20 not in json.dumps(body)


def test_auth_comes_before_parsing_and_covers_the_docs(apps):
    url = apps["remote"]
    assert call(f"{url}/v1/chat/completions", b"{not json")[0] == 401
    assert call(f"{url}/v1/solve", {"question": "x" * 100000})[0] == 401
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert call(f"{url}{path}")[0] == 401, path
    assert call(f"{url}/openapi.json", headers=AUTH)[0] == 200
    assert call(f"{url}/healthz") == (200, {"status": "ok"})


def test_solve_streams_its_events(apps, stub):
    question = "Tom has 3 apples and eats one. How many are left?"
    status, body = call(f"{apps['remote']}/v1/solve", {"question": question, "stream": True}, AUTH)
    assert status == 200
    events = []
    for block in body.strip().split("\n\n"):
        kind, data = block.split("\n", 1)
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    kinds = [k for k, _ in events]
    assert kinds[0] == "decomposition" and kinds[-1] == "answer" and "token" in kinds
    assert kinds.index("token") > max(i for i, k in enumerate(kinds) if k in ("decomposition", "subquestion"))
    answer = events[-1][1]
    assert "".join(d["text"] for k, d in events if k == "token") == answer["solution"]
    assert answer["answer"] == str(len(question)) and answer["usage"]["solve"]["model"] == "stub-teacher"
    subquestions = [d["text"] for k, d in events if k == "subquestion"]
    assert subquestions == answer["subquestions"] == events[0][1]["subquestions"]


def test_a_client_that_goes_away_stops_the_generation(apps):
    """The client reads one chunk of a 1500-token answer and closes: the replica stops that row early."""
    solver = serve.get_deployment_handle("Solver", "long")
    url = urlsplit(apps["long"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = json.dumps({"model": "solver", "messages": HI, "stream": True})
    connection.request("POST", f"{url.path}/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    connection.close()

    deadline = time.monotonic() + 60
    stats = solver.stats.remote().result()
    while (stats["generating"] or not stats["streamed_tokens"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = solver.stats.remote().result()
    assert stats["generating"] == 0
    assert 0 < stats["streamed_tokens"][0] < 1500, stats


def test_ray_data_llm_http_processor_reads_the_served_graph(apps):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    for name in ("long", "remote"):  # their replicas' CPUs go to the processor's tasks and actor
        serve.delete(name)

    processor = build_processor(
        HttpRequestProcessorConfig(url=f"{apps['local']}/v1/chat/completions", concurrency=1, batch_size=2),
        preprocess=lambda row: {"payload": {"model": "pipeline", "messages": [
            {"role": "user", "content": f"What is {row['id']} + 1?"}], "max_tokens": 4}},
        postprocess=lambda row: {"text": row["http_response"]["choices"][0]["message"]["content"],
                                 "tokens": row["http_response"]["usage"]["total_tokens"]},
    )
    rows = processor(ray.data.range(3)).take_all()
    assert len(rows) == 3 and all(isinstance(r["text"], str) and r["tokens"] > 0 for r in rows)
