"""The row that flows through every stage, as one fixed Arrow schema (so every Parquet part agrees)."""

from __future__ import annotations

import pyarrow as pa

STAGE_USAGE = pa.struct(
    [
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("latency_s", pa.float64()),
        ("cost_usd", pa.float64()),
        ("calls", pa.int64()),  # model calls (self_ask: one per turn or follow-up answer)
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample", pa.int32()),  # which of the num_samples decompositions of this question
        ("task", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("context", pa.string()),
        ("answers", pa.list_(pa.list_(pa.string()))),
        ("decomposition", pa.string()),  # the decomposer's raw text
        ("subquestions", pa.list_(pa.string())),
        ("decomposer", pa.string()),
        ("solution", pa.string()),
        ("prediction", pa.string()),
        ("solver", pa.string()),
        ("usage", pa.struct([("decompose", STAGE_USAGE), ("solve", STAGE_USAGE)])),
        ("score", pa.float64()),
        ("correct", pa.bool_()),
        ("error", pa.string()),
    ]
)


def new_row(loaded: dict, sample: int = 0) -> dict:
    """A full row from a loader's row (id, task, split, question, context, answers)."""
    row = {name: None for name in ROW_SCHEMA.names}
    row.update(loaded, sample=sample, usage={"decompose": None, "solve": None})
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def row_key(row: dict) -> tuple[str, int]:
    """What identifies a row across runs: resume and joins depend on it."""
    return row["id"], row["sample"]
