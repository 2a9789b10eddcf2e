"""`dnc distill`: training sets from scored teacher runs (Wu et al. 2024, the distilled variants).

| variant | rows kept                                              | prompt            | target                  |
| sd-t    | every decomposition (identical ones per question once) | I_decomp + q      | sub-questions           |
| sd-r    | only decompositions whose solution scored correct      | I_decomp + q      | sub-questions           |
| se-t    | every solution                                         | I_ans + q + subqs | the teacher's solution  |
| se-a    | every solution                                         | I_ans + q + subqs | solution, gold answer   |
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from dnc_ray.config import VARIANTS, GenerateConfig
from dnc_ray.infra import storage
from dnc_ray.infra.errors import ConfigError
from dnc_ray.method.prompts import (
    decompose_messages,
    format_subquestions,
    replace_answer,
    solve_messages,
)
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import PromptRules, get_task

TRAIN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("variant", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("target", pa.string()),
    ]
)


DISTILLABLE = ("two_stage", "decompose", "solve")  # self_ask's follow-ups are not a decomposition the solver saw


def training_row(row: dict, variant: str, rules: PromptRules) -> tuple[dict | None, str | None]:
    """(training row, None) when the run row is kept for the variant, else (None, why dropped)."""
    if row["subquestions"] is None:
        return None, "no decomposition (decompose failed)"
    if variant in ("sd-t", "sd-r"):
        if variant == "sd-r" and not row["correct"]:
            return None, "solution not correct" if row["solution"] is not None else "not solved"
        prompt = decompose_messages(row["question"], row["context"], rules.max_subquestions)
        target = format_subquestions(row["subquestions"])
    else:
        if row["solution"] is None:
            return None, "no solution (solve failed)"
        prompt = solve_messages(row["question"], row["context"], row["subquestions"], rules.short_answer)
        gold = ", ".join(row["answers"][0])
        target = row["solution"] if variant == "se-t" else replace_answer(row["solution"], gold)
    return {"id": row["id"], "task": row["task"], "variant": variant, "prompt": prompt, "target": target}, None


def build_training_set(runs: list[str], variant: str, out: str) -> dict:
    """Write out/train.parquet and out/yield.json; returns the yield per task."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    kept, seen = [], set()
    totals, dropped = Counter(), defaultdict(Counter)
    for uri in runs:
        store = RunStore(uri)
        if not store.exists():
            raise FileNotFoundError(f"{uri}: no run here (run.json missing)")
        cfg = GenerateConfig.model_validate(store.read_meta()["config"])
        if cfg.strategy not in DISTILLABLE:
            raise ConfigError(f"{uri}: a {cfg.strategy} run has no static decompositions to distil: use a two_stage, "
                              "decompose or solve run")
        rules = replace(get_task(cfg.task).rules, max_subquestions=cfg.max_subquestions)
        if variant == "sd-r" and cfg.strategy == "decompose":
            raise ConfigError(f"{uri}: sd-r needs a scored two_stage run; this run only decomposed")
        for row in store.read_rows():
            totals[row["task"]] += 1
            item, why = training_row(row, variant, rules)
            if item is not None and (item["id"], item["target"]) in seen:
                item, why = None, "duplicate of a kept row"
            if item is None:
                dropped[row["task"]][why] += 1
                continue
            seen.add((item["id"], item["target"]))
            kept.append(item)
    report = {
        task: {"kept": total - sum(dropped[task].values()), "total": total, "dropped": dict(dropped[task])}
        for task, total in totals.items()
    }
    _write(out, pa.Table.from_pylist(kept, schema=TRAIN_SCHEMA), {"variant": variant, "runs": runs, "yield": report})
    return report


def _write(out: str, table: pa.Table, summary: dict) -> None:
    """Both files atomic: the pipeline reuses a train.parquet that exists, so it must never be a part of one."""
    parquet = pa.BufferOutputStream()
    pq.write_table(table, parquet)
    storage.write_bytes(storage.join(out, "train.parquet"), parquet.getvalue().to_pybytes())
    storage.write_text(storage.join(out, "yield.json"), json.dumps(summary, indent=2))


def yield_table(report: dict) -> str:
    lines = ["| task | kept | total | yield | dropped |", "|---|---|---|---|---|"]
    for task, y in report.items():
        why = ", ".join(f"{k}: {v}" for k, v in y["dropped"].items()) or "-"
        share = f"{100 * y['kept'] / y['total']:.1f}%" if y["total"] else "-"
        lines.append(f"| {task} | {y['kept']} | {y['total']} | {share} | {why} |")
    return "\n".join(lines)
