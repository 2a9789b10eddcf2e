"""The `reference` decomposer: GSM8K's human-written socratic sub-questions, no model call.

It fills the decomposition before the method runs; the method's decompose step then counts as done.
"""

from __future__ import annotations

import pyarrow as pa

from dnc_ray.method.prompts import format_subquestions
from dnc_ray.method.row import to_table
from dnc_ray.tasks import gsm8k

REFERENCE = "gsm8k-socratic-reference"


def reference_decompose(batch: pa.Table) -> pa.Table:
    """Each row's socratic sub-questions as its decomposition; a question without them fails."""
    reference = gsm8k.reference_subquestions()
    rows = batch.to_pylist()
    for row in rows:
        if row["error"] is not None or row["subquestions"] is not None:
            continue
        subquestions = reference.get(row["question"])
        row["decomposer"] = REFERENCE
        if subquestions is None:
            row["error"] = "decompose: no socratic reference for this question (GSM8K test only)"
            continue
        row["subquestions"] = subquestions
        row["decomposition"] = format_subquestions(subquestions)
    return to_table(rows)
