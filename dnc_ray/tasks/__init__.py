"""Benchmarks as rows {id, task, split, question, context, answers}, their scorers and prompt rules.

A task is one file of this package defining `TASK = Task(...)` (dnc_ray.tasks.task); adding one
means adding that file and naming its TASK in `TASKS` below. `records` (a user's own file) is not
in TASKS: it takes its score, metrics and prompt rules from the task named by its `metric`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from dnc_ray.tasks import bamboogle, drop, gsm8k, records
from dnc_ray.tasks.common import TaskError, check_split
from dnc_ray.tasks.task import PromptRules, Task, demonstrations

if TYPE_CHECKING:  # dnc_ray.config imports this package: no runtime import back
    from dnc_ray.config import TaskConfig

__all__ = ["GENERIC_RULES", "RECORDS", "TASKS", "PromptRules", "Task", "TaskError", "get_task", "held_out", "load_rows",
           "scorer"]

TASKS: dict[str, Task] = {t.name: t for t in (gsm8k.TASK, drop.TASK, bamboogle.TASK)}

RECORDS = "records"  # the task name of a user's own file (dnc_ray.tasks.records)

# For requests that name no task: the usual cap, and one self-ask demonstration of each task's style.
GENERIC_RULES = PromptRules(
    max_subquestions=3,
    self_ask_examples="\n\n".join(
        demonstrations(t.rules.self_ask_examples)[0] for t in (gsm8k.TASK, drop.TASK, bamboogle.TASK)
    ),
)


def get_task(cfg: TaskConfig) -> Task:
    """The configured task; records get a Task of their own loader and their metric task's rest."""
    if cfg.name != RECORDS:
        return TASKS[cfg.name]
    like = TASKS[cfg.metric]
    return replace(
        like,
        name=RECORDS,
        splits=(cfg.split,),  # a user's file is whatever split its config calls it
        load=lambda split, path: records.load(path, cfg.fields, split),
    )


def load_rows(cfg: TaskConfig) -> list[dict]:
    """The task's rows (cfg.path replacing the bundled file when set), cfg.limit of them from cfg.offset."""
    task = get_task(cfg)
    check_split(task.name, cfg.split, task.splits)
    rows = task.load(cfg.split, cfg.path)
    holdout = getattr(cfg, "holdout", None)
    if holdout is not None:
        rows = [r for r in rows if held_out(r, holdout.folds, holdout.by) == (holdout.part == "test")]
    end = cfg.offset + cfg.limit if cfg.limit else None
    return rows[cfg.offset : end]


def held_out(row: dict, folds: int, by: str = "id") -> bool:
    """The fixed hash split (TaskConfig.holdout): held out when sha256 of the row's id (or passage) is 0 mod folds."""
    key = row["context"] if by == "context" and row.get("context") else row["id"]
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % folds == 0


def scorer(cfg: TaskConfig) -> Callable[[str, list[list[str]]], tuple[float, bool]]:
    """(prediction, answers) -> (score, correct) for the task; records use cfg.metric's."""
    return get_task(cfg).score
