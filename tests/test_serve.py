"""The served graph on local Ray, over real HTTP on 127.0.0.1: the API, batching, metrics, errors,
the official `openai` client, a generation run whose solver is the served graph, and the config files.

Two apps run for the whole module, behind one Serve proxy: `/tiny` (tiny random model as decomposer
and solver) and `/upstream` (tiny decomposer, a scripted OpenAI-compatible upstream as solver, auth on).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.schema import ServeDeploySchema

from conftest import ScriptedTeacher, question_of
from dnc_ray.config import GenerateConfig, ServeAppConfig, ServeConfig, load_config
from dnc_ray.infra.errors import ConfigError
from dnc_ray.serve.app import build_app
from dnc_ray.serve.schema import MODELS
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import TaskConfig, load_rows
from dnc_ray.testing.stub_server import StubServer

ROOT = Path(__file__).parent.parent
TOKEN_ENV, TOKEN = "DNC_TEST_SERVE_TOKEN", "test-token-7f3a"
# Set before the session's local Ray starts, so its workers (Serve replicas, Ray Data actors) inherit it.
os.environ[TOKEN_ENV] = TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}

ROWS = load_rows(TaskConfig(name="gsm8k", split="test", limit=4))
GOLD = {r["question"]: r["answers"][0][0] for r in ROWS}
TINY = {"engine": "hf", "model": "tiny-random-smollm2", "max_tokens": 8}
PRICE = {"input_per_1k": 1.0, "output_per_1k": 2.0}
TIMEOUT_S = 2.0  # request_timeout_s of the upstream app


def served(model: dict, **extra) -> dict:
    return {"model": model, "num_cpus": 0.25, "batch_wait_timeout_s": 0.2, **extra}


def upstream_reply(messages: list[dict]) -> str:
    question = question_of(messages[-1]["content"])
    return f"First the sub-questions.\nThe answer is: {GOLD.get(question, '7')}"


def upstream_fails(index: int, messages: list[dict]) -> int | None:
    return 500 if "PLEASE FAIL" in messages[-1]["content"] else None


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def tiny(proxy) -> str:
    cfg = ServeAppConfig.model_validate({"decomposer": served(TINY), "solver": served(TINY), "max_body_bytes": 4096})
    serve.run(build_app(cfg), name="tiny", route_prefix="/tiny")
    return f"{proxy}/tiny"


@pytest.fixture(scope="module")
def stub():
    with StubServer(reply=upstream_reply, fail=upstream_fails) as server:
        yield server


def stub_solver(stub: StubServer) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": stub.base_url, "api_key_env": None,
            "max_retries": 0, "request_timeout_s": 30, "price": PRICE}


@pytest.fixture(scope="module")
def upstream(proxy, stub) -> str:
    cfg = ServeAppConfig.model_validate({
        "decomposer": served(TINY), "solver": served(stub_solver(stub)),
        "request_timeout_s": TIMEOUT_S, "auth_token_env": TOKEN_ENV,
    })
    serve.run(build_app(cfg), name="upstream", route_prefix="/upstream")
    return f"{proxy}/upstream"


# ------------------------------------------------------------------------------ tiny models

@pytest.mark.timeout(120)
def test_solve_two_stage_and_direct(tiny):
    status, body = call(f"{tiny}/v1/solve", {"question": "Tom has 3 apples and eats one. How many are left?"})
    assert status == 200, body
    assert body["strategy"] == "two_stage" and set(body["usage"]) == {"decompose", "solve"}
    assert isinstance(body["decomposition"], str) and isinstance(body["subquestions"], list)
    assert isinstance(body["solution"], str) and isinstance(body["answer"], str)
    for usage in body["usage"].values():
        assert usage["model"] == "tiny-random-smollm2"
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8 and usage["latency_s"] > 0
    assert body["latency_s"] >= sum(u["latency_s"] for u in body["usage"].values())

    status, body = call(f"{tiny}/v1/solve", {"question": "Who wrote Hamlet?", "strategy": "direct", "task": "bamboogle"})
    assert status == 200, body
    assert set(body["usage"]) == {"solve"} and body["subquestions"] is None and body["decomposition"] is None


@pytest.mark.timeout(120)
def test_chat_completions_for_every_model_models_and_health(tiny):
    for model in MODELS:
        chat = {"model": model, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4}
        status, body = call(f"{tiny}/v1/chat/completions", chat)
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["model"] == model and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    status, body = call(f"{tiny}/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == list(MODELS)
    assert body["data"][2]["root"] == "tiny-random-smollm2+tiny-random-smollm2"
    assert call(f"{tiny}/healthz") == (200, {"status": "ok"})


@pytest.mark.timeout(120)
def test_official_openai_client(tiny):
    client = openai.OpenAI(base_url=f"{tiny}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="solver", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert isinstance(reply.choices[0].message.content, str) and 0 < reply.usage.completion_tokens <= 4
    assert [m.id for m in client.models.list()] == list(MODELS)
    with pytest.raises(openai.NotFoundError, match="the model does not exist on this route"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.timeout(120)
def test_bad_requests_get_4xx_with_a_message(tiny):
    url = f"{tiny}/v1/solve"
    status, body = call(url, b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    status, body = call(url, {"context": "no question here"})
    assert status == 422 and body["error"]["message"] == "invalid request: question: Field required"
    status, body = call(url, {"question": "?", "strategy": "self-ask-twice"})
    assert status == 422 and "strategy" in body["error"]["message"]
    status, body = call(url, {"question": "x" * 5000})
    assert status == 413 and body["error"] == {"message": "request body over max_body_bytes (4096)",
                                               "type": "request_too_large", "param": None, "code": None}
    status, body = call(f"{tiny}/v1/chat/completions", {"model": "gpt-5", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 404 and body["error"]["type"] == "not_found_error" and "gpt-5" not in body["error"]["message"]
    status, body = call(f"{tiny}/v1/chat/completions", {"model": "solver", "messages": []})
    assert status == 422 and "messages" in body["error"]["message"]
    status, body = call(f"{tiny}/v1/chat/completions", {"model": "pipeline", "messages": [{"role": "system", "content": "x"}]})
    assert status == 422 and "last user message" in body["error"]["message"]


def prometheus(name: str) -> list:
    """The samples of one metric family from the local node's metrics endpoint."""
    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) if family.name == name for s in family.samples]


@pytest.mark.timeout(120)
def test_concurrent_requests_are_batched_and_metrics_exported(tiny):
    def solve(i: int) -> int:
        return call(f"{tiny}/v1/solve", {"question": f"What is {i} + {i}?", "strategy": "direct"})[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(solve, range(8))) == [200] * 8

    def solver_batches() -> tuple[float, float]:
        """(batches, batches of size 1) formed by the tiny app's Solver."""
        samples = [s for s in prometheus("ray_serve_actual_batch_size")
                   if s.labels.get("application") == "tiny" and s.labels.get("deployment") == "Solver"]
        count = sum(s.value for s in samples if s.name.endswith("_count"))
        single = sum(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
        return count, single

    deadline = time.monotonic() + 60  # metrics reach the endpoint within a few seconds
    while time.monotonic() < deadline and solver_batches()[0] - solver_batches()[1] == 0:
        time.sleep(1)
    count, single = solver_batches()
    assert count - single > 0, "no batch held more than one request"
    calls = {(s.labels["stage"], s.labels["outcome"]) for s in prometheus("ray_dnc_stage_requests")
             if s.labels.get("application") == "tiny"}
    assert ("solve", "ok") in calls
    assert any(s.labels.get("stage") == "solve" for s in prometheus("ray_dnc_stage_latency_s"))


def session_logs() -> list[Path]:
    """Every log file of this Ray session (Serve's, the replicas', the workers')."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p for p in logs.rglob("*") if p.is_file()]


@pytest.mark.timeout(60)
def test_no_prompt_text_in_serve_logs(tiny):
    """The question never reaches a log file. Read once the logs of every replica the request went through
    (ingress, decomposer, solver) name its request id: the files the check reads hold this request's lines."""
    marker, request_id = "Zanzibar-question-3141", f"log-check-{uuid.uuid4().hex}"
    status, _ = call(f"{tiny}/v1/solve", {"question": f"How far is {marker}?"}, {"x-request-id": request_id})
    assert status == 200

    def replicas_logging_the_request() -> set[str]:
        return {p.name.split("_")[2] for p in session_logs() if p.name.startswith("replica_tiny_")
                and request_id in p.read_text(errors="ignore")}

    deadline = time.monotonic() + 30
    while replicas_logging_the_request() != {"Ingress", "Decomposer", "Solver"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replicas_logging_the_request() == {"Ingress", "Decomposer", "Solver"}  # the positive control
    assert not [p for p in session_logs() if marker in p.read_text(errors="ignore")]


# ------------------------------------------------------------------------------ scripted upstream solver

@pytest.mark.timeout(120)
def test_upstream_answer_and_cost(upstream, stub):
    question = ROWS[0]["question"]
    status, body = call(f"{upstream}/v1/solve", {"question": question}, AUTH)
    assert status == 200, body
    assert body["answer"] == GOLD[question]
    solve = body["usage"]["solve"]
    assert solve["model"] == "stub-teacher"
    assert solve["completion_tokens"] == len(upstream_reply(stub.requests[-1]).split())
    assert solve["cost_usd"] == pytest.approx((solve["prompt_tokens"] * 1.0 + solve["completion_tokens"] * 2.0) / 1000)
    assert body["usage"]["decompose"]["cost_usd"] == 0.0
    assert body["cost_usd"] == pytest.approx(solve["cost_usd"])


@pytest.mark.timeout(60)
def test_failing_upstream_is_502(upstream):
    status, body = call(f"{upstream}/v1/solve", {"question": "PLEASE FAIL", "strategy": "direct"}, AUTH)
    assert status == 502
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["message"] == "direct: the model failed: InternalServerError"  # the upstream's text stays out


@pytest.mark.timeout(60)
def test_hanging_upstream_is_504_after_the_timeout(upstream, stub):
    stub.latency_s = 30
    try:
        started = time.monotonic()
        status, body = call(f"{upstream}/v1/solve", {"question": "Slow?", "strategy": "direct"}, AUTH, timeout=20)
        elapsed = time.monotonic() - started
    finally:
        stub.latency_s = 0
    assert status == 504 and body["error"]["message"] == "solve: no answer within request_timeout_s (2 s)"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5

    def cancelled_in_solver() -> bool:
        solver_logs = [p for p in session_logs() if p.name.startswith("replica_upstream_Solver_")]
        return any("CALL complete CANCELLED" in p.read_text() for p in solver_logs)

    deadline = time.monotonic() + 10
    while not cancelled_in_solver() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled_in_solver(), "the timed-out call still holds the Solver replica"
    assert call(f"{upstream}/v1/solve", {"question": "Fast again?", "strategy": "direct"}, AUTH)[0] == 200


@pytest.mark.timeout(60)
def test_bearer_token_required_when_auth_is_on(upstream):
    url, question = f"{upstream}/v1/solve", {"question": "Who?", "strategy": "direct"}
    status, body = call(url, question)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert body["error"]["message"] == "missing or wrong bearer token"
    assert call(url, question, {"Authorization": "Bearer wrong"})[0] == 401
    assert call(f"{upstream}/v1/models", headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert call(url, question, AUTH)[0] == 200
    assert call(f"{upstream}/healthz") == (200, {"status": "ok"})  # probes need no token


@pytest.mark.timeout(180)
def test_generation_run_uses_the_served_graph(upstream, tmp_path):
    """Ray Data -> HTTP -> Serve: the project's `openai` engine points at the served pipeline."""
    solver = {"engine": "openai", "model": "pipeline", "base_url": f"{upstream}/v1", "api_key_env": TOKEN_ENV,
              "max_retries": 0, "batch_size": 4}
    cfg = GenerateConfig.model_validate({"task": {"name": "gsm8k", "split": "test", "limit": 4}, "strategy": "direct",
                                         "solver": solver, "output": str(tmp_path / "run")})
    attempt = run_generate(cfg)
    assert attempt["rows"] == 4 and attempt["errors"] == 0
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert all(r["correct"] and r["solver"] == "pipeline" for r in rows)
    assert all(r["usage"]["solve"]["prompt_tokens"] > 0 and r["usage"]["solve"]["completion_tokens"] > 0 for r in rows)


@pytest.mark.timeout(300)
def test_smollm2_decomposer_with_upstream_solver(proxy, stub):
    """The paper's set-up on a real model: a small local decomposer, a big (here scripted) solver."""
    smollm2 = {"engine": "hf", "model": "smollm2-135m-instruct", "max_tokens": 32}
    cfg = ServeAppConfig.model_validate({"decomposer": served(smollm2), "solver": served(stub_solver(stub))})
    serve.run(build_app(cfg), name="smollm2", route_prefix="/smollm2")
    try:
        question = ROWS[1]["question"]
        status, body = call(f"{proxy}/smollm2/v1/solve", {"question": question}, timeout=120)
    finally:
        serve.delete("smollm2")
    assert status == 200, body
    assert body["answer"] == GOLD[question]
    decompose = body["usage"]["decompose"]
    assert decompose["model"] == "smollm2-135m-instruct" and 0 < decompose["completion_tokens"] <= 32
    assert body["decomposition"].strip()


# ------------------------------------------------------------------------------ config files

def test_serve_config_file_matches_ray_serve_schema():
    text = (ROOT / "cluster" / "serve_config.yaml").read_text()
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    module, attribute = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attribute) is build_app
    build_app(ServeAppConfig.model_validate(app.args))  # builds the graph; starts nothing


def test_dnc_serve_config_validates():
    cfg = load_config(ROOT / "jobs" / "configs" / "serve.yaml", ServeConfig)
    assert cfg.host == "127.0.0.1" and cfg.decomposer.num_cpus + cfg.solver.num_cpus + cfg.ingress.num_cpus <= 2


@pytest.mark.slow  # a subprocess `dnc`: seconds of imports
def test_bad_serve_config_is_one_clear_error(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("decomposer:\n  model: {engine: hf}\n  replicas: 2\n  autoscaling: {max_replicas: 4}\n"
                   "solver:\n  model: {engine: reference}\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad, ServeConfig)
    message = str(error.value)
    assert "line 1, field `decomposer`: Value error, set either `replicas` or `autoscaling`, not both" in message
    assert "field `solver.model`" in message  # the reference engine cannot be served

    result = subprocess.run([sys.executable, "-m", "dnc_ray.cli", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("dnc serve: error: ")


# ------------------------------------------------------------------------------ one method, two runtimes

@pytest.mark.timeout(300)
def test_ray_data_and_serve_run_the_same_method(proxy, tmp_path):
    """The same questions, the same scripted teacher: a Ray Data run and /v1/solve give identical
    sub-questions, solution and prediction for two_stage and self_ask."""
    follow_ups = {r["question"]: i % 3 for i, r in enumerate(ROWS)}
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD), follow_ups=follow_ups.get)) as teacher:
        model = {"engine": "openai", "model": "stub-teacher", "base_url": teacher.base_url, "api_key_env": None,
                 "max_retries": 0, "batch_size": 4, "price": PRICE}
        serve.run(build_app(ServeAppConfig.model_validate({"decomposer": served(model), "solver": served(model)})),
                  name="same", route_prefix="/same")
        try:
            for strategy in ("two_stage", "self_ask"):
                cfg = GenerateConfig.model_validate({
                    "task": {"name": "gsm8k", "split": "test", "limit": 4}, "strategy": strategy,
                    "decomposer": model, "solver": model, "output": str(tmp_path / strategy)})
                assert run_generate(cfg)["errors"] == 0
                for row in RunStore(str(tmp_path / strategy)).read_rows():
                    status, body = call(f"{proxy}/same/v1/solve", {"question": row["question"], "task": "gsm8k",
                                                                   "strategy": strategy})
                    assert status == 200, body
                    assert (body["subquestions"], body["solution"], body["answer"]) == (
                        row["subquestions"], row["solution"], row["prediction"])
                    for stage, used in body["usage"].items():
                        expected = row["usage"][stage]
                        assert (used["prompt_tokens"], used["completion_tokens"], used["calls"]) == (
                            expected["prompt_tokens"], expected["completion_tokens"], expected["calls"])
                        assert used["cost_usd"] == pytest.approx(expected["cost_usd"])
                    if strategy == "self_ask":
                        assert len(body["subquestions"]) == follow_ups[row["question"]]
        finally:
            serve.delete("same")
