"""Prompts, sub-question parsing and answer extraction: hand-written edge cases, then real SmolLM2 outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dnc_ray.method import prompts
from dnc_ray.method.prompts import NO_DECOMPOSITION, extract_answer, format_subquestions, parse_subquestions

RECORDED = json.loads((Path(__file__).parent / "data" / "smollm2_outputs.json").read_text())


# --- parse_subquestions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "1. How many eggs are left?",
        "1) How many eggs are left?",
        "(1) How many eggs are left?",
        "- How many eggs are left?",
        "* How many eggs are left?",
        "\u2022 How many eggs are left?",
        "Sub-question 1: How many eggs are left?",
        "Subquestion 2. How many eggs are left?",
        "**Q2:** How many eggs are left?",
        "Q3) How many eggs are left?",
        "### How many eggs are left?",
        "  2.   How many eggs are left?  ",
        "**How many eggs are left?**",
    ],
)
def test_enumeration_marks_are_stripped(line):
    assert parse_subquestions(line) == ["How many eggs are left?"]


def test_numbers_that_open_a_question_are_kept():
    assert parse_subquestions("1.5 times 4 is what?\n10:30 is how many minutes past 10?") == [
        "1.5 times 4 is what?",
        "10:30 is how many minutes past 10?",
    ]
    assert parse_subquestions("1. 2.5 is what percent of 10?") == ["2.5 is what percent of 10?"]


def test_lines_without_a_question_mark_are_ignored():
    text = "Let me break this down.\n1. How many eggs are laid?\n2. She eats three.\n3. How many are sold?\n"
    assert parse_subquestions(text) == ["How many eggs are laid?", "How many are sold?"]


@pytest.mark.parametrize("text", [NO_DECOMPOSITION, "No decomposition.", "  No decomposition  \n", "", "\n \n\t\n"])
def test_no_decomposition_and_blank_give_nothing(text):
    assert parse_subquestions(text) == []


def test_restatements_of_the_main_question_are_dropped():
    text = (
        "Main question: How much does Janet make?\n"
        "1. How many eggs are left?\n"
        "The original question asks: how much does she earn?\n"
        "2. What is the complex question here?\n"
        "3. How much is each egg?"
    )
    assert parse_subquestions(text) == ["How many eggs are left?", "How much is each egg?"]


def test_duplicates_are_dropped_in_order():
    text = "1. How many eggs?\n2. How much per egg?\n3. How many eggs?\n- How much per egg?"
    assert parse_subquestions(text) == ["How many eggs?", "How much per egg?"]


def test_format_then_parse_round_trips():
    subquestions = ["How many eggs are left?", "How much is 9 * 2?"]
    assert parse_subquestions(format_subquestions(subquestions)) == subquestions
    assert format_subquestions([]) == NO_DECOMPOSITION
    assert parse_subquestions(format_subquestions([])) == []


# --- extract_answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, answer",
    [
        ("The answer is: 5\nWait, let me redo it.\nThe answer is: 7", "7"),  # last marker wins
        ("so THE ANSWER IS 12", "12"),  # case-insensitive
        ("the answer is: Paris", "Paris"),
        ("The answer is: **42**.", "42"),  # ":" and "**" and "." trimmed
        ("**The answer is:** 42", "42"),
        ("The answer is $18.", "$18"),
        ("The answer is: 3.5.", "3.5"),
        ("The answer is: Paris.\nI hope this helps!\n", "Paris"),  # text after the answer line ignored
        ("Step 1: 16 - 3 - 4 = 9\n\n9 * 2 = 18\n\n", "9 * 2 = 18"),  # no marker: last non-empty line
        ("18", "18"),
        ("", ""),
        ("The answer is", ""),
    ],
)
def test_extract_answer(solution, answer):
    assert extract_answer(solution) == answer


# --- the prompts carry the paper's rules -----------------------------------------------------


def _content(messages) -> str:
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return messages[0]["content"]


def test_decompose_prompt():
    text = _content(prompts.decompose_messages("How much does Janet make?", None, max_subquestions=2))
    assert "at most 2" in text and f'"{NO_DECOMPOSITION}"' in text
    assert "Context:" not in text
    assert text.endswith("Question: How much does Janet make?")
    assert "at most 3" in _content(prompts.decompose_messages("Q?", None))


def test_drop_prompts_carry_the_passage_and_the_five_word_rule():
    passage = "The Bears scored twice in the first quarter."
    decompose = _content(prompts.decompose_messages("How many times?", passage))
    assert f"Context: {passage}" in decompose
    assert decompose.index("Context:") < decompose.index("Question: How many times?")

    solve = _content(prompts.solve_messages("How many times?", passage, ["Who scored?"], short_answer=True))
    assert f"Context: {passage}" in solve and "at most five words" in solve

    direct = _content(prompts.direct_messages("How many times?", passage))
    assert f"Context: {passage}" in direct and "at most five words" in direct
    assert direct.endswith("Question: How many times?")


def test_solve_prompt_numbers_subquestions_on_one_line():
    text = _content(prompts.solve_messages("How much?", None, ["How many eggs?", "How much each?"]))
    assert "Sub-questions: 1. How many eggs? 2. How much each?\n" in text
    assert '"The answer is: X"' in text and "five words" not in text and "Context:" not in text
    assert text.index("Sub-questions:") < text.index("Question: How much?")
    assert "Sub-questions: (none)" in _content(prompts.solve_messages("How much?", None, []))


def test_direct_prompts():
    assert prompts.direct_messages("Who was president when the Eiffel Tower opened?", None, bare=True) == [
        {"role": "user", "content": "Who was president when the Eiffel Tower opened?"}
    ]
    gsm8k = _content(prompts.direct_messages("How much?", None))
    assert '"The answer is: X"' in gsm8k and gsm8k.endswith("Question: How much?")


# --- recorded real outputs of the bundled SmolLM2-135M-Instruct --------------------------------
# SmolLM2-135M does not really decompose: it restates facts of the problem as a numbered list
# (no "?"), writes "No decomposition." and echoes the question, or repeats the main question as
# "Question: ..." / "Sub-Question: ..."; both prefixes are stripped, so the echoes collapse into one.

Q4 = "How many cups of feed does Wendi need to give her chickens in the final meal of the day if the size of her flock is 20 chickens?"
Q5 = "How many glasses of Kylar's new apartment will he need to pay for?"
Q5B = "How many seconds of time will it take for Kylar to pay his 16th glass of Kylar's new apartment?"
Q6 = "How many sheep do Toulouse, Charleston, and Seattle have together if Seattle has 20 sheep?"

EXPECTED_SUBQUESTIONS = [
    [],  # 0: five numbered statements, none with "?"
    [],  # 1: restates the problem as one statement
    [  # 2: "No decomposition." then an echo of the (paraphrased) question
        "Josh decides to try flipping a house. He buys a house for $80,000 and puts it in a new "
        "house for $50,000. This increased the value of the house by 150%.  How much profit did he make?"
    ],
    ["How many total meters does James run a week?"],  # 3: statements, then the question
    [Q4],  # 4: "Question: Q4" and "Sub-Question: Q4" are one sub-question
    [Q5, Q5B],  # 5
    [Q6],  # 6
    [],  # 7: restates the problem, then "The answer is 200 GB/minute."
]

# What extract_answer finds in each recorded solution; the 135M model gets none of the 8 golds right.
EXPECTED_ANSWERS = ["2", "2", "150", "180", "1", "5", "20", "20 GB"]


def test_recorded_file_matches_its_recipe():
    """The recording is of the first 8 GSM8K test questions as the bundled task loads them now, with their golds."""
    from dnc_ray.tasks import TaskConfig, load_rows

    assert RECORDED["model"] == "smollm2-135m-instruct"
    rows = load_rows(TaskConfig(name="gsm8k", split="test", limit=8))
    assert [d["question"] for d in RECORDED["decompositions"]] == [r["question"] for r in rows]
    assert [(s["question"], s["gold"]) for s in RECORDED["solutions"]] == [(r["question"], r["answers"][0][0]) for r in rows]


@pytest.mark.parametrize("index", range(8))
def test_parse_recorded_decomposition(index):
    assert parse_subquestions(RECORDED["decompositions"][index]["output"]) == EXPECTED_SUBQUESTIONS[index]


def test_share_of_recorded_decompositions_with_one_to_three_subquestions():
    counts = [len(parse_subquestions(d["output"])) for d in RECORDED["decompositions"]]
    assert counts == [0, 0, 1, 1, 1, 2, 1, 0]
    # 5 of 8 parse into 1-3 sub-questions, but every one of them is (a copy of) the main question
    assert sum(1 <= n <= 3 for n in counts) == 5


@pytest.mark.parametrize("index", range(8))
def test_extract_recorded_answer(index):
    assert extract_answer(RECORDED["solutions"][index]["output"]) == EXPECTED_ANSWERS[index]
