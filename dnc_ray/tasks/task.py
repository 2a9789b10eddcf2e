"""What a task is: its loader, its metric, which row columns hold its metrics, and its prompt rules.

A task is one file in dnc_ray/tasks/ defining `TASK = Task(...)`, named once in the registry
`dnc_ray.tasks.TASKS`. Nothing here imports dnc_ray.config (which imports the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Loader = Callable[[str, "str | None"], list[dict]]
Scorer = Callable[[str, list[list[str]]], tuple[float, bool]]


@dataclass(frozen=True)
class PromptRules:
    """How the method's prompts treat a task's questions."""

    max_subquestions: int = 3  # the paper's cap: 2 on Bamboogle, 3 elsewhere
    bare_direct_prompt: bool = False  # Bamboogle's single-stage prompt is the question alone
    short_answer: bool = False  # DROP: answers of at most five words
    self_ask_examples: str = ""  # the few-shot demonstrations of the self_ask strategy, blank-line separated


@dataclass(frozen=True)
class Task:
    """A benchmark: `load(split, path or None)` -> rows, `score(prediction, answers)` -> (score, correct)."""

    name: str
    splits: tuple[str, ...]
    load: Loader
    score: Scorer
    metrics: dict[str, str]  # report name -> row column, e.g. {"em": "correct", "f1": "score"}
    rules: PromptRules


def demonstrations(examples: str) -> list[str]:
    """The self-ask demonstrations of `examples`, one string each (they are separated by blank lines)."""
    return [block.strip() for block in examples.strip().split("\n\n") if block.strip()]
