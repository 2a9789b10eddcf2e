"""GSM8K (Cobbe et al. 2021): grade-school maths word problems, gold = the number after "####"."""

from __future__ import annotations

import functools

from dnc_ray.metrics import gsm8k_em
from dnc_ray.tasks.common import (
    DATA_DIR,
    TaskError,
    check_split,
    field,
    make_row,
    read_records,
)

SPLITS = ("train", "test")


def load(split: str, path: str | None) -> list[dict]:
    check_split("gsm8k", split, SPLITS)
    path = path or DATA_DIR / "gsm8k" / f"{split}.jsonl"
    rows = []
    for number, where, raw in read_records(path):
        question = field(raw, "question", str, where)
        gold = _gold(field(raw, "answer", str, where), where)
        rows.append(make_row(f"gsm8k-{split}-{number - 1}", "gsm8k", split, question, None, [[gold]]))
    return rows


def _gold(answer: str, where: str) -> str:
    if "####" not in answer:
        raise TaskError(f'{where}: field "answer": no "#### <number>" line')
    return answer.rsplit("####", 1)[1].replace(",", "").strip()


def score(prediction: str, answers: list[list[str]]) -> tuple[float, bool]:
    value = gsm8k_em(prediction, answers)
    return value, value == 1.0


def reference_subquestions(split: str = "test") -> dict[str, list[str]]:
    """Question text -> the human-written sub-questions of GSM8K's socratic variant."""
    if split != "test":
        raise TaskError(f"GSM8K reference sub-questions exist for split test only (no socratic {split} file bundled)")
    return _socratic_test()


@functools.cache
def _socratic_test() -> dict[str, list[str]]:
    path = DATA_DIR / "gsm8k" / "test_socratic.jsonl"
    subquestions = {}
    for number, where, raw in read_records(path):
        lines = field(raw, "answer", str, where).split("\n")
        steps = [line.split(" ** ", 1)[0].strip() for line in lines if " ** " in line and not line.startswith("####")]
        subquestions[field(raw, "question", str, where)] = steps
    return subquestions
