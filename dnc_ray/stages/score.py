"""Score stage: the task's metric on each solved row (score, correct)."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from dnc_ray.method.row import to_table

Scorer = Callable[[str, list[list[str]]], tuple[float, bool]]


def score_rows(rows: list[dict], scorer: Scorer) -> list[dict]:
    for row in rows:
        if row["prediction"] is None:
            row["score"], row["correct"] = None, None
        else:
            row["score"], row["correct"] = scorer(row["prediction"], row["answers"])
    return rows


def score_batch(batch: pa.Table, scorer: Scorer) -> pa.Table:
    return to_table(score_rows(batch.to_pylist(), scorer))
