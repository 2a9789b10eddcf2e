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
from dnc_ray.tasks.task import PromptRules, Task

SPLITS = ("train", "test")

# Self-ask demonstrations (original text of this project): each intermediate answer is one calculation.
SELF_ASK_EXAMPLES = """\
Question: A baker makes 4 trays of muffins with 12 muffins on each tray. She sells 29 muffins in the morning. How many muffins does she have left?
Are follow up questions needed here: Yes.
Follow up: How many muffins does the baker make?
Intermediate answer: 4 x 12 = 48 muffins.
Follow up: How many muffins are left after she sells 29?
Intermediate answer: 48 - 29 = 19 muffins.
So the final answer is: 19

Question: Tom reads 15 pages of a book on each weekday and 25 pages on each day of the weekend. How many pages does he read in one week?
Are follow up questions needed here: Yes.
Follow up: How many pages does Tom read on the 5 weekdays?
Intermediate answer: 5 x 15 = 75 pages.
Follow up: How many pages does he read on the 2 days of the weekend?
Intermediate answer: 2 x 25 = 50 pages.
Follow up: How many pages does he read in the whole week?
Intermediate answer: 75 + 50 = 125 pages.
So the final answer is: 125

Question: A school orders 6 boxes of pencils with 24 pencils in each box. The pencils are shared equally among 9 classrooms. How many pencils does each classroom get?
Are follow up questions needed here: Yes.
Follow up: How many pencils does the school order?
Intermediate answer: 6 x 24 = 144 pencils.
Follow up: How many pencils does each of the 9 classrooms get?
Intermediate answer: 144 / 9 = 16 pencils.
So the final answer is: 16

Question: Maria buys 3 notebooks that cost $4 each and a backpack that costs $27. She pays with a $50 bill. How much change does she get?
Are follow up questions needed here: Yes.
Follow up: How much do the notebooks cost?
Intermediate answer: 3 x 4 = 12 dollars.
Follow up: How much do the notebooks and the backpack cost together?
Intermediate answer: 12 + 27 = 39 dollars.
Follow up: How much change does she get from $50?
Intermediate answer: 50 - 39 = 11 dollars.
So the final answer is: 11"""


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


TASK = Task(
    name="gsm8k",
    splits=SPLITS,
    load=load,
    score=score,
    metrics={"em": "correct"},
    rules=PromptRules(self_ask_examples=SELF_ASK_EXAMPLES),
)
