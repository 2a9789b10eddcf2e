"""Bamboogle (Press et al. 2022): 125 two-hop questions that search engines answer wrongly."""

from __future__ import annotations

from dnc_ray.metrics import bamboogle_acc
from dnc_ray.tasks.common import (
    DATA_DIR,
    check_split,
    check_type,
    field,
    make_row,
    read_records,
)

SPLITS = ("test",)


def load(split: str, path: str | None) -> list[dict]:
    check_split("bamboogle", split, SPLITS)
    path = path or DATA_DIR / "bamboogle" / "bamboogle.jsonl"
    rows = []
    for number, where, raw in read_records(path):
        id = field(raw, "id", (int, str), where)
        question = field(raw, "question", str, where)
        alternatives = check_type(raw.get("alt_answers", []), "alt_answers", list, where)
        answers = [field(raw, "answer", str, where)] + [check_type(a, "alt_answers", str, where) for a in alternatives]
        rows.append(make_row(f"bamboogle-{id}", "bamboogle", split, question, None, [[a] for a in answers]))
    return rows


def score(prediction: str, answers: list[list[str]]) -> tuple[float, bool]:
    value = bamboogle_acc(prediction, answers)
    return value, value == 1.0
