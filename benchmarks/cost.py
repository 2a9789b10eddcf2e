"""Cost: tokens and $ per 1000 questions for direct, teacher/teacher, student-decomposer/teacher and
teacher/student-solver, from real evaluation runs on the same questions, beside the paper's figures.

The models and their prices come from benchmarks/cost.yaml. A student decomposer that does not exist
yet is trained first by the `dnc pipeline` config the file names (completed stages are reused).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from benchmarks.report import plt, save_figure, table
from dnc_ray.config import GenerateConfig, PipelineConfig, load_config
from dnc_ray.evaluate import evaluate_run
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.configs import HFModel, ModelConfig
from dnc_ray.pipeline import run_pipeline
from dnc_ray.stages.generate import run_generate
from dnc_ray.tasks import TaskConfig

CONFIG = Path(__file__).parent / "cost.yaml"
TINY_MODEL = {"model": "tiny-random-smollm2", "max_tokens": 8}

# paper-notes.md: GSM8K test (1319 questions), GPT-3.5 at $0.001 / $0.002 per 1K tokens, the 13B
# student at GPT x 13/175. Decomposition $0.13 (GPT) vs $0.01 (S_D-R); solving $0.63 vs $0.60;
# GPT/GPT used 355K tokens in all. Per 1000 questions:
PAPER_PER_1K = {
    "teacher/teacher": {"decompose_usd": round(0.13 / 1.319, 4), "solve_usd": round(0.63 / 1.319, 4),
                        "tokens": round(355_000 / 1.319), "gsm8k_em": 65.13},
    "student/teacher": {"decompose_usd": round(0.01 / 1.319, 4), "solve_usd": round(0.60 / 1.319, 4),
                        "gsm8k_em": 67.78},
    "direct": {"gsm8k_em": 20.32},
    "teacher/student-solver": {"gsm8k_em": 48.98},
}


class CostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskConfig
    student_pipeline: str | None = None  # a `dnc pipeline` config that trains student_decomposer
    teacher: ModelConfig
    student_decomposer: ModelConfig
    student_solver: ModelConfig


def setups(cfg: CostConfig) -> dict[str, dict]:
    """(strategy, decomposer, solver) of each set-up, the paper's names."""
    return {
        "direct": {"strategy": "direct", "solver": cfg.teacher},
        "teacher/teacher": {"strategy": "two_stage", "decomposer": cfg.teacher, "solver": cfg.teacher},
        "student/teacher": {"strategy": "two_stage", "decomposer": cfg.student_decomposer, "solver": cfg.teacher},
        "teacher/student-solver": {"strategy": "two_stage", "decomposer": cfg.teacher, "solver": cfg.student_solver},
    }


def ensure_student(cfg: CostConfig) -> None:
    """Run the student pipeline when the student decomposer is the model it trains and that is missing."""
    if cfg.student_pipeline is None or not isinstance(cfg.student_decomposer, HFModel):
        return
    pipeline = load_config(cfg.student_pipeline, PipelineConfig)
    trained = f"{pipeline.output}/student/model"
    if os.path.abspath(cfg.student_decomposer.model) == os.path.abspath(trained) and not os.path.exists(f"{trained}/config.json"):
        print(f"[bench] cost: {trained} is missing; training it: dnc pipeline --config {cfg.student_pipeline}", flush=True)
        run_pipeline(pipeline)


def per_1k(report: dict) -> dict:
    """Tokens and $ per 1000 questions, per stage and in all, and the score."""
    scale = 1000 / report["rows"]
    usage = report["usage"]
    out = {f"{stage}_tokens": round(scale * (u["prompt_tokens"] + u["completion_tokens"])) for stage, u in usage.items()}
    out |= {f"{stage}_usd": round(scale * u["cost_usd"], 4) for stage, u in usage.items()}
    out["tokens"] = out["decompose_tokens"] + out["solve_tokens"]
    out["usd"] = round(out["decompose_usd"] + out["solve_usd"], 4)
    out["gsm8k_em"] = report["scores"].get("em")
    out["errors"] = report["errors"]
    return out


def load(size: str) -> CostConfig:
    cfg = load_config(CONFIG, CostConfig)
    if size == "tiny":  # the tiny random model in every role (prices kept), four questions, nothing to train
        roles = ("teacher", "student_decomposer", "student_solver")
        tiny = {role: HFModel(**getattr(cfg, role).model_dump() | TINY_MODEL) for role in roles}
        cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"limit": 4}), **tiny})
    return cfg


def run(size: str) -> dict:
    cfg = load(size)
    init_ray(num_cpus=4)
    ensure_student(cfg)
    measured = {}
    with tempfile.TemporaryDirectory(prefix="dnc-bench-cost-") as folder:
        for name, setup in setups(cfg).items():
            output = f"{folder}/{name.replace('/', '_')}"
            run_generate(GenerateConfig(task=cfg.task, output=output, progress_interval_s=60, **setup))
            measured[name] = per_1k(evaluate_run(output))
            print(f"[bench] cost {name}: {measured[name]}", flush=True)
    teacher_decompose = measured["teacher/teacher"]["decompose_usd"]
    return {
        "params": {"task": cfg.task.model_dump(exclude_none=True),
                   **{role: _describe(getattr(cfg, role)) for role in ("teacher", "student_decomposer", "student_solver")}},
        "per_1000_questions": measured,
        "paper_per_1000_questions": PAPER_PER_1K,
        "decompose_cost_ratio_teacher_vs_student": (
            round(teacher_decompose / measured["student/teacher"]["decompose_usd"], 1)
            if measured["student/teacher"]["decompose_usd"] else None),
    }


def _describe(model: ModelConfig) -> dict:
    return model.model_dump(include={"engine", "model", "price", "max_tokens"})


def render(result: dict, folder: Path) -> str:
    measured, paper = result["per_1000_questions"], result["paper_per_1000_questions"]
    rows = [{"set-up": name, "tokens": m["tokens"], "decompose $": m["decompose_usd"], "solve $": m["solve_usd"],
             "total $": m["usd"], "GSM8K EM": m["gsm8k_em"], "errors": m["errors"],
             "paper tokens": paper[name].get("tokens"), "paper decompose $": paper[name].get("decompose_usd"),
             "paper solve $": paper[name].get("solve_usd"), "paper EM": paper[name].get("gsm8k_em")}
            for name, m in measured.items()]
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(measured)
    decompose = [measured[n]["decompose_usd"] for n in names]
    ax.bar(names, decompose, label="decompose", color="#4878a8")
    ax.bar(names, [measured[n]["solve_usd"] for n in names], bottom=decompose, label="solve", color="#a8a848")
    ax.set_ylabel("$ per 1000 questions")
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend()
    p = result["params"]
    ratio = result["decompose_cost_ratio_teacher_vs_student"]
    return "\n\n".join([
        "Per 1000 questions; tokens are input + output over both stages, measured on the same questions. "
        f"Teacher: `{p['teacher']['model']}`, student decomposer: `{p['student_decomposer']['model']}`, "
        f"student solver: `{p['student_solver']['model']}`; prices in the parameters above. The EM columns "
        "are those of these models, the paper's of GPT-3.5 and its distilled Vicuna-13B students: compare "
        "tokens and $, not scores.",
        table(rows, list(rows[0])),
        f"Decomposing with the student costs {ratio}x less than with the teacher (paper: 13x).",
        save_figure(fig, folder, "cost"),
    ])
