"""`dnc evaluate`: score a run's rows and report score, tokens and $ per stage, errors and rows/s."""

from __future__ import annotations

import json

from dnc_ray.config import GenerateConfig
from dnc_ray.infra import storage
from dnc_ray.stages.score import score_rows
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import get_task, scorer

STAGES = ("decompose", "solve")


def evaluate_run(uri: str) -> dict:
    """Re-score the run's rows with the current metrics and write report.json / report.md into it."""
    store = RunStore(uri)
    if not store.exists():
        raise FileNotFoundError(f"{uri}: no run here (run.json missing)")
    meta = store.read_meta()
    cfg = GenerateConfig.model_validate(meta["config"])
    rows = store.read_rows()
    if cfg.strategy != "decompose":
        score_rows(rows, scorer(cfg.task))
    report = summarize(cfg, rows, meta["attempts"])
    storage.write_text(storage.join(uri, "report.json"), json.dumps(report, indent=2))
    storage.write_text(storage.join(uri, "report.md"), markdown_table([report]) + "\n")
    return report


def summarize(cfg: GenerateConfig, rows: list[dict], attempts: list[dict]) -> dict:
    n = len(rows)
    elapsed = sum(a["elapsed_s"] for a in attempts)
    report = {
        "run": cfg.output,
        "task": f"{cfg.task.name}/{cfg.task.split}",
        "strategy": cfg.strategy,
        "decomposer": _model_name(cfg.decomposer, rows, "decomposer"),
        "solver": _model_name(cfg.solver, rows, "solver"),
        "rows": n,
        "errors": sum(r["error"] is not None for r in rows),
        "rows_per_s": round(sum(a["rows"] for a in attempts) / elapsed, 3) if elapsed else None,
        "scores": {},
        "usage": {stage: _stage_usage(rows, stage) for stage in STAGES},
        "subquestions": _subquestion_stats(rows, cfg.max_subquestions),
    }
    if cfg.strategy != "decompose":
        # the task's metrics, report name -> row column: mean(correct) is EM/accuracy, mean(score) DROP's F1
        report["scores"] = {
            name: round(100 * sum(float(r[col] or 0) for r in rows) / n, 2) if n else 0.0
            for name, col in get_task(cfg.task).metrics.items()
        }
    usage = report["usage"].values()
    report["cost_usd"] = round(sum(u["cost_usd"] for u in usage), 6)
    report["cost_usd_per_1k_rows"] = round(1000 * report["cost_usd"] / n, 4) if n else 0.0
    # static vs dynamic (the paper: 355K tokens for two_stage vs 824K for self_ask per GSM8K test)
    report["tokens_per_question"] = round(sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage) / n, 2) if n else 0.0
    report["calls_per_question"] = round(sum(u["calls"] for u in usage) / n, 2) if n else 0.0
    return report


def _model_name(model, rows: list[dict], column: str) -> str | None:
    names = {r[column] for r in rows if r[column]}
    return ", ".join(sorted(names)) or (getattr(model, "model", None) or getattr(model, "engine", None))


def _stage_usage(rows: list[dict], stage: str) -> dict:
    used = [r["usage"][stage] for r in rows if r["usage"] and r["usage"][stage]]
    total = {key: sum(u[key] or 0 for u in used) for key in ("prompt_tokens", "completion_tokens", "cost_usd", "calls")}
    total["cost_usd"] = round(total["cost_usd"], 6)
    total["mean_latency_s"] = round(sum(u["latency_s"] for u in used) / len(used), 3) if used else None
    return total


def _subquestion_stats(rows: list[dict], max_subquestions: int) -> dict | None:
    """How decompositions parse: mean count and the share with 1..max sub-questions."""
    counts = [len(r["subquestions"]) for r in rows if r["subquestions"] is not None]
    if not counts:
        return None
    in_range = sum(1 <= c <= max_subquestions for c in counts)
    return {
        "decomposed_rows": len(counts),
        "mean": round(sum(counts) / len(counts), 2),
        f"share_1_to_{max_subquestions}": round(in_range / len(counts), 3),
        "share_none": round(sum(c == 0 for c in counts) / len(counts), 3),
    }


def markdown_table(reports: list[dict]) -> str:
    """One line per run: score, errors, tokens and $ per stage, rows/s."""
    head = (
        "| run | task | strategy | decomposer | solver | rows | errors | score | "
        "decompose tokens in/out | solve tokens in/out | tokens / question | calls / question | $ total | $ / 1k rows | rows/s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        scores = " / ".join(f"{k.upper()} {v:.1f}" for k, v in r["scores"].items()) or "-"
        tokens = [f"{r['usage'][s]['prompt_tokens']}/{r['usage'][s]['completion_tokens']}" for s in STAGES]
        lines.append(
            f"| {r['run']} | {r['task']} | {r['strategy']} | {r['decomposer'] or '-'} | {r['solver'] or '-'} | "
            f"{r['rows']} | {r['errors']} | {scores} | {tokens[0]} | {tokens[1]} | "
            f"{r['tokens_per_question']:.0f} | {r['calls_per_question']:.2f} | "
            f"{r['cost_usd']:.4f} | {r['cost_usd_per_1k_rows']:.4f} | {r['rows_per_s'] or '-'} |"
        )
    return "\n".join(lines)
