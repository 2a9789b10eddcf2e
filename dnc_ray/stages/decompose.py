"""Decompose stage: the decomposer writes sub-questions (or "No decomposition") for each row."""

from __future__ import annotations

import pyarrow as pa

from dnc_ray.llm import Completion, Messages
from dnc_ray.prompts import decompose_messages, format_subquestions, parse_subquestions
from dnc_ray.stages.rows import to_table
from dnc_ray.tasks import gsm8k

REFERENCE = "gsm8k-socratic-reference"


def decompose_chat(row: dict, max_subquestions: int) -> Messages:
    return decompose_messages(row["question"], row["context"], max_subquestions)


def record_decomposition(row: dict, completion: Completion) -> None:
    row["decomposition"] = completion.text
    row["subquestions"] = parse_subquestions(completion.text)


def reference_decompose(batch: pa.Table) -> pa.Table:
    """GSM8K's human-written socratic sub-questions as the decomposition (no model call)."""
    reference = gsm8k.reference_subquestions()
    rows = batch.to_pylist()
    for row in rows:
        subquestions = reference.get(row["question"])
        row["decomposer"] = REFERENCE
        if subquestions is None:
            row["error"] = "decompose: no socratic reference for this question (GSM8K test only)"
            continue
        row["subquestions"] = subquestions
        row["decomposition"] = format_subquestions(subquestions)
    return to_table(rows)
