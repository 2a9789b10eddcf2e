"""Solve stage: the solver answers with the sub-questions (two stage) or alone (direct)."""

from __future__ import annotations

from dnc_ray.llm import Completion, Messages
from dnc_ray.prompts import direct_messages, extract_answer, solve_messages


def solve_chat(row: dict) -> Messages:
    if row["subquestions"] is None:
        raise ValueError("solve: the row has no decomposition")
    return solve_messages(row["question"], row["context"], row["subquestions"])


def direct_chat(row: dict) -> Messages:
    return direct_messages(row["question"], row["context"], row["task"])


def record_solution(row: dict, completion: Completion) -> None:
    row["solution"] = completion.text
    row["prediction"] = extract_answer(completion.text)
