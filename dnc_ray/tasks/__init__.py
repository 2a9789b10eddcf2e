"""Benchmarks as rows {id, task, split, question, context, answers} and their scorers."""

from __future__ import annotations

from collections.abc import Callable

from dnc_ray.config import TaskConfig
from dnc_ray.tasks import bamboogle, drop, gsm8k, records
from dnc_ray.tasks.common import TaskError

__all__ = ["TaskError", "load_rows", "scorer"]

BENCHMARKS = {"gsm8k": gsm8k, "drop": drop, "bamboogle": bamboogle}


def load_rows(cfg: TaskConfig) -> list[dict]:
    """The task's rows (cfg.path replacing the bundled file when set), cfg.limit of them from cfg.offset."""
    if cfg.name == "records":
        rows = records.load(cfg.path, cfg.fields, cfg.split)
    else:
        rows = BENCHMARKS[cfg.name].load(cfg.split, cfg.path)
    end = cfg.offset + cfg.limit if cfg.limit else None
    return rows[cfg.offset : end]


def scorer(cfg: TaskConfig) -> Callable[[str, list[list[str]]], tuple[float, bool]]:
    """(prediction, answers) -> (score, correct) for the task; records use cfg.metric's."""
    return BENCHMARKS[cfg.metric if cfg.name == "records" else cfg.name].score
