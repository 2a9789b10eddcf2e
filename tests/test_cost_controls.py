"""Teacher cost controls (issue 15): shared rate limits, Retry-After pausing a stage, budget_usd, the Batch API.

Against the stand-in server on 127.0.0.1 (its per-minute limits, its files and batches API). The Ray Data
runs use the session's local Ray; the batch runs need no Ray (the driver drives the rounds)."""

from __future__ import annotations

import asyncio
import json
import pickle
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import ray
import yaml

from conftest import ScriptedTeacher, question_of
from dnc_ray.cli import main as dnc
from dnc_ray.config import GenerateConfig, PipelineConfig, ServeConfig
from dnc_ray.llm.batch_api import split_requests
from dnc_ray.llm.budget import BudgetedModel, Ledger, LocalLedger
from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.engine import Completion, SamplingParams
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.llm.rate_limit import Bucket, rate_tokens
from dnc_ray.method.prompts import DECOMPOSE_INSTRUCTION
from dnc_ray.stages.cost_controls import run_spend, within_budget
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import TaskConfig, load_rows
from dnc_ray.testing.stub_server import StubServer

pytestmark = pytest.mark.timeout(300)

ROWS = load_rows(TaskConfig(name="gsm8k", split="test", limit=16))
GOLD = {r["question"]: r["answers"][0][0] for r in ROWS}
RIGHT = {r["question"] for i, r in enumerate(ROWS) if i % 2 == 0}
PRICE = {"input_per_1k": 0.01, "output_per_1k": 0.02}


def teacher(server: StubServer, **extra) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": server.base_url, "api_key_env": None,
            "price": PRICE, **extra}


def batch_teacher(server: StubServer, **batch_api) -> dict:
    return teacher(server, mode="batch", batch_api={"poll_s": 0.05, **batch_api})


def config(out: Path, limit: int = 16, **fields) -> GenerateConfig:
    base = {"task": {"name": "gsm8k", "split": "test", "limit": limit}, "output": str(out), "progress_interval_s": 1}
    return GenerateConfig.model_validate({**base, **fields})


def dump(cfg: GenerateConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- the arithmetic


def test_bucket_paces_requests_and_tokens_and_a_pause_empties_it():
    b = Bucket(requests_per_minute=600, tokens_per_minute=6000, burst_s=0.5, now=0.0)  # 10/s, 100 tokens/s
    assert b.capacity == [5.0, 50.0]
    for _ in range(5):  # the burst
        assert b.wait_s(1, 0.0) == 0
        b.take(1, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(0.1)  # then one every 1/10 s
    assert b.wait_s(1, 0.1) == 0
    b.take(1, 0.1)
    # a request larger than the token bucket (50) waits for a full bucket, then leaves it in debt
    assert b.wait_s(500, 0.1) == pytest.approx(0.1)  # the request bucket is the later one (tokens: 49 -> 50 in 0.01 s)
    assert b.wait_s(500, 0.2) == 0
    b.take(500, 0.2)
    assert b.level[1] == pytest.approx(-450) and b.wait_s(1, 0.2) == pytest.approx(4.51)
    b.pause(2.0, 10.0)
    assert b.wait_s(1, 10.0) == pytest.approx(2.0) and b.level == [0.0, 0.0] and b.wait_s(1, 12.1) == 0
    unlimited = Bucket(None, None)
    assert not unlimited.limited and unlimited.wait_s(10**6, 0.0) == 0


def test_rate_tokens_count_the_prompt_estimate_and_max_tokens():
    chat = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 9}]
    assert rate_tokens(chat, 100) == (10 + 4) + (3 + 4) + 100


def test_split_requests_within_count_and_bytes():
    lines = [b"x" * 10] * 7
    assert split_requests(lines, max_requests=3, max_bytes=10**6) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_requests(lines, max_requests=100, max_bytes=25) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_requests([b"x" * 50, b"y"], max_requests=100, max_bytes=25) == [[0], [1]]  # an oversized line alone


def test_ledger_refuses_past_the_budget_and_stays_stopped():
    ledger = Ledger(budget_usd=1.0, spent_before_usd=0.25)
    assert ledger.reserve(0.5)  # 0.25 + 0.5 <= 1
    assert not ledger.reserve(0.5)  # 0.25 + 0.5 in flight + 0.5 > 1
    ledger.settle(0.5, 0.1)
    assert not ledger.reserve(0.01)  # stopped: the run winds down
    s = ledger.summary()
    assert (s["spent_usd"], s["total_usd"], s["requests_started"], s["requests_refused"], s["stopped"]) == (0.1, 0.35, 1, 2, True)


def test_a_budgeted_model_reserves_the_worst_case_and_fails_the_step_as_unfinished():
    class Model:
        name, params = "m", SamplingParams(max_tokens=100)
        calls = 0

        def cost(self, prompt_tokens, completion_tokens):
            return prompt_tokens * 0.001 + completion_tokens * 0.002

        async def complete(self, chat, stop=(), json_schema=None):
            self.calls += 1
            return Completion(text="ok", prompt_tokens=5, completion_tokens=50)  # 0.105

    model, chat = Model(), [{"role": "user", "content": "z" * 30}]  # worst: (10 + 4) * 0.001 + 100 * 0.002 = 0.214
    ledger = Ledger(budget_usd=0.3)
    budgeted = BudgetedModel(model, LocalLedger(ledger), in_flight=2)
    assert asyncio.run(budgeted.complete(chat)).text == "ok" and ledger.spent == pytest.approx(0.105)
    refused = asyncio.run(budgeted.complete(chat))  # 0.105 spent + 0.214 worst > 0.3
    assert refused.text is None and refused.error.startswith("unfinished (budget_usd 0.3 reached") and model.calls == 1
    assert ledger.reserved == 0 and ledger.summary()["requests_refused"] == 1


def test_config_checks_of_the_cost_controls(tmp_path):
    m = {"engine": "openai", "model": "t", "base_url": "http://127.0.0.1:1/v1", "api_key_env": None}
    with pytest.raises(ValueError, match="a batch-mode model has none"):
        OpenAIModel.model_validate({**m, "mode": "batch", "requests_per_minute": 10})
    with pytest.raises(ValueError, match="give them the same requests_per_minute"):
        config(tmp_path, strategy="two_stage", decomposer={**m, "requests_per_minute": 10},
               solver={**m, "requests_per_minute": 20})
    config(tmp_path, strategy="two_stage", decomposer={**m, "requests_per_minute": 10}, solver=m)  # one states it: fine
    with pytest.raises(ValueError, match=r"cannot hold a local \(hf, vllm\) model"):
        config(tmp_path, strategy="two_stage", decomposer={"engine": "hf"}, solver={**m, "mode": "batch"})
    with pytest.raises(ValueError, match="answers online"):
        ServeConfig.model_validate({"decomposer": {"model": {**m, "mode": "batch"}}, "solver": {"model": m}})
    pipeline = {"output": str(tmp_path), "train_task": {"name": "gsm8k", "split": "train"},
                "eval_task": {"name": "gsm8k"}, "teacher_decomposer": {**m, "mode": "batch"}, "teacher_solver": m}
    PipelineConfig.model_validate(pipeline)
    with pytest.raises(ValueError, match="teacher_solver in mode batch"):
        PipelineConfig.model_validate({**pipeline, "teacher_solver": {**m, "mode": "batch"}})
    assert OpenAIModel.model_validate(m).batch_api.max_requests == 50_000


# ---------------------------------------------------------------- the stand-in's limits, one engine


def test_the_stand_in_refuses_past_its_limit_with_retry_after_and_the_engine_paces_itself():
    """Without a limiter an engine runs into the stand-in's limit (429 + retry-after); with one it never does."""
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(40)]
    with StubServer(requests_per_minute=1200, rate_window_s=1) as server:  # 20/s, 20 at once
        cfg = OpenAIModel.model_validate({**teacher(server), "max_retries": 0, "max_tokens": 8})
        loose = asyncio.run(OpenAIEngine(cfg).agenerate(chats, SamplingParams(max_tokens=8)))
        refused = [c for c in loose if c.error]
        assert refused and all("RateLimitError" in c.error for c in refused)
        assert server.rate.refused == len(refused)
    with StubServer(requests_per_minute=1200, rate_window_s=1) as server:
        limited = OpenAIModel.model_validate({**teacher(server), "max_retries": 0, "requests_per_minute": 1200})
        started = time.monotonic()
        done = asyncio.run(OpenAIEngine(limited).agenerate(chats, SamplingParams(max_tokens=8)))
        elapsed = time.monotonic() - started
        assert all(c.error is None for c in done) and server.rate.refused == 0
        assert elapsed >= (40 - 5) / 20 * 0.9  # the burst (0.25 s' worth), then 20 a second


def test_the_stand_in_counts_tokens_per_minute():
    with StubServer(tokens_per_minute=600, rate_window_s=1) as server:  # 10 tokens a second, 10 at once
        client = __import__("openai").OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        chat = [{"role": "user", "content": "abcd"}]  # 1 + 4 prompt tokens + max_tokens 4 = 9
        client.chat.completions.create(model="m", messages=chat, max_tokens=4)
        with pytest.raises(__import__("openai").RateLimitError) as refused:
            client.chat.completions.create(model="m", messages=chat, max_tokens=4)
        headers = refused.value.response.headers
        assert headers["x-ratelimit-limit-tokens"] == "600" and 0 < int(headers["retry-after-ms"]) <= 1000
        assert [accepted for _, accepted, _ in server.rate.arrivals] == [True, False]


# ---------------------------------------------------------------- shared across Ray actors


def test_a_429_pauses_every_engine_of_the_stage_even_without_limits(ray_local):
    """Two engines (as in two Ray Data actors) share one LimiterActor; no limits configured. Engine A's request
    gets a 429 with retry-after 1.5 s: B, sending at once, learns of the pause within SYNC_S and waits too."""
    from dnc_ray.llm.rate_limit import shared_limiter

    trips = []

    def fail(index, messages):  # the first "trip" only: its retry goes through
        if messages[-1]["content"] == "trip" and not trips:
            trips.append(index)
            return 429
        return None

    with StubServer(fail=fail, retry_after_s=1.5) as server:
        cfg = OpenAIModel.model_validate({**teacher(server), "max_retries": 1})
        shared = shared_limiter(None, None)
        ray.get(shared.actor.paused_for.remote())  # started: its start-up is not what is measured
        a, b = OpenAIEngine(cfg), OpenAIEngine(cfg)
        a.limiter, b.limiter = pickle.loads(pickle.dumps(shared)), pickle.loads(pickle.dumps(shared))
        params = SamplingParams(max_tokens=8)
        times: list[float] = []

        async def steady_sender():
            for i in range(30):
                [c] = await b.agenerate([[{"role": "user", "content": f"b{i}"}]], params)
                assert c.error is None
                times.append(time.monotonic())
                await asyncio.sleep(0.05)

        async def scenario():
            sender = asyncio.create_task(steady_sender())
            await asyncio.sleep(0.3)
            [c] = await a.agenerate([[{"role": "user", "content": "trip"}]], params)  # 429, 1.5 s, then retried
            await sender
            return c

        assert asyncio.run(scenario()).error is None  # the retry, after the pause, went through
        tripped = server.rate.arrivals[trips[0]][0]  # when the 429'd request reached the server
        gaps = [(t0, t1) for t0, t1 in pairwise(times) if t1 > tripped and t1 - t0 > 0.8]
        assert len(gaps) == 1, [round(t - tripped, 2) for t in times]
        [(gap_start, gap_end)] = gaps
        assert gap_start <= tripped + 0.5 + 0.3 and gap_end >= tripped + 1.5 - 0.1  # it learnt within SYNC_S


def test_the_decomposer_and_the_solver_on_one_endpoint_share_one_limiter(ray_local, tmp_path):
    from dnc_ray.stages import cost_controls

    m = {"engine": "openai", "model": "t", "base_url": "http://127.0.0.1:1/v1", "api_key_env": None}
    same = config(tmp_path, strategy="two_stage", decomposer={**m, "requests_per_minute": 60}, solver={**m, "base_url": m["base_url"] + "/"})
    controls = cost_controls.start(same, 0.0)
    try:
        assert controls.limiters["decomposer"] is controls.limiters["solver"] and controls.limiters["solver"].limited
        copies = pickle.loads(pickle.dumps(controls))  # as each MethodStage actor gets them
        assert copies.limiters["decomposer"] is copies.limiters["solver"]
    finally:
        cost_controls.stop(controls)
    other = config(tmp_path, strategy="two_stage", decomposer=m, solver={**m, "model": "u"})
    controls = cost_controls.start(other, 0.0)
    try:
        assert controls.limiters["decomposer"] is not controls.limiters["solver"]
        assert not controls.limiters["decomposer"].limited  # no limits: it carries the 429 pauses only
    finally:
        cost_controls.stop(controls)


def test_shared_limit_held_across_actors_and_a_retry_after_pauses_the_whole_stage(ray_local, tmp_path):
    """2 actors x 64 requests in flight against a stand-in allowing 600 requests/min (2 s' worth at once):
    with the shared limiter no request is refused for the limit; the one 429 injected (retry-after 4 s)
    stops every actor's requests for that long."""
    latency, injected_at, retry_after = 0.05, 20, 4.0
    fail = lambda index, messages: 429 if index == injected_at else None  # noqa: E731
    with StubServer(requests_per_minute=600, rate_window_s=2, latency_s=latency,
                    fail=fail, retry_after_s=retry_after) as server:
        model = teacher(server, requests_per_minute=600, actors=2, batch_size=4, max_retries=2)
        attempt = run_generate(config(tmp_path / "run", limit=48, strategy="direct", solver=model))
        assert attempt["errors"] == 0 and attempt["rows"] == 48
        assert server.rate.refused == 0, "the limit was passed"
        accepted = [t for t, ok, _ in server.rate.arrivals if ok]
        assert len(accepted) == 49  # every row once, and the retry of the injected 429
        t429 = accepted[injected_at] + latency  # when the 429 left the server
        # Requests the limiter granted before the pause still land after the 429: on this loaded machine up to
        # ~1 s later (grant -> Ray reply -> HTTP). Then nothing, from any actor, until the pause is over.
        gaps = [(t0 - t429, t1 - t429) for t0, t1 in pairwise(accepted) if t1 > t429]
        gap = max(gaps, key=lambda g: g[1] - g[0])
        assert gap[0] <= 1.5 and gap[1] >= retry_after - 0.1 and gap[1] - gap[0] >= retry_after - 1.5, gaps
        [limiter] = run_json(tmp_path / "run")["attempts"][-1]["rate_limits"].values()
        assert limiter["granted"] == 49 and limiter["pauses"] == 1 and limiter["paused_s"] == pytest.approx(retry_after)
        # the achieved rate outside the pause: loosely bounded on this loaded machine (the benchmark measures it)
        rate = 48 / (accepted[-1] - accepted[0] - retry_after)
        assert rate >= 4, rate


# ---------------------------------------------------------------- budget_usd


def test_a_budget_stops_the_run_and_a_raised_budget_finishes_it_without_redoing_rows(ray_local, tmp_path, capsys):
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), latency_s=0.05) as server:
        model = teacher(server, actors=2, max_in_flight=2, batch_size=4, max_tokens=16)
        cfg = config(tmp_path / "run", strategy="two_stage", decomposer=model, solver=model, budget_usd=0.03)
        assert dnc(["generate", "--config", str(dump(cfg, tmp_path / "cfg.yaml"))]) == 4
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"dnc generate: budget reached: {tmp_path / 'run'}: budget_usd 0.03 reached: the run has spent $")
        rows = RunStore(str(tmp_path / "run")).read_rows()
        done = [r for r in rows if r["error"] is None]
        stopped = [r for r in rows if r["error"] is not None]
        assert 0 < len(done) < 16 and all("unfinished (budget_usd 0.03 reached" in r["error"] for r in stopped)
        assert run_spend(rows) <= 0.03
        first = run_json(tmp_path / "run")["attempts"][-1]
        assert first["budget"]["stopped"] and first["run_spent_usd"] == pytest.approx(run_spend(rows), abs=1e-6)
        requests_first = len(server.requests)

        raised = cfg.model_copy(update={"budget_usd": 1.0})
        assert dnc(["generate", "--config", str(dump(raised, tmp_path / "raised.yaml"))]) == 0
        rows = RunStore(str(tmp_path / "run")).read_rows()
        assert len(rows) == 16 and all(r["error"] is None for r in rows)
        # every decomposition and every solve was asked for exactly once over the two runs
        assert len(server.requests) == 32 > requests_first
        asked = [m[-1]["content"] for m in server.requests]
        assert len(set(asked)) == 32
        second = run_json(tmp_path / "run")["attempts"][-1]
        assert not second["budget"]["stopped"] and second["run_spent_usd"] == pytest.approx(run_spend(rows), abs=1e-6)


def test_a_pipeline_budget_is_what_its_other_runs_have_not_spent(tmp_path):
    from dnc_ray.method.row import new_row, to_table

    def run_with_cost(out: Path, cost: float) -> None:
        row = new_row({"id": "q", "task": "gsm8k", "split": "test", "question": "?", "context": None, "answers": [["1"]]})
        row["usage"]["decompose"] = {"prompt_tokens": 1, "completion_tokens": 1, "latency_s": 0.0, "cost_usd": cost, "calls": 1}
        RunStore(str(out)).write_rows(to_table([row]))

    run_with_cost(tmp_path / "teacher", 0.30)
    run_with_cost(tmp_path / "eval" / "direct", 0.05)
    solver = {"engine": "openai", "model": "t", "base_url": "http://127.0.0.1:1/v1", "api_key_env": None}
    gen = config(tmp_path / "eval" / "direct", strategy="direct", solver=solver)
    outputs = [str(tmp_path / "teacher"), str(tmp_path / "eval" / "direct"), str(tmp_path / "eval" / "student")]
    assert within_budget(gen, 1.0, outputs).budget_usd == pytest.approx(0.70)  # its own rows count in the run itself
    assert within_budget(gen, None, outputs).budget_usd is None


# ---------------------------------------------------------------- the Batch API


def test_a_batch_run_end_to_end_split_within_limits_at_the_batch_price(tmp_path):
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), batch_delay_s=0.2, batch_max_requests=6) as server:
        model = batch_teacher(server, max_requests=6)
        attempt = run_generate(config(tmp_path / "run", strategy="two_stage", decomposer=model, solver=model))
        assert server.requests == []  # no online request
    assert attempt["rows"] == 16 and attempt["errors"] == 0
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert sum(r["correct"] for r in rows) == 8 and all(len(r["subquestions"]) == 2 for r in rows)
    for r in rows:  # half the online price, from the usage the batch lines reported
        for stage in ("decompose", "solve"):
            u = r["usage"][stage]
            assert u["calls"] == 1 and u["cost_usd"] == pytest.approx((u["prompt_tokens"] * 0.005 + u["completion_tokens"] * 0.01) / 1000)
    batches = run_json(tmp_path / "run")["batches"]
    assert [(b["round"], b["part"], b["requests"]) for b in batches] == [(1, 1, 6), (1, 2, 6), (1, 3, 4), (2, 1, 6), (2, 2, 6), (2, 3, 4)]
    assert {b["batch_id"] for b in batches} == set(server.batch_api.batches) and all(b["status"] == "completed" for b in batches)
    custom_ids = [cid for _, cid in server.batch_api.lines]
    assert len(custom_ids) == 32 and len(set(custom_ids)) == 32
    assert sorted(cid.rsplit("#", 1)[0] for cid in custom_ids) == sorted(f"{r['id']}#{r['sample']}" for r in rows for _ in "ds")


def test_self_ask_in_batch_mode_one_turn_per_round(tmp_path):
    """Rows needing 0, 1 or 2 follow-ups share rounds: a decomposer turn, then the answers to the follow-ups, ..."""
    follow_ups = {r["question"]: i % 3 for i, r in enumerate(ROWS[:6])}
    scripted = ScriptedTeacher(GOLD, RIGHT, follow_ups=lambda question: follow_ups[question.removeprefix("Question: ")])
    with StubServer(reply=scripted) as server:
        model = batch_teacher(server)
        run_generate(config(tmp_path / "run", limit=6, strategy="self_ask", decomposer=model, solver=model))
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert all(r["error"] is None for r in rows)
    assert sorted(len(r["subquestions"]) for r in rows) == [0, 0, 1, 1, 2, 2]
    rounds = [b["round"] for b in run_json(tmp_path / "run")["batches"]]
    assert rounds == [1, 2, 3, 4, 5]  # 2 follow-ups: turn, answer, turn, answer, final turn
    assert len(server.batch_api.lines) == sum(2 * len(r["subquestions"]) + 1 for r in rows)


def test_failed_batch_lines_become_row_errors_and_a_rerun_retries_only_them(tmp_path):
    broken = {ROWS[1]["question"], ROWS[4]["question"]}
    failing = {"on": True}

    def fail_line(custom_id, messages):
        content = messages[-1]["content"]
        return 500 if failing["on"] and content.startswith(DECOMPOSE_INSTRUCTION[:40]) and question_of(content) in broken else None

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), fail_line=fail_line) as server:
        model = batch_teacher(server)
        cfg = config(tmp_path / "run", limit=8, strategy="two_stage", decomposer=model, solver=model)
        first = run_generate(cfg)
        rows = RunStore(str(tmp_path / "run")).read_rows()
        failed = [r for r in rows if r["error"]]
        assert first["errors"] == 2 and {r["question"] for r in failed} == broken
        assert all(r["error"].startswith("decompose: BatchLineFailed: status 500: stub failure 500") for r in failed)
        assert [b["lines"] for b in run_json(tmp_path / "run")["batches"]] == [{"ok": 6, "failed": 2}, {"ok": 6, "failed": 0}]
        failing["on"] = False
        lines_before = len(server.batch_api.lines)
        second = run_generate(cfg)
        assert second["rows"] == 2 and second["errors"] == 0
        assert len(server.batch_api.lines) - lines_before == 4  # their decompositions and solves only
    assert all(r["error"] is None for r in RunStore(str(tmp_path / "run")).read_rows())


def test_a_batch_budget_stops_and_a_raised_one_resumes_without_paying_twice(tmp_path, capsys):
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT)) as server:
        model = batch_teacher(server, price=PRICE)  # the batch price given outright
        cfg = config(tmp_path / "run", limit=8, strategy="two_stage", decomposer={**model, "max_tokens": 32},
                     solver={**model, "max_tokens": 32}, budget_usd=0.01)
        assert dnc(["generate", "--config", str(dump(cfg, tmp_path / "cfg.yaml"))]) == 4
        rows = RunStore(str(tmp_path / "run")).read_rows()
        assert run_spend(rows) <= 0.01 and any("unfinished (budget_usd" in (r["error"] or "") for r in rows)
        lines = len(server.batch_api.lines)
        assert dnc(["generate", "--config", str(dump(cfg.model_copy(update={"budget_usd": 1.0}), tmp_path / "b.yaml"))]) == 0
        assert all(r["error"] is None for r in RunStore(str(tmp_path / "run")).read_rows())
        assert len(server.batch_api.lines) == 16 > lines  # 8 decompositions and 8 solves, each once


@pytest.mark.slow  # a subprocess `dnc`: seconds of imports
def test_a_driver_killed_while_its_batch_runs_is_restarted_on_the_same_batch(tmp_path):
    """The driver (a `dnc generate` process) is killed while round 1's batch is in progress; the restarted one
    waits for that batch (same id), takes its answers, submits only round 2: nothing is submitted twice."""
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), batch_delay_s=4.0) as server:
        model = batch_teacher(server)
        cfg = config(tmp_path / "run", limit=8, strategy="two_stage", decomposer=model, solver=model)
        driver = subprocess.Popen([sys.executable, "-m", "dnc_ray.cli", "generate", "--config",
                                   str(dump(cfg, tmp_path / "cfg.yaml"))])
        try:
            wait_for(lambda: server.batch_api.batches or driver.poll() is not None, 120, "the first batch")
            wait_for(lambda: run_json(tmp_path / "run").get("batches", [{}])[0].get("batch_id"), 30, "its record")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        [first] = server.batch_api.batches
        assert server.batch_api.batches[first]["status"] == "in_progress" and not server.batch_api.lines
        assert run_json(tmp_path / "run")["batches"][0]["batch_id"] == first

        attempt = run_generate(cfg)
        assert attempt["rows"] == 8 and attempt["errors"] == 0
        assert len(server.batch_api.batches) == 2  # round 1 (the killed driver's) and round 2, nothing more
        assert len(server.batch_api.lines) == 16 and len({cid for _, cid in server.batch_api.lines}) == 16
    meta = run_json(tmp_path / "run")
    # the restarted driver's first round is the solve: the decompositions came from the batch it picked up
    assert [(b["attempt"], b["round"], b["batch_id"] == first) for b in meta["batches"]] == [(0, 1, True), (1, 1, False)]
    assert [a["finished"] is None for a in meta["attempts"]] == [True, False]
    assert all(r["error"] is None for r in RunStore(str(tmp_path / "run")).read_rows())


def test_a_driver_killed_between_upload_and_create_finds_its_batch_by_the_input_file(tmp_path, monkeypatch):
    """The batch was created but its id never reached run.json: the next driver finds it by its input file."""
    from dnc_ray.llm.batch_api import BatchClient

    real_create = BatchClient.create

    async def create_then_die(self, input_file_id, metadata):
        await real_create(self, input_file_id, metadata)
        raise KeyboardInterrupt  # the driver dies before it records the batch id

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), batch_delay_s=0.2) as server:
        model = batch_teacher(server)
        cfg = config(tmp_path / "run", limit=4, strategy="decompose", decomposer=model)
        monkeypatch.setattr(BatchClient, "create", create_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_generate(cfg)
        monkeypatch.setattr(BatchClient, "create", real_create)
        assert run_json(tmp_path / "run")["batches"][0]["batch_id"] is None
        attempt = run_generate(cfg)
        assert attempt["rows"] == 4 and len(server.batch_api.batches) == 1 and len(server.batch_api.lines) == 4
    [record] = run_json(tmp_path / "run")["batches"]
    assert record["batch_id"] == next(iter(server.batch_api.batches))
