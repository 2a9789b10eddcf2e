"""Ray Data end to end on local Ray: two_stage, samples, solve-from-run, hf actors, errors, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from conftest import ScriptedTeacher, question_of
from dnc_ray.config import GenerateConfig
from dnc_ray.evaluate import evaluate_run
from dnc_ray.llm.dtype import device_caps
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import TaskConfig, load_rows
from dnc_ray.testing.stub_server import StubServer

pytestmark = pytest.mark.timeout(300)

ROWS = load_rows(TaskConfig(name="gsm8k", split="test", limit=16))
GOLD = {r["question"]: r["answers"][0][0] for r in ROWS}
RIGHT = {r["question"] for i, r in enumerate(ROWS) if i % 2 == 0}  # the teacher gets half right


def teacher_model(server: StubServer, **extra) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": server.base_url, "api_key_env": None,
            "batch_size": 4, "max_retries": 0, "price": {"input_per_1k": 0.001, "output_per_1k": 0.002}, **extra}


def wait_until_no_stage_actor_is_alive(timeout_s: float = 120) -> None:
    """Until Ray has torn down every MethodStage actor (a killed driver's), read from the GCS actor table."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        actors = ray._private.state.actors().values()  # the GCS table: no dashboard needed, unlike ray.util.state
        if not [a for a in actors if "MethodStage" in a["ActorClassName"] and a["State"] != "DEAD"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"MethodStage actors still alive after {timeout_s}s")


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
    # dtype auto, resolved where the actors run and recorded: bf16 on a CPU with AVX512-BF16 or AMX
    [attempt] = json.loads((tmp_path / "run" / "run.json").read_text())["attempts"]
    assert attempt["dtype"] == {"solver": "bfloat16" if device_caps().cpu_bf16 else "float32"}


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


def test_a_second_driver_is_refused_and_a_killed_driver_is_taken_over_redoing_only_requests_in_flight(ray_local, tmp_path):
    """Driver A runs; driver B on the same output is refused (one line, rc 2, before Ray). A is killed while a
    solve request is held at the server: every decomposition it finished is already written (as an unfinished row),
    so the re-run takes A's lease over and redoes only the requests A had in flight or made while Ray tore it down."""
    released = threading.Event()
    held: set[int] = set()

    def hold_solves(index: int, messages: list[dict]) -> bool:
        holding = index >= 8 and is_solve(messages) and not released.is_set()
        if holding:
            held.add(index)
        return holding

    def all_answers_on_disk(store: RunStore) -> bool:
        """The run has stalled on the held solve (its one slot) and every reply before it has reached the disk."""
        solves = sum(is_solve(messages) for messages in server.requests)
        decompositions = len(server.requests) - solves
        rows = store.read_rows()
        finished = sum(r["error"] is None for r in rows)
        decomposed = sum(bool(r["subquestions"]) for r in rows)
        return bool(held) and finished == solves - len(held) and decomposed == decompositions

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), latency_s=0.2, hold=hold_solves) as server:
        teacher = teacher_model(server, max_in_flight=1)
        cfg = {"task": {"name": "gsm8k", "split": "test", "limit": 16}, "strategy": "two_stage",
               "output": str(tmp_path / "run"), "decomposer": teacher, "solver": teacher,
               "ray": {"address": ray_local}}
        cfg_path = tmp_path / "cfg.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        driver = subprocess.Popen([sys.executable, "-m", "dnc_ray.cli", "generate", "--config", str(cfg_path)])
        deadline = time.monotonic() + 180
        while not server.requests and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "run" / "lease.json").exists() and driver.poll() is None

        second = dnc_generate(cfg, tmp_path / "second.yaml")
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"dnc generate: error: output {tmp_path / 'run'} is in use by another driver (pid {driver.pid} on ")

        store = RunStore(str(tmp_path / "run"))
        while not all_answers_on_disk(store) and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
        assert all_answers_on_disk(store)
        at_kill = len(server.requests)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert 0 < at_kill < 32, "the kill should land mid-run"
        unfinished = unfinished_rows(store)
        assert unfinished and all(r["error"].startswith("solve: unfinished") and r["subquestions"] for r in unfinished)
        wait_until_no_stage_actor_is_alive()  # Ray tears the dead driver's actors down: no request comes after
        released.set()
        assert len(server.requests) == at_kill

        run_generate(GenerateConfig.model_validate(cfg))
        # redone: only the held request; without persisting each step, every unfinished row's decomposition too
        assert len(server.requests) - at_kill == 32 - at_kill + 1
    rows = store.read_rows()
    assert len(rows) == 16 and all(r["error"] is None for r in rows)
    assert evaluate_run(str(tmp_path / "run"))["scores"] == {"em": 50.0}
    attempts = json.loads((tmp_path / "run" / "run.json").read_text())["attempts"]
    assert [a["finished"] is None for a in attempts] == [True, False]  # the killed attempt is kept, marked unfinished
    assert not (tmp_path / "run" / "lease.json").exists()


def is_solve(messages: list[dict]) -> bool:
    return "Sub-questions:" in messages[-1]["content"]


def unfinished_rows(store: RunStore) -> list[dict]:
    return [r for r in store.read_rows() if r["error"] and "unfinished" in r["error"]]


def test_a_row_failed_at_solve_resumes_at_solve(ray_local, tmp_path):
    """The decomposition a failed row already paid for is kept: the re-run asks only for the solution."""
    broken = {ROWS[2]["question"], ROWS[7]["question"]}
    healthy = {"yes": False}

    def fail(index, messages):
        content = messages[-1]["content"]
        failing = not healthy["yes"] and question_of(content) in broken and "Sub-questions:" in content
        return 503 if failing else None

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), fail=fail) as server:
        cfg = config(tmp_path / "run", strategy="two_stage", decomposer=teacher_model(server), solver=teacher_model(server))
        assert run_generate(cfg)["errors"] == 2
        failed = [r for r in RunStore(str(tmp_path / "run")).read_rows() if r["error"]]
        assert [r["error"].split(":")[0] for r in failed] == ["solve", "solve"]
        kept = {r["id"]: r["usage"]["decompose"] for r in failed}
        healthy["yes"] = True
        before = len(server.requests)
        second = run_generate(cfg)
        assert len(server.requests) - before == 2  # solve only
    assert second == {**second, "rows": 2, "errors": 0}
    rows = {r["id"]: r for r in RunStore(str(tmp_path / "run")).read_rows()}
    assert all(rows[i]["error"] is None and rows[i]["usage"]["decompose"] == kept[i] for i in kept)


def self_ask_config(out: Path, server: StubServer, **fields) -> GenerateConfig:
    return config(out, strategy="self_ask", decomposer=teacher_model(server), solver=teacher_model(server), **fields)


def test_self_ask_over_ray_data_scored_with_turns_and_tokens(ray_local, tmp_path):
    """Rows need 0-3 follow-ups: all finish, scored; evaluate reports tokens and $ per question."""
    follow_ups = {r["question"]: i % 4 for i, r in enumerate(ROWS)}
    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT, follow_ups=follow_ups.get)) as server:
        attempt = run_generate(self_ask_config(tmp_path / "run", server))
        assert len(server.requests) == sum(1 + 2 * n for n in follow_ups.values())
    assert attempt == {**attempt, "rows": 16, "errors": 0}
    rows = RunStore(str(tmp_path / "run")).read_rows()
    for row in rows:
        n = follow_ups[row["question"]]
        assert len(row["subquestions"]) == n and row["correct"] == (row["question"] in RIGHT)
        assert row["usage"]["decompose"]["calls"] == n + 1
        assert (row["usage"]["solve"] or {"calls": 0})["calls"] == n
        assert row["solution"].endswith(f"So the final answer is: {GOLD[row['question']] if row['question'] in RIGHT else '-1'}")
    report = evaluate_run(str(tmp_path / "run"))
    assert report["scores"] == {"em": 50.0} and report["strategy"] == "self_ask"
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for r in rows for u in r["usage"].values() if u)
    assert report["tokens_per_question"] == pytest.approx(tokens / 16, abs=0.01)
    assert report["calls_per_question"] == pytest.approx(sum(1 + 2 * n for n in follow_ups.values()) / 16, abs=0.01)


def test_self_ask_failure_on_turn_2_fails_one_row_and_resume_redoes_only_it(ray_local, tmp_path):
    victim = ROWS[3]["question"]
    healthy = {"yes": False}

    def fail(index, messages):
        content = messages[-1]["content"]
        turn_2 = content.endswith("Intermediate answer: part 1 is 10\n") and f"Question: {victim}\n" in content
        return 500 if turn_2 and not healthy["yes"] else None

    with StubServer(reply=ScriptedTeacher(GOLD, RIGHT), fail=fail) as server:
        cfg = self_ask_config(tmp_path / "run", server)
        first = run_generate(cfg)
        assert first == {**first, "rows": 16, "errors": 1}
        [failed] = [r for r in RunStore(str(tmp_path / "run")).read_rows() if r["error"]]
        assert failed["question"] == victim and failed["error"].startswith("self_ask: InternalServerError")
        assert failed["usage"]["decompose"]["calls"] == 2 and failed["usage"]["solve"]["calls"] == 1
        healthy["yes"] = True
        before = len(server.requests)
        second = run_generate(cfg)
        assert len(server.requests) - before == 5  # that row's loop from its start: 3 turns, 2 follow-up answers
    assert second == {**second, "rows": 1, "errors": 0}
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert all(r["error"] is None for r in rows) and len(rows) == 16


def test_self_ask_on_a_local_hf_model(ray_local, tmp_path):
    """The hf engine runs self_ask turns in one actor; the tiny random model writes no follow-up, so each row
    fails at turn 1 with the reason, its turn's usage recorded."""
    tiny = {"engine": "hf", "model": "tiny-random-smollm2", "batch_size": 4, "max_tokens": 6}
    cfg = config(tmp_path / "run", strategy="self_ask", decomposer=tiny, solver=tiny,
                 task={"name": "gsm8k", "split": "test", "limit": 6})
    attempt = run_generate(cfg)
    assert attempt == {**attempt, "rows": 6, "errors": 6}
    for row in RunStore(str(tmp_path / "run")).read_rows():
        assert row["error"] in ('self_ask: turn 1: the reply has neither "Follow up:" nor "So the final answer is:"',
                                "self_ask: empty reply")
        assert row["decomposer"] == "tiny-random-smollm2" and 0 < row["usage"]["decompose"]["completion_tokens"] <= 6


def dnc_generate(cfg: dict, cfg_path: Path) -> subprocess.CompletedProcess:
    cfg_path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "dnc_ray.cli", "generate", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=240)


def test_exit_status_tells_whether_rows_failed_beyond_the_threshold(ray_local, tmp_path):
    """1 of 4 rows fails: exit 3 with the default threshold (any), 0 with '25%'; the summary is printed either way."""
    broken = ROWS[1]["question"]
    fail = lambda index, messages: 500 if question_of(messages[-1]["content"]) == broken else None  # noqa: E731
    with StubServer(fail=fail) as server:
        cfg = {"task": {"name": "gsm8k", "split": "test", "limit": 4}, "strategy": "direct",
               "output": str(tmp_path / "run"), "solver": teacher_model(server), "ray": {"address": ray_local}}
        strict = dnc_generate(cfg, tmp_path / "strict.yaml")
        assert strict.returncode == 3, strict.stderr[-3000:]
        assert "[generate] finished: 4 rows run (1 failed)" in strict.stdout
        assert strict.stderr.splitlines()[-1] == (
            f"dnc generate: failed rows: {tmp_path / 'run'}: 1 of 4 rows failed, more than max_failed_rows (0) allows; "
            "the rows are written with their error: run the same config again to retry them")
        lenient = dnc_generate({**cfg, "max_failed_rows": "25%"}, tmp_path / "lenient.yaml")
        assert lenient.returncode == 0, lenient.stderr[-3000:]
        assert "[generate] finished: 1 rows run (1 failed), 3 done earlier, 4 in the run" in lenient.stdout


def test_pipeline_stops_after_a_teacher_run_with_failed_rows(tmp_path, monkeypatch):
    """No distillation from a partial teacher run (it would be reused by every later run of the pipeline)."""
    from dnc_ray import pipeline
    from dnc_ray.config import PipelineConfig
    from dnc_ray.infra.errors import RowsFailed

    cfg = PipelineConfig.model_validate({
        "output": str(tmp_path / "p"), "train_task": {"name": "gsm8k", "limit": 4}, "eval_task": {"name": "gsm8k", "limit": 2},
        "teacher_decomposer": {"engine": "reference"}, "teacher_solver": {"engine": "hf"}, "variant": "sd-t"})
    monkeypatch.setattr(pipeline, "run_generate", lambda gen: {"rows": 4, "errors": 1, "run_rows": 4})
    monkeypatch.setattr(pipeline, "build_training_set", lambda *a: pytest.fail("distilled a partial teacher run"))
    with pytest.raises(RowsFailed, match="1 of 4 rows failed"):
        pipeline.run_pipeline(cfg)
