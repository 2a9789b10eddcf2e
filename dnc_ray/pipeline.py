"""`dnc pipeline`: the whole method in one job, every stage reused when its output is complete and was
made from the same inputs (the set from the teacher's current rows, the student from that set).

    teacher run (train questions) -> S_D set -> student decomposer (Ray Train + DeepSpeed)
      -> evaluation on held-out questions: direct, teacher/teacher, base student/teacher,
         student/teacher -> report.md, report.json, cost_vs_accuracy.png
"""

from __future__ import annotations

import json

from dnc_ray.config import GenerateConfig, PipelineConfig, TrainConfig
from dnc_ray.distill import build_training_set, yield_table
from dnc_ray.evaluate import evaluate_run, markdown_table
from dnc_ray.infra import console, storage
from dnc_ray.infra.errors import RowsFailed
from dnc_ray.infra.lease import Lease
from dnc_ray.stages.cost_controls import within_budget
from dnc_ray.stages.generate import check_api_keys, check_failed_rows, check_output, run_generate
from dnc_ray.study.cells import fingerprint, read_record, run_digest, write_record
from dnc_ray.study.plan import generate_settings, train_settings
from dnc_ray.train.recipe import run_train

REPORT_FILES = ("report.md", "report.json", "cost_vs_accuracy.png")


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage in turn. A teacher run with more failed rows than `max_failed_rows` stops the pipeline
    (RowsFailed) before distillation; an evaluation run's failures are reported, then raised at the end."""
    out = cfg.output.rstrip("/")
    check_output(out)
    check_api_keys({"teacher_decomposer": cfg.teacher_decomposer, "teacher_solver": cfg.teacher_solver})
    with Lease(out):  # one pipeline per output (each generation run also holds its own folder's lease)
        return _run_pipeline(cfg, out)


def _run_pipeline(cfg: PipelineConfig, out: str) -> dict:
    for name in REPORT_FILES:  # never leave an old report beside a run that did not finish
        storage.delete(storage.join(out, name))

    _stage("teacher run")
    teacher = teacher_run(cfg, f"{out}/teacher")
    check_failed_rows(teacher, run_generate(_budgeted(cfg, teacher, out)))  # else a partial set would be distilled
    # Reused only when made from the same inputs (cell keys, dnc_ray/study/cells.py): the set from the
    # teacher run's current rows, the student from that set, its evaluation from that student.
    _stage(f"distill {cfg.variant}")
    keys = stage_keys(cfg, out, teacher)
    if _made_from(f"{out}/distill", keys["distill"], "train.parquet"):
        console.say(f"[pipeline] reusing {out}/distill")
    else:
        console.say(yield_table(build_training_set([f"{out}/teacher"], cfg.variant, f"{out}/distill")))
        write_record(f"{out}/distill", {"key": keys["distill"]})
    _stage("train the student decomposer")
    if _made_from(f"{out}/student", keys["student"], "model/config.json"):
        console.say(f"[pipeline] reusing {out}/student/model")
    else:
        _clear(f"{out}/student")  # its checkpoints belong to another set or config: never resume from them
        run_train(student_training(cfg, out))
        write_record(f"{out}/student", {"key": keys["student"]})
    reports, failures = [], []
    for name, gen in evaluation_runs(cfg, out).items():
        _stage(f"evaluate {name}")
        if name == "student" and not _made_from(gen.output, keys["student"], "run.json"):
            _clear(gen.output)  # rows of an earlier student
        attempt = run_generate(_budgeted(cfg, gen, out))
        if name == "student":
            write_record(gen.output, {"key": keys["student"]})
        reports.append({"name": name, **evaluate_run(gen.output)})
        try:
            check_failed_rows(gen, attempt)
        except RowsFailed as e:
            failures.append(f"evaluation run {name}: {e}")
    summary = write_report(cfg, out, reports)
    if failures:
        raise RowsFailed("; ".join(failures))
    return summary


def _budgeted(cfg: PipelineConfig, gen: GenerateConfig, out: str) -> GenerateConfig:
    """`budget_usd` holds for the pipeline as a whole: each run gets what its other runs have not spent
    (BudgetReached, exit 4, stops the pipeline where a run reaches it)."""
    if cfg.budget_usd is None:
        return gen
    outputs = [f"{out}/teacher", *(run.output for run in evaluation_runs(cfg, out).values())]
    return within_budget(gen, cfg.budget_usd, outputs)


def stage_keys(cfg: PipelineConfig, out: str, teacher: GenerateConfig) -> dict[str, str]:
    """What the set and the student are made from: the teacher run's identity and its rows' content (a
    re-run that retried failed rows changes them), the variant; the training settings and the set."""
    distill = fingerprint({"teacher": generate_settings(teacher, {}), "rows": run_digest(teacher.output),
                           "variant": cfg.variant})
    return {"distill": distill,
            "student": fingerprint({"set": distill, "train": train_settings(student_training(cfg, out))})}


def _made_from(folder: str, key: str, output: str) -> bool:
    record = read_record(folder)
    return bool(record) and record.get("key") == key and storage.exists(storage.join(folder, output))


def _clear(folder: str) -> None:
    if storage.exists(folder):
        console.say(f"[pipeline] {folder} was made from other inputs: removing it")
        storage.delete_folder(folder)


def teacher_run(cfg: PipelineConfig, output: str) -> GenerateConfig:
    """S_D-T needs decompositions only; S_D-R needs them solved and scored."""
    solve = cfg.variant == "sd-r"
    return GenerateConfig(
        task=cfg.train_task,
        strategy="two_stage" if solve else "decompose",
        output=output,
        decomposer=cfg.teacher_decomposer,
        solver=cfg.teacher_solver if solve else None,
        num_samples=cfg.num_samples,
        max_subquestions=cfg.max_subquestions,
        max_failed_rows=cfg.max_failed_rows,
        progress_interval_s=cfg.progress_interval_s,
        ray=cfg.ray,
    )


def student_training(cfg: PipelineConfig, out: str) -> TrainConfig:
    fields = cfg.student.model_dump() | {"train_set": f"{out}/distill", "variant": cfg.variant, "output": f"{out}/student"}
    return TrainConfig.model_validate(fields | {"ray": cfg.ray.model_dump()})


def evaluation_runs(cfg: PipelineConfig, out: str) -> dict[str, GenerateConfig]:
    """Direct, teacher/teacher, base student/teacher and trained student/teacher on the held-out questions."""
    decoding = cfg.student_decomposer.model_dump()
    decomposers = {
        "teacher": cfg.teacher_decomposer,
        "base-student": decoding | {"model": cfg.student.model},
        "student": decoding | {"model": f"{out}/student/model"},
    }
    common = {"task": cfg.eval_task, "solver": cfg.teacher_solver, "max_subquestions": cfg.max_subquestions,
              "max_failed_rows": cfg.max_failed_rows, "progress_interval_s": cfg.progress_interval_s, "ray": cfg.ray}
    runs = {"direct": GenerateConfig(strategy="direct", output=f"{out}/eval/direct", **common)}
    for name, decomposer in decomposers.items():
        runs[name] = GenerateConfig(strategy="two_stage", output=f"{out}/eval/{name}", decomposer=decomposer, **common)
    return runs


def write_report(cfg: PipelineConfig, out: str, reports: list[dict]) -> dict:
    summary = {"config": cfg.model_dump(mode="json"), "runs": reports}
    parse = ["| decomposer run | decomposed rows | mean sub-questions | share with 1-"
             f"{cfg.max_subquestions} | share with none |", "|---|---|---|---|---|"]
    for r in reports:
        if r["subquestions"]:
            s = r["subquestions"]
            parse.append(f"| {r['name']} | {s['decomposed_rows']} | {s['mean']} | "
                         f"{s[f'share_1_to_{cfg.max_subquestions}']} | {s['share_none']} |")
    text = "\n\n".join(["# dnc pipeline report", markdown_table(reports), "## How the decompositions parse",
                        "\n".join(parse), "![cost vs accuracy](cost_vs_accuracy.png)"])
    storage.write_text(storage.join(out, "report.md"), text + "\n")
    storage.write_bytes(storage.join(out, "cost_vs_accuracy.png"), cost_vs_accuracy_png(reports))
    storage.write_text(storage.join(out, "report.json"), json.dumps(summary, indent=2))  # last: its presence means complete
    console.say(text)
    return summary


def cost_vs_accuracy_png(reports: list[dict]) -> bytes:
    """Score against $ per 1,000 questions (tokens per question when every price is 0); the labels sit in a
    column beside the plot, never over each other (dnc_ray/study/report.py)."""
    from dnc_ray.study.report import cost_vs_score_figure, png

    priced = any(r["cost_usd"] > 0 for r in reports)
    points = []
    for r in reports:
        tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in r["usage"].values())
        x = r["cost_usd_per_1k_rows"] if priced else tokens / max(r["rows"], 1)
        points.append((r["name"], x, next(iter(r["scores"].values()), 0.0)))
    x_label = "$ per 1,000 questions" if priced else "tokens per question (all prices 0)"
    return png(cost_vs_score_figure({"cost vs accuracy": {"points": points, "x_label": x_label,
                                                          "y_label": "score (%)"}}))


def _stage(name: str) -> None:
    console.say(f"[pipeline] === {name} ===")

