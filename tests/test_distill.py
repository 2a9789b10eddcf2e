"""Each distillation variant keeps exactly the expected rows of a small scored run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dnc_ray.config import GenerateConfig
from dnc_ray.distill import build_training_set
from dnc_ray.infra.errors import ConfigError
from dnc_ray.method.prompts import DECOMPOSE_INSTRUCTION, SOLVE_INSTRUCTION
from dnc_ray.method.row import new_row, to_table
from dnc_ray.stages.run_record import run_identity
from dnc_ray.stages.store import RunStore


def scored_row(qid: str, sample: int, subquestions, solution, correct, task="gsm8k", error=None) -> dict:
    row = new_row({"id": qid, "task": task, "split": "test", "question": f"question {qid}?", "context": None,
                   "answers": [["7"]]}, sample)
    row.update(subquestions=subquestions, solution=solution, correct=correct, error=error,
               prediction=None if solution is None else "x", score=None if correct is None else float(correct))
    return row


def write_run(path, rows, strategy="two_stage") -> str:
    teacher = {"engine": "openai", "model": "t", "base_url": "http://127.0.0.1:1/v1", "temperature": 0.7}
    models = {"decomposer": teacher, "solver": teacher} if strategy == "two_stage" else {"decomposer": teacher}
    cfg = GenerateConfig.model_validate({"task": {"name": "gsm8k"}, "strategy": strategy, "output": str(path),
                                         "num_samples": 3, **models})
    store = RunStore(str(path))
    store.write_meta({"identity": run_identity(cfg), "config": cfg.model_dump(mode="json"), "attempts": []})
    store.write_rows(to_table(rows))
    return str(path)


@pytest.fixture
def run(tmp_path):
    rows = [
        scored_row("a", 0, ["A1?", "A2?"], "s1 The answer is: 7", True),
        scored_row("a", 1, ["A1?", "A2?"], "s2 The answer is: 7", True),  # same decomposition as sample 0
        scored_row("a", 2, ["A3?"], "s3 The answer is: 5", False),
        scored_row("b", 0, [], "s4 The answer is: 7", True),  # "No decomposition", solved right
        scored_row("b", 1, ["B1?"], None, None, error="solve: APITimeoutError"),
        scored_row("b", 2, None, None, None, error="decompose: InternalServerError"),
    ]
    return write_run(tmp_path / "run", rows)


def read(out) -> list[dict]:
    return pq.read_table(out / "train.parquet").to_pylist()


def test_sd_t_keeps_every_distinct_decomposition(run, tmp_path):
    report = build_training_set([run], "sd-t", str(tmp_path / "sdt"))
    rows = read(tmp_path / "sdt")
    assert [(r["id"], r["target"]) for r in rows] == [("a", "A1?\nA2?"), ("a", "A3?"), ("b", "No decomposition"), ("b", "B1?")]
    assert all(r["variant"] == "sd-t" and r["prompt"][0]["content"].startswith(DECOMPOSE_INSTRUCTION[:40]) for r in rows)
    assert report == {"gsm8k": {"kept": 4, "total": 6, "dropped": {"duplicate of a kept row": 1,
                                                                  "no decomposition (decompose failed)": 1}}}
    assert json.loads((tmp_path / "sdt" / "yield.json").read_text())["yield"] == report


def test_sd_r_keeps_only_decompositions_whose_solution_was_right(run, tmp_path):
    report = build_training_set([run], "sd-r", str(tmp_path / "sdr"))
    assert [(r["id"], r["target"]) for r in read(tmp_path / "sdr")] == [("a", "A1?\nA2?"), ("b", "No decomposition")]
    assert report["gsm8k"]["dropped"] == {"duplicate of a kept row": 1, "solution not correct": 1, "not solved": 1,
                                          "no decomposition (decompose failed)": 1}


def test_se_t_and_se_a_targets(run, tmp_path):
    build_training_set([run], "se-t", str(tmp_path / "set"))
    build_training_set([run], "se-a", str(tmp_path / "sea"))
    teacher = read(tmp_path / "set")
    gold = read(tmp_path / "sea")
    assert [r["target"] for r in teacher] == ["s1 The answer is: 7", "s2 The answer is: 7", "s3 The answer is: 5",
                                              "s4 The answer is: 7"]
    assert [r["target"] for r in gold] == ["s1 The answer is: 7", "s2 The answer is: 7", "s3 The answer is: 7",
                                           "s4 The answer is: 7"]
    prompt = teacher[0]["prompt"][0]["content"]
    assert prompt.startswith(SOLVE_INSTRUCTION[:40]) and "Sub-questions: 1. A1? 2. A2?" in prompt


def test_sd_r_refuses_a_run_that_was_never_solved(tmp_path):
    run = write_run(tmp_path / "dec", [scored_row("a", 0, ["A1?"], None, None)], strategy="decompose")
    with pytest.raises(ConfigError, match="sd-r needs a scored two_stage run"):
        build_training_set([run], "sd-r", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run here"):
        build_training_set([str(tmp_path / "nothing")], "sd-t", str(tmp_path / "out"))
