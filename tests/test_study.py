"""`dnc study`: the paper's study as cells. A tiny study end to end on local Ray (GSM8K with the reference
teacher decomposer, Bamboogle with a scripted teacher on 127.0.0.1; tiny random students), re-submitted
(every cell reused) and re-submitted with the teacher's max_tokens changed (exactly the cells downstream
redone); the cell keys, the report's layout, the plot's labels, the hold-out split, the configs and
manifests of the study."""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from conftest import ScriptedTeacher, question_of
from dnc_ray.config import GenerateConfig
from dnc_ray.method.prompts import DIRECT_INSTRUCTION
from dnc_ray.study.config import StudyConfig
from dnc_ray.tasks import TaskConfig, load_rows
from dnc_ray.testing.stub_server import StubServer

ROOT = Path(__file__).parent.parent

GSM8K = load_rows(TaskConfig(name="gsm8k", split="test", limit=16))
BAMBOOGLE = load_rows(TaskConfig(name="bamboogle"))
GOLD = {r["question"]: r["answers"][0][0] for r in GSM8K + BAMBOOGLE}
RIGHT = {r["question"] for i, r in enumerate(GSM8K + BAMBOOGLE) if i % 2 == 0}


class Teacher(ScriptedTeacher):
    """The scripted teacher, also answering the single-stage prompts (Bamboogle's is the bare question)."""

    def __call__(self, messages: list[dict]) -> str:
        content = messages[-1]["content"]
        if content in self.gold:
            return f"The answer is: {self.answer(content)}"
        if content.startswith(DIRECT_INSTRUCTION[:40]):
            return f"The answer is: {self.answer(question_of(content))}"
        return super().__call__(messages)


def tiny_study(out: Path, server: StubServer, ray_address: str) -> dict:
    stub = {"engine": "openai", "model": "stub-teacher", "base_url": server.base_url, "api_key_env": None,
            "max_tokens": 64, "max_retries": 0, "batch_size": 4,
            "price": {"input_per_1k": 0.001, "output_per_1k": 0.002}}
    student = {"batch_size": 4, "max_tokens": 8, "num_cpus": 0.5, "price": {"input_per_1k": 0.0001,
                                                                               "output_per_1k": 0.0002}}
    return {
        "output": str(out),
        "teacher": {"decomposer": stub, "solver": stub},
        "student": {
            "model": "tiny-random-smollm2",
            "training": {"max_steps": 2, "per_worker_batch_size": 2, "max_length": 256, "num_workers": 1,
                         "cpus_per_worker": 1, "deepspeed": {"zero_stage": 0}, "checkpoint_every_steps": 2,
                         "log_every_steps": 1, "lr": 1.0e-3},
            "decomposer": student, "solver": student,
        },
        "tasks": [
            {"name": "gsm8k", "train": {"split": "test", "offset": 8, "limit": 6}, "test": {"split": "test", "limit": 3},
             "teacher": {"decomposer": {"engine": "reference"}}, "rounds": 2},
            {"name": "bamboogle", "train": {"holdout": {"part": "train"}, "limit": 6},
             "test": {"holdout": {"part": "test"}, "limit": 3}},
        ],
        "progress_interval_s": 5,
        "ray": {"address": ray_address},
    }


# Changing the teacher decomposer's max_tokens (Bamboogle's teacher; GSM8K's decomposer is the reference)
# redoes Bamboogle's teacher run and everything made from it or run with that decomposer, nothing else.
CHANGED = {
    "bamboogle/teacher", *(f"bamboogle/set/{v}" for v in ("sd-t", "sd-r", "se-t", "se-a")),
    *(f"bamboogle/student/{v}" for v in ("sd-t", "sd-r", "se-t", "se-a")),
    *(f"bamboogle/eval/{r}" for r in ("teacher-teacher", "teacher-base", "sdt-teacher", "sdr-teacher", "teacher-set",
                                      "teacher-sea", "self-ask", "teacher-sea@gsm8k")),
    "gsm8k/eval/sdr-teacher@bamboogle", "gsm8k/eval/teacher-sea@bamboogle",
}


@pytest.mark.timeout(1800)
def test_tiny_study_end_to_end_then_resubmitted(ray_local, tmp_path, capfd):
    """46 cells (GSM8K with rounds: 2): every one built, on 4 logical CPUs of 2 cores; the report in the
    paper's layout; a re-submit reuses every cell; with the teacher's max_tokens changed, the submission
    would redo exactly the cells downstream (its plan: `dnc study --plan`; test_a_changed_input_... checks
    the same on built cells, and the README records a real changed submission)."""
    from dnc_ray.study.run import plan_study, run_study

    out = tmp_path / "study"
    with StubServer(reply=Teacher(GOLD, RIGHT)) as server:
        settings = tiny_study(out, server, ray_local)
        started = time.monotonic()
        first = run_study(StudyConfig.model_validate(settings))
        print(f"first submission: {time.monotonic() - started:.0f}s")
        started = time.monotonic()
        again = run_study(StudyConfig.model_validate(settings))
        print(f"re-submission: {time.monotonic() - started:.0f}s")
    settings["teacher"]["decomposer"] = settings["teacher"]["decomposer"] | {"max_tokens": 48}
    plan = plan_study(StudyConfig.model_validate(settings))

    cells = {c["name"]: c for c in first["cells"]}
    assert len(cells) == 46 and first["complete"]
    assert all(c["state"] == "built" for c in cells.values()), [c for c in cells.values() if c["state"] != "built"]
    assert all(c["state"] == "reused" for c in again["cells"]) and again["wall_s"] < 30
    assert {name for name, what in plan.items() if what == "build"} == CHANGED

    report = (out / "report.md").read_text()
    for title in ("single-stage teacher", "single-stage base student", "teacher / teacher", "base student / teacher",
                  "teacher / base student", "S_D-T / teacher", "S_D-R / teacher", "teacher / S_E-T",
                  "teacher / S_E-A", "self-ask teacher (dynamic)"):
        assert f"| {title} | " in report
    assert "| teacher / teacher | 66.7 (65.13) | 66.7 (54.4) |" in report  # ours (paper), GSM8K EM, Bamboogle acc
    assert "**The models differ**" in report
    for section in ("## Splits", "## Table 1", "## Cross-domain", "## Iterative S_D-R", "## Cost per 1,000",
                    "## Cells"):
        assert section in report
    assert "hold-out part test: rows whose sha256(id) mod 5 == 0" in report
    rows = {(r["task"], r["row"]): r for r in first["cost"]}
    static, dynamic = rows[("bamboogle", "teacher-teacher")], rows[("bamboogle", "self-ask")]
    assert dynamic["calls_per_q"] > static["calls_per_q"] and dynamic["tokens_per_q"] > static["tokens_per_q"]
    assert static["decompose_usd_per_1k"] > 0 and rows[("gsm8k", "teacher-teacher")]["decompose_usd_per_1k"] == 0
    assert {(r["trained_on"], r["evaluated_on"], r["row"]) for r in first["cross_domain"]} == {
        (a, b, r) for a, b in (("gsm8k", "bamboogle"), ("bamboogle", "gsm8k")) for r in ("sdr-teacher", "teacher-sea")}
    assert [r["round"] for r in first["rounds"] if r["task"] == "gsm8k"] == [1, 2]
    assert (out / "cost_vs_score.png").read_bytes()[:4] == b"\x89PNG"

    # Cells run at once: each line names its cell, down to a Ray Train worker's steps (Ray streams the
    # workers' output to this driver as it comes)
    named = ["[generate] bamboogle/teacher: ", "[train] gsm8k/student/sd-t: step 2/2 "]
    output, deadline = "", time.monotonic() + 60
    while not all(line in output for line in named) and time.monotonic() < deadline:
        output += capfd.readouterr().out
        time.sleep(0.2)
    assert [line for line in named if line not in output] == [], output[-3000:]
    print(report)


# ---------------------------------------------------------------- the hold-out split


def test_holdout_is_a_fixed_id_based_split():
    """Bamboogle has no training split: test and train parts are disjoint, cover the file, and do not depend on
    the file's order; a task config without a hold-out dumps as before (stored run identities still match)."""
    from dnc_ray.tasks import held_out

    test = load_rows(TaskConfig(name="bamboogle", holdout={"part": "test"}))
    train = load_rows(TaskConfig(name="bamboogle", holdout={"part": "train"}))
    assert len(test) == 26 and len(train) == 99
    assert {r["id"] for r in test}.isdisjoint(r["id"] for r in train)
    assert {r["id"] for r in test} | {r["id"] for r in train} == {r["id"] for r in BAMBOOGLE}
    assert [r["id"] for r in test] == [r["id"] for r in BAMBOOGLE if held_out(r, 5)]  # by id, not position
    assert load_rows(TaskConfig(name="bamboogle", holdout={"part": "test"}, limit=3)) == test[:3]
    drop_test = load_rows(TaskConfig(name="drop", split="dev", holdout={"part": "test", "by": "context"}))
    drop_train = load_rows(TaskConfig(name="drop", split="dev", holdout={"part": "train", "by": "context"}))
    assert {r["context"] for r in drop_test}.isdisjoint(r["context"] for r in drop_train)  # no passage on both sides
    assert "holdout" not in TaskConfig(name="gsm8k").model_dump()
    assert TaskConfig(name="bamboogle", holdout={"part": "test"}).model_dump()["holdout"] == {
        "part": "test", "folds": 5, "by": "id"}


# ---------------------------------------------------------------- cells and keys, without Ray


def tiny_settings(tmp_path: Path) -> dict:
    stub = {"engine": "openai", "model": "stub", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    return {
        "output": str(tmp_path / "study"), "teacher": {"decomposer": dict(stub), "solver": dict(stub)},
        "student": {"model": "tiny-random-smollm2", "training": {"max_steps": 2}},
        "tasks": [{"name": "gsm8k", "train": {"offset": 8, "limit": 6}, "test": {"limit": 3},
                   "teacher": {"decomposer": {"engine": "reference"}}},
                  {"name": "bamboogle", "train": {"holdout": {"part": "train"}, "limit": 6},
                   "test": {"holdout": {"part": "test"}, "limit": 3}}],
    }


def fake_build(results, plan_cells, root: Path):
    """Write every cell's cell.json as if it had been built (what run_cells writes), keyed as run_cells keys."""
    from dnc_ray.study.cells import cell_key, folder_name, write_record

    for cell in plan_cells:
        inputs = {i: results[i] for i in cell.inputs}
        job = cell.make(inputs)
        key = cell_key(cell.kind, job.settings, inputs)
        folder = str(root / "cells" / folder_name(cell.name, key))
        write_record(folder, {"name": cell.name, "key": key, "complete": True, "digest": f"rows-of-{key}",
                              "summary": {}, "seconds": 1.0})
        from dnc_ray.study.cells import Built

        results[cell.name] = Built(cell.name, cell.kind, key, folder, f"rows-of-{key}")


def test_a_changed_input_plans_exactly_the_cells_downstream(tmp_path):
    from dnc_ray.study.cells import run_cells
    from dnc_ray.study.plan import StudyPlan

    settings = tiny_settings(tmp_path)
    cells = StudyPlan(StudyConfig.model_validate(settings)).cells()
    fake_build({}, cells, tmp_path / "study")
    plan = run_cells(cells, str(tmp_path / "study"), dry_run=True)
    assert all(b.reused for b in plan.values())

    settings["teacher"]["decomposer"]["max_tokens"] = 48  # Bamboogle's teacher decomposer (GSM8K's is the reference)
    cells = StudyPlan(StudyConfig.model_validate(settings)).cells()
    plan = run_cells(cells, str(tmp_path / "study"), dry_run=True)
    assert {n for n, b in plan.items() if b.planned} == CHANGED

    settings["tasks"][0]["test"]["limit"] = 4  # GSM8K's test questions: every GSM8K evaluation, nothing else
    plan = run_cells(StudyPlan(StudyConfig.model_validate(settings)).cells(), str(tmp_path / "study"), dry_run=True)
    assert {n for n, b in plan.items() if b.planned} - CHANGED == {
        n for n in plan if n.startswith("gsm8k/eval/")} - CHANGED

    settings = tiny_settings(tmp_path)
    settings["student"]["decomposer"] = {"max_tokens": 64}  # how students decompose: the rows that use one
    plan = run_cells(StudyPlan(StudyConfig.model_validate(settings)).cells(), str(tmp_path / "study"), dry_run=True)
    assert {n for n, b in plan.items() if b.planned} == {
        f"{t}/eval/{r}" for t in ("gsm8k", "bamboogle") for r in ("base-teacher", "sdt-teacher", "sdr-teacher")
    } | {"gsm8k/eval/sdr-teacher@bamboogle", "bamboogle/eval/sdr-teacher@gsm8k"}

    settings = tiny_settings(tmp_path)
    settings["student"]["decomposer"] = {"price": {"input_per_1k": 1.0}, "actors": 3, "num_cpus": 2}
    plan = run_cells(StudyPlan(StudyConfig.model_validate(settings)).cells(), str(tmp_path / "study"), dry_run=True)
    assert not any(b.planned for b in plan.values())  # prices and resources change no output


def test_a_generation_run_with_retried_rows_changes_the_keys_downstream(tmp_path):
    """A re-submit that retries failed teacher rows keeps the run's key but changes its rows: the sets and
    students made from it are made again (dnc pipeline used to reuse them because the files existed)."""
    from dnc_ray.method.row import new_row, to_table
    from dnc_ray.stages.store import RunStore
    from dnc_ray.study.cells import Built, cell_key, run_digest

    store = RunStore(str(tmp_path / "run"))
    rows = [new_row(r) for r in GSM8K[:3]]
    rows[1]["error"] = "decompose: InternalServerError"
    store.write_rows(to_table(rows))
    before = run_digest(str(tmp_path / "run"))
    rows[1].update(error=None, subquestions=["What is asked?"])
    store.write_rows(to_table(rows[1:2]))  # the retried row, as a new part
    after = run_digest(str(tmp_path / "run"))
    assert before != after
    teacher = {"teacher": Built("t", "generate", key="k", digest=before)}
    retried = {"teacher": Built("t", "generate", key="k", digest=after)}
    assert cell_key("distill", {"variant": "sd-r"}, teacher) != cell_key("distill", {"variant": "sd-r"}, retried)


def test_pipeline_reuses_the_set_and_student_only_when_made_from_the_same_inputs(tmp_path, monkeypatch):
    """dnc pipeline: a resubmit reuses the set and the student; once the teacher's failed rows are retried,
    the set is rebuilt, the student retrained from nothing (its old checkpoints removed) and re-evaluated."""
    from dnc_ray import pipeline
    from dnc_ray.config import PipelineConfig
    from dnc_ray.method.row import new_row, to_table
    from dnc_ray.stages.store import RunStore

    out = tmp_path / "p"
    cfg = PipelineConfig.model_validate({
        "output": str(out), "train_task": {"name": "gsm8k", "offset": 4, "limit": 3},
        "eval_task": {"name": "gsm8k", "limit": 2}, "teacher_decomposer": {"engine": "reference"},
        "teacher_solver": {"engine": "hf"}, "variant": "sd-t", "max_failed_rows": 1})
    teacher_rows = [new_row(r) | {"subquestions": ["What?"]} for r in GSM8K[4:7]]
    teacher_rows[2] |= {"subquestions": None, "error": "decompose: timeout"}
    calls = []

    def run_generate(gen):
        calls.append(("generate", gen.output))
        if gen.output.endswith("/teacher"):
            RunStore(gen.output).write_rows(to_table(teacher_rows))
        (Path(gen.output)).mkdir(parents=True, exist_ok=True)
        (Path(gen.output) / "run.json").write_text("{}")
        errors = sum(r["error"] is not None for r in teacher_rows) if gen.output.endswith("/teacher") else 0
        return {"rows": 3, "errors": errors, "run_rows": 3, "elapsed_s": 0.0}

    def build_training_set(runs, variant, where):
        calls.append(("distill", where))
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / "train.parquet").write_text("set")
        return {}

    def run_train(train):
        calls.append(("train", train.output))
        assert not (Path(train.output) / "checkpoints").exists(), "resumed from another student's checkpoints"
        (Path(train.output) / "model").mkdir(parents=True)
        (Path(train.output) / "model" / "config.json").write_text("{}")
        (Path(train.output) / "checkpoints").mkdir()
        return {}

    monkeypatch.setattr(pipeline, "run_generate", run_generate)
    monkeypatch.setattr(pipeline, "build_training_set", build_training_set)
    monkeypatch.setattr(pipeline, "yield_table", lambda report: "")
    monkeypatch.setattr(pipeline, "run_train", run_train)
    monkeypatch.setattr(pipeline, "evaluate_run", lambda uri: {})
    monkeypatch.setattr(pipeline, "write_report", lambda cfg, out, reports: {})

    pipeline.run_pipeline(cfg)
    assert [c[0] for c in calls].count("distill") == 1 and [c[0] for c in calls].count("train") == 1
    (out / "eval" / "student" / "rows").mkdir(parents=True)
    calls.clear()
    pipeline.run_pipeline(cfg)  # nothing changed: set and student reused, the student's evaluation kept
    assert not [c for c in calls if c[0] in ("distill", "train")]
    assert (out / "eval" / "student" / "rows").exists()

    teacher_rows[2] |= {"subquestions": ["What else?"], "error": None}  # the failed row, retried and now done
    calls.clear()
    pipeline.run_pipeline(cfg)
    assert [c[0] for c in calls if c[0] in ("distill", "train")] == ["distill", "train"]
    assert not (out / "eval" / "student" / "rows").exists()  # rows of the earlier student: removed, run again


# ---------------------------------------------------------------- the report's plot


def test_plot_labels_never_overlap_even_when_points_coincide():
    from matplotlib.text import Text

    from dnc_ray.study.report import cost_vs_score_figure, spread

    assert spread([0.5, 0.5, 0.5], 0.1) == pytest.approx([0.5, 0.6, 0.7])
    positions = spread([0.9, 0.95, 1.0, 0.2], 0.1)
    ordered = sorted(positions)
    assert all(b - a >= 0.1 - 1e-9 for a, b in pairwise(ordered)) and max(positions) <= 1.0
    names = ["teacher (single stage)", "base student (single stage)", "teacher / teacher", "base student / teacher",
             "teacher / base student", "S_D-T / teacher", "S_D-R / teacher", "teacher / S_E-T", "teacher / S_E-A",
             "self-ask (dynamic)", "S_D-R round 2 / teacher"]
    same = [(n, 12.0, 33.3) for n in names]  # every point on one spot (the tiny study's zero-cost students)
    spreadout = [(n, float(i % 3), 10.0 * (i % 4)) for i, n in enumerate(names)]
    fig = cost_vs_score_figure({"gsm8k": {"points": same, "x_label": "x", "y_label": "EM (%)"},
                                "bamboogle": {"points": spreadout, "x_label": "x", "y_label": "ACC (%)"}})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the label, without its line to the point
        assert len(boxes) == len(names)
        for i, a in enumerate(boxes):
            assert 0 <= a.y0 and a.y1 <= fig.bbox.height  # inside the figure
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (a, b)


# ---------------------------------------------------------------- configs and manifests


def test_study_configs_load_and_plan_the_paper_layout():
    from dnc_ray.config import load_config
    from dnc_ray.study.plan import StudyPlan

    for name, tasks in (("study-paper.yaml", 3), ("study-open-teacher.yaml", 3)):
        cfg = load_config(ROOT / "jobs" / "configs" / name, StudyConfig)
        assert len(cfg.tasks) == tasks
        cells = {c.name for c in StudyPlan(cfg).cells()}
        for task in ("gsm8k", "drop", "bamboogle"):
            assert {f"{task}/student/{v}" for v in ("sd-t", "sd-r", "se-t", "se-a")} <= cells
            assert {f"{task}/eval/{r}" for r in ("direct-teacher", "direct-base", "teacher-teacher", "base-teacher",
                                                 "teacher-base", "sdt-teacher", "sdr-teacher", "teacher-set",
                                                 "teacher-sea", "self-ask")} <= cells
        assert "drop/eval/sdr-teacher@gsm8k" in cells and "gsm8k/eval/teacher-sea@bamboogle" in cells
    paper = load_config(ROOT / "jobs" / "configs" / "study-paper.yaml", StudyConfig)
    assert paper.training_of(paper.tasks[1]).lr == 2e-5 and paper.rounds == 2
    assert "gsm8k/eval/sdr-round2-teacher" in {c.name for c in StudyPlan(paper).cells()}
    open_teacher = load_config(ROOT / "jobs" / "configs" / "study-open-teacher.yaml", StudyConfig)
    assert open_teacher.teacher.decomposer.base_url == "http://dnc-teacher-serve-svc:8000/v1"


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"name": "bamboogle", "train": {}, "test": {}, "teacher": {"decomposer": {"engine": "reference"}}}]},
     "reference decomposer has sub-questions for GSM8K split test only"),
    ({"tasks": [{"name": "gsm8k", "train": {}, "test": {}}, {"name": "gsm8k", "train": {}, "test": {}}]},
     "share the label 'gsm8k'"),
    ({"num_samples": 2}, "num_samples > 1 needs a sampling teacher decomposer"),
    ({"tasks": [{"name": "gsm8k", "train": {"split": "dev"}, "test": {}}]}, "train: "),
    ({"tasks": [{"name": "gsm8k", "train": {}, "test": {}, "training": {"lrr": 1}}]}, "training: lrr"),
])
def test_study_config_errors_name_the_problem(tmp_path, change, message):
    from dnc_ray.config import load_config
    from dnc_ray.infra.errors import ConfigError
    from dnc_ray.study.config import StudyConfig as Study

    settings = tiny_settings(tmp_path) | change
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(settings))
    if message == "train: ":  # an unknown split is found when the questions load
        with pytest.raises(Exception, match="split"):
            from dnc_ray.tasks import load_rows as load

            load(load_config(path, Study).tasks[0].task_config("train"))
        return
    with pytest.raises(ConfigError, match=message):
        load_config(path, Study)


# A subset of the KubeRay CRDs' OpenAPI schemas (ray.io/v1 RayJob, RayService, RayCluster spec): the fields
# these manifests use, with unknown fields refused, so that a typo (e.g. `rayClusterSpecs`) fails here.
_GROUP = {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
    "groupName": {"type": "string"}, "replicas": {"type": "integer"}, "minReplicas": {"type": "integer"},
    "maxReplicas": {"type": "integer"}, "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
    "template": {"type": "object", "required": ["spec"]}, "numOfHosts": {"type": "integer"},
    "idleTimeoutSeconds": {"type": "integer"}, "suspend": {"type": "boolean"},
    "serviceType": {"type": "string"}, "enableIngress": {"type": "boolean"}, "headService": {"type": "object"}}}
_CLUSTER = {"type": "object", "additionalProperties": False, "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": {"type": "object"}, "headGroupSpec": _GROUP,
    "workerGroupSpecs": {"type": "array", "items": {**_GROUP, "required": ["groupName", "template"]}},
    "headServiceAnnotations": {"type": "object"}, "suspend": {"type": "boolean"}}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": "^[a-z0-9-]+$"}}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _META,
    "spec": {"type": "object", "additionalProperties": False, "required": ["entrypoint"], "properties": {
        "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
        "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
        "rayClusterSpec": _CLUSTER, "clusterSelector": {"type": "object"}, "submissionMode": {"type": "string"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "submitterPodTemplate": {"type": "object"}, "suspend": {"type": "boolean"}}}}}
RAYSERVICE = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": _META,
    "spec": {"type": "object", "additionalProperties": False, "required": ["serveConfigV2", "rayClusterConfig"],
             "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": _CLUSTER,
                            "serveService": {"type": "object"}, "upgradeStrategy": {"type": "object"},
                            "excludeHeadPodFromServeSvc": {"type": "boolean"}}}}}


def test_study_manifests_validate_against_their_schemas():
    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    from dnc_ray.config import load_config

    for path, schema in (("rayjob-study.yaml", RAYJOB), ("rayjob-pipeline.yaml", RAYJOB), ("rayjob-generate-vllm.yaml", RAYJOB),
                         ("rayservice-teacher-llm.yaml", RAYSERVICE), ("rayservice.yaml", RAYSERVICE)):
        jsonschema.validate(yaml.safe_load((ROOT / "cluster" / "kuberay" / path).read_text()), schema)
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-study.yaml").read_text())
    _, script, flag, config = job["spec"]["entrypoint"].split()
    assert script == "jobs/study.py" and flag == "--config"  # test_cluster runs each entrypoint as dnc <stage>
    study = load_config(ROOT / config, StudyConfig)
    vllm_job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-generate-vllm.yaml").read_text())
    _, script, _, vllm_config = vllm_job["spec"]["entrypoint"].split()
    assert script == "jobs/generate.py" and load_config(ROOT / vllm_config, GenerateConfig).solver.engine == "vllm"

    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice-teacher-llm.yaml").read_text())
    served = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = served.applications
    assert app.import_path == "ray.serve.llm:build_openai_app"
    # Ray Serve LLM's own config model (its public import needs vLLM installed; the model itself does not)
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    [llm] = [LLMConfig.model_validate(c) for c in app.args["llm_configs"]]
    # the study's teacher is that model, behind that RayService's serve service
    assert study.teacher.decomposer.model == llm.model_id
    assert study.teacher.decomposer.base_url == f"http://{service['metadata']['name']}-serve-svc:8000/v1"
    gpus = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(gpus["resources"]["limits"]["nvidia.com/gpu"]) >= llm.engine_kwargs["tensor_parallel_size"]


@pytest.mark.slow  # a subprocess `dnc`: seconds of imports
def test_cli_study_plan_and_a_config_error(tmp_path):
    """`dnc study --plan` lists what a submission would build, starting nothing; a bad key is one line, exit 2."""
    import subprocess
    import sys

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_settings(tmp_path)))
    planned = subprocess.run([sys.executable, "-m", "dnc_ray.cli", "study", "--config", str(path), "--plan"],
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "[study] build gsm8k/teacher" in planned.stdout and "[study] 42 cells to build, 0 to reuse" in planned.stdout
    assert not (tmp_path / "study").exists()
    path.write_text(yaml.safe_dump(tiny_settings(tmp_path) | {"round": 2}))
    bad = subprocess.run([sys.executable, "-m", "dnc_ray.cli", "study", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "field `round`: Extra inputs are not permitted" in bad.stderr


def test_scheduler_runs_cells_as_ray_tasks_and_a_failure_skips_only_what_is_downstream(ray_local, tmp_path):
    """Training sets from a hand-made run, as cells: a cell whose builder raises is reported and the cell made
    from it is skipped, the others are built; a cell whose make() raises fails alone; a re-run reuses the built
    ones and tries the failed ones again."""
    from dnc_ray.method.row import new_row, to_table
    from dnc_ray.stages.store import RunStore
    from dnc_ray.study.cells import Cell, Job, run_cells

    run = tmp_path / "run"
    store = RunStore(str(run))
    store.write_rows(to_table([new_row(r) | {"subquestions": ["What?"], "solution": "The answer is: 1",
                                             "prediction": "1", "correct": True} for r in GSM8K[:3]]))
    store.write_meta({"identity": {}, "attempts": [], "config": {
        "task": {"name": "gsm8k"}, "strategy": "two_stage", "output": str(run),
        "decomposer": {"engine": "reference"}, "solver": {"engine": "hf"}}})

    def distill(variant, source=str(run)):
        return lambda inputs: Job({"variant": variant, "source": source},
                                  lambda folder: {"runs": [source], "variant": variant, "output": folder})

    def broken(inputs):
        raise ValueError("no such model")

    cells = [Cell("a/set/sd-t", "distill", (), distill("sd-t")),
             Cell("a/set/missing", "distill", (), distill("sd-t", str(tmp_path / "nothing"))),
             Cell("a/set/after-missing", "distill", ("a/set/missing",), distill("se-a")),
             Cell("a/set/broken", "distill", (), broken),
             Cell("a/set/se-a", "distill", ("a/set/sd-t",), distill("se-a"))]
    lines = []
    results = run_cells(cells, str(tmp_path / "study"), log=lines.append)
    assert results["a/set/sd-t"].ok and results["a/set/se-a"].ok and results["a/set/se-a"].summary["yield"]
    assert "FileNotFoundError" in results["a/set/missing"].error
    assert results["a/set/after-missing"].error == "skipped: input a/set/missing failed"
    assert results["a/set/broken"].error == "ValueError: no such model"
    assert (Path(results["a/set/se-a"].folder) / "train.parquet").exists()
    again = run_cells(cells, str(tmp_path / "study"), log=lines.append)
    assert again["a/set/sd-t"].reused and again["a/set/se-a"].reused
    assert not again["a/set/missing"].reused and not again["a/set/missing"].ok


def test_pipeline_plot_labels_do_not_overlap():
    """dnc pipeline's plot used to print "student" over "base-student" (same cost, same score)."""
    import io

    from matplotlib.image import imread

    from dnc_ray.pipeline import cost_vs_accuracy_png

    usage = {"decompose": {"prompt_tokens": 100, "completion_tokens": 20}, "solve": {"prompt_tokens": 50, "completion_tokens": 9}}
    reports = [{"name": n, "cost_usd": 0.0, "cost_usd_per_1k_rows": 0.0, "rows": 16, "usage": usage, "scores": {"em": 0.0}}
               for n in ("direct", "teacher", "base-student", "student")]
    image = imread(io.BytesIO(cost_vs_accuracy_png(reports)))
    assert image.shape[0] > 200
