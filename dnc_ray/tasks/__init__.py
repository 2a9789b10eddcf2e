"""Benchmarks as rows {id, task, split, question, context, answers}, their scorers and prompt rules.

A task is one file of this package defining `TASK = Task(...)` (dnc_ray.tasks.task); adding one
means adding that file and naming its TASK in `TASKS` below. `records` (a user's own file) is not
in TASKS: it takes its score, metrics and prompt rules from the task named by its `metric`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from dnc_ray.tasks import bamboogle, drop, gsm8k, records
from dnc_ray.tasks.common import TaskError, check_split
from dnc_ray.tasks.task import PromptRules, Task, demonstrations

__all__ = ["GENERIC_RULES", "RECORDS", "TASKS", "HoldOut", "PromptRules", "Task", "TaskConfig", "TaskError", "get_task",
           "held_out", "load_rows", "scorer"]

TASKS: dict[str, Task] = {t.name: t for t in (gsm8k.TASK, drop.TASK, bamboogle.TASK)}

RECORDS = "records"  # the task name of a user's own file (dnc_ray.tasks.records)

# For requests that name no task: the usual cap, and one self-ask demonstration of each task's style.
GENERIC_RULES = PromptRules(
    max_subquestions=3,
    self_ask_examples="\n\n".join(
        demonstrations(t.rules.self_ask_examples)[0] for t in (gsm8k.TASK, drop.TASK, bamboogle.TASK)
    ),
)


class HoldOut(BaseModel):
    """A fixed split of one file: a row is held out (part `test`) when sha256 of its id (or of its passage,
    `by: context`) is 0 modulo `folds`; part `train` is every other row. The same rows on any machine, in any
    file order (held_out)."""

    model_config = ConfigDict(extra="forbid")

    part: Literal["train", "test"]
    folds: int = Field(5, ge=2, description="one row in `folds` (in expectation) is held out")
    by: Literal["id", "context"] = Field("id", description="context: a passage's questions fall on one side (DROP)")


class TaskConfig(BaseModel):
    """The `task:` section of a config: which task, which file, which rows."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a task of dnc_ray.tasks.TASKS (gsm8k, drop, bamboogle), or records")
    split: str = "test"
    path: str | None = Field(None, description="local JSONL/Parquet replacing the bundled data")
    offset: int = Field(0, ge=0, description="skip the first N rows (e.g. to hold questions out)")
    limit: int | None = Field(None, gt=0, description="first N rows (after offset) only")
    fields: dict[str, str] | None = Field(
        None, description="records only: row field -> column in the file (question, answers, context, id)"
    )
    metric: str | None = Field(
        None, description="records only: the task whose metric and prompt rules the records take"
    )
    holdout: HoldOut | None = Field(
        None, description="one side of a fixed hash split of the file (e.g. Bamboogle, which has no train split); "
        "applied before offset and limit"
    )

    @model_serializer(mode="wrap")
    def _no_holdout_key_when_unset(self, handler):
        data = handler(self)
        if isinstance(data, dict) and "holdout" in data and data["holdout"] is None:
            del data["holdout"]  # run identities stored before the field existed still match
        return data

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        if name not in TASKS and name != RECORDS:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join([*TASKS, RECORDS])}")
        return name

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str | None) -> str | None:
        if metric is not None and metric not in TASKS:
            raise ValueError(f"unknown metric {metric!r}: name a task, one of {', '.join(TASKS)}")
        return metric

    @model_validator(mode="after")
    def _records_need_path_and_metric(self) -> "TaskConfig":
        if self.name == "records" and (self.path is None or self.metric is None):
            raise ValueError("task records needs `path` and `metric`")
        if self.name != "records" and (self.fields or self.metric):
            raise ValueError("`fields` and `metric` are for task records only")
        return self


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
