"""Ray Data end to end on local Ray: two_stage, samples, solve-from-run, hf actors, errors, resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ScriptedTeacher, question_of
from dnc_ray.config import GenerateConfig, TaskConfig
from dnc_ray.evaluate import evaluate_run
from dnc_ray.infra.store import RunStore
from dnc_ray.llm.stub_server import StubServer
from dnc_ray.stages.generate import run_generate
from dnc_ray.tasks import load_rows

pytestmark = pytest.mark.timeout(300)

ROWS = load_rows(TaskConfig(name="gsm8k", split="test", limit=16))
GOLD = {r["question"]: r["answers"][0][0] for r in ROWS}
RIGHT = {r["question"] for i, r in enumerate(ROWS) if i % 2 == 0}  # the teacher gets half right


def teacher_model(server: StubServer, **extra) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": server.base_url, "api_key_env": None,
            "batch_size": 4, "max_retries": 0, "price": {"input_per_1k": 0.001, "output_per_1k": 0.002}, **extra}


def settled_request_count(server: StubServer, quiet_s: float = 2.0) -> int:
    """The server's request count once no new request has come for `quiet_s`."""
    count = -1
    while count != len(server.requests):
        count = len(server.requests)
        time.sleep(quiet_s)
    return count


def config(out: Path, **fields) -> GenerateConfig:
    base = {"task": {"name": "gsm8k", "split": "test", "limit": 16}, "output": str(out), "progress_interval_s": 1}
    return GenerateConfig.model_validate({**base, **fields})


def test_two_stage_teacher_run_scored_and_reported(ray_local, tmp_path):
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT)) as server:
        teacher = teacher_model(server)
        attempt = run_generate(config(tmp_path / "run", strategy="two_stage", decomposer=teacher, solver=teacher))
        assert len(server.requests) == 32  # one decomposition + one solution per question
    assert attempt["rows"] == 16 and attempt["errors"] == 0
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in ROWS)
    for row in rows:
        assert row["subquestions"] == [f"What is given in: {row['question'][:30]}?", "What is asked?"]
        assert row["decomposer"] == row["solver"] == "stub-teacher"
        assert row["correct"] == (row["question"] in RIGHT)
        assert row["usage"]["decompose"]["prompt_tokens"] > 0 and row["usage"]["solve"]["completion_tokens"] > 0
    report = evaluate_run(str(tmp_path / "run"))
    assert report["scores"] == {"em": 50.0}
    assert report["errors"] == 0 and report["rows"] == 16
    solve = report["usage"]["solve"]
    expected = (solve["prompt_tokens"] * 0.001 + solve["completion_tokens"] * 0.002) / 1000
    assert report["usage"]["solve"]["cost_usd"] == pytest.approx(expected, abs=1e-6)
    assert "EM 50.0" in (tmp_path / "run" / "report.md").read_text()


def test_an_openai_stage_keeps_its_requests_busy_across_batches(ray_local, tmp_path):
    """Batches of 2 rows, 4 requests allowed per actor: only batches running at once in the actor reach 4; never more."""
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), latency_s=0.5) as server:
        teacher = teacher_model(server, batch_size=2, max_in_flight=4)
        attempt = run_generate(config(tmp_path / "run", strategy="decompose", decomposer=teacher))
    assert attempt["rows"] == 16 and attempt["errors"] == 0
    assert server.max_in_flight_seen == 4


def test_samples_then_solve_from_the_decomposition_run(ray_local, tmp_path):
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD))) as server:
        sampler = teacher_model(server, temperature=0.7)
        decomposed = config(tmp_path / "dec", strategy="decompose", decomposer=sampler, num_samples=3,
                            task={"name": "gsm8k", "split": "test", "limit": 4})
        run_generate(decomposed)
        rows = RunStore(str(tmp_path / "dec")).read_rows()
        assert sorted((r["id"], r["sample"]) for r in rows) == [(r["id"], s) for r in ROWS[:4] for s in range(3)]
        assert all(r["solution"] is None and r["score"] is None for r in rows)

        solved = config(tmp_path / "sol", strategy="solve", solver=teacher_model(server),
                        decompositions=str(tmp_path / "dec"), task={"name": "gsm8k", "split": "test", "limit": 4})
        run_generate(solved)
    rows = RunStore(str(tmp_path / "sol")).read_rows()
    assert len(rows) == 12 and all(r["correct"] for r in rows)
    assert all(r["usage"]["decompose"] is not None and r["usage"]["solve"] is not None for r in rows)


def test_reference_decomposer_with_local_hf_solver(ray_local, tmp_path):
    cfg = config(tmp_path / "run", strategy="two_stage", decomposer={"engine": "reference"},
                 solver={"engine": "hf", "model": "tiny-random-smollm2", "batch_size": 8, "max_tokens": 8})
    attempt = run_generate(cfg)
    assert attempt["errors"] == 0
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert len(rows) == 16
    first = next(r for r in rows if r["id"] == "gsm8k-test-0")
    assert first["subquestions"][0] == "How many eggs does Janet sell?"
    assert all(r["solver"] == "tiny-random-smollm2" and r["decomposer"] == "gsm8k-socratic-reference" for r in rows)
    assert all(0 < r["usage"]["solve"]["completion_tokens"] <= 8 for r in rows)


def test_failed_rows_are_kept_then_retried_alone(ray_local, tmp_path):
    broken = {ROWS[1]["question"], ROWS[5]["question"]}
    healthy = {"yes": False}

    def fail(index, messages):
        return None if healthy["yes"] or question_of(messages[-1]["content"]) not in broken else 500

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), fail=fail) as server:
        cfg = config(tmp_path / "run", strategy="two_stage", decomposer=teacher_model(server),
                     solver=teacher_model(server))
        first = run_generate(cfg)
        assert first == {**first, "rows": 16, "errors": 2}
        report = evaluate_run(str(tmp_path / "run"))
        assert report["errors"] == 2
        failed = [r for r in RunStore(str(tmp_path / "run")).read_rows() if r["error"]]
        assert {r["question"] for r in failed} == broken
        assert all(r["error"].startswith("decompose: InternalServerError") for r in failed)

        healthy["yes"] = True
        before = len(server.requests)
        second = run_generate(cfg)
        assert len(server.requests) - before == 4  # only the 2 failed rows, both stages
    assert second["rows"] == 2 and second["errors"] == 0
    assert evaluate_run(str(tmp_path / "run"))["errors"] == 0


def test_resume_after_the_driver_is_killed(ray_local, tmp_path):
    """A crash loses at most the batches in flight; the re-run does only what is missing."""
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), latency_s=0.5) as server:
        teacher = teacher_model(server, max_in_flight=1)
        cfg = {"task": {"name": "gsm8k", "split": "test", "limit": 16}, "strategy": "two_stage",
               "output": str(tmp_path / "run"), "decomposer": teacher, "solver": teacher,
               "ray": {"address": ray_local}}
        cfg_path = tmp_path / "cfg.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        driver = subprocess.Popen([sys.executable, "-m", "dnc_ray.cli", "generate", "--config", str(cfg_path)])
        parts = tmp_path / "run" / "rows"
        deadline = time.monotonic() + 120
        while not list(parts.glob("*.parquet")) and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

        store = RunStore(str(tmp_path / "run"))
        written = len(store.done_keys())
        assert 0 < written < 16, "the kill should land mid-run"
        before = settled_request_count(server)  # the dead driver's actors are torn down by Ray
        run_generate(GenerateConfig.model_validate(cfg))
        assert len(server.requests) - before == 2 * (16 - written)
    rows = store.read_rows()
    assert len(rows) == 16 and all(r["error"] is None for r in rows)
    assert evaluate_run(str(tmp_path / "run"))["scores"] == {"em": 50.0}
