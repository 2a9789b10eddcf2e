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
from dnc_ray.tasks.task import PromptRules, Task

SPLITS = ("test",)

# Self-ask demonstrations (original text of this project): two-hop factual questions, and one
# that needs no follow-up.
SELF_ASK_EXAMPLES = """\
Question: Who was the British monarch when people first landed on the Moon?
Are follow up questions needed here: Yes.
Follow up: When did people first land on the Moon?
Intermediate answer: In July 1969.
Follow up: Who was the British monarch in July 1969?
Intermediate answer: Queen Elizabeth II.
So the final answer is: Elizabeth II

Question: In what city was the composer of the opera Carmen born?
Are follow up questions needed here: Yes.
Follow up: Who composed the opera Carmen?
Intermediate answer: Georges Bizet.
Follow up: In what city was Georges Bizet born?
Intermediate answer: Paris.
So the final answer is: Paris

Question: Who wrote the novel Pride and Prejudice?
Are follow up questions needed here: No.
So the final answer is: Jane Austen

Question: What is the currency of the country whose capital is Canberra?
Are follow up questions needed here: Yes.
Follow up: Which country has Canberra as its capital?
Intermediate answer: Australia.
Follow up: What is the currency of Australia?
Intermediate answer: The Australian dollar.
So the final answer is: the Australian dollar"""


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


TASK = Task(
    name="bamboogle",
    splits=SPLITS,
    load=load,
    score=score,
    metrics={"acc": "correct"},
    rules=PromptRules(max_subquestions=2, bare_direct_prompt=True, self_ask_examples=SELF_ASK_EXAMPLES),
)
