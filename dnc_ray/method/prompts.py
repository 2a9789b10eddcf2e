"""Every prompt of the method (decompose, solve, direct, self-ask), sub-question parsing and answer extraction.

The wording is ours; the structure follows Wu et al. 2024 (Divide-or-Conquer): the decomposer
writes at most N sub-questions or "No decomposition"; the solver answers the sub-questions one
by one, then the question, and ends with "The answer is: X".
"""

from __future__ import annotations

import json
import re

NO_DECOMPOSITION = "No decomposition"
ANSWER_MARKER = "The answer is"

DECOMPOSE_INSTRUCTION = (
    "Your task is to break a complex question down into simpler sub-questions. "
    "Write the most relevant and helpful sub-questions, at most {max_subquestions}, "
    "one per line, each ending with a question mark. Do not answer them. "
    f'If the question needs no decomposition, write only "{NO_DECOMPOSITION}".'
)

SOLVE_INSTRUCTION = (
    "Solve the complex question by answering the related sub-questions one by one, "
    "then answering the question itself. "
    'End your reply with "The answer is: X", where X is the final answer{length_rule}.'
)

DIRECT_INSTRUCTION = (
    "Answer the question with a concise answer of at most five words, "
    'in the form "The answer is: X".'
)

SELF_ASK_INSTRUCTION = (
    "Answer the last question as in the examples: ask the follow-up questions you need, one at a time, "
    "and end with the final answer. Continue the last example where it stops: write the next "
    '"Follow up:" question, or "So the final answer is:" and the answer.'
)

FOLLOW_UP_INSTRUCTION = "Answer the question in a few words, without explanation."

_FIVE_WORDS = " in at most five words"


def decompose_messages(question: str, context: str | None, max_subquestions: int = 3) -> list[dict]:
    """The decomposition prompt (I_decomp): instruction, then the passage (if any) and the question."""
    instruction = DECOMPOSE_INSTRUCTION.format(max_subquestions=max_subquestions)
    return _user(instruction, _context_block(context), f"Question: {question}")


def solve_messages(question: str, context: str | None, subquestions: list[str], short_answer: bool = False) -> list[dict]:
    """The solving prompt (I_ans): sub-questions numbered on one line, then the question."""
    length_rule = _FIVE_WORDS if short_answer else ""
    numbered = " ".join(f"{i}. {q}" for i, q in enumerate(subquestions, 1)) or "(none)"
    return _user(
        SOLVE_INSTRUCTION.format(length_rule=length_rule),
        _context_block(context),
        f"Sub-questions: {numbered}",
        f"Question: {question}",
    )


def direct_messages(question: str, context: str | None, bare: bool = False) -> list[dict]:
    """Single-stage prompt: the question alone when `bare` (Bamboogle), else a concise-answer instruction."""
    if bare:
        return _user(question)
    return _user(DIRECT_INSTRUCTION, _context_block(context), f"Question: {question}")


def self_ask_messages(examples: str, context: str | None, transcript: str) -> list[dict]:
    """A self-ask turn: the few-shot examples, then the transcript so far for the model to continue."""
    return _user(SELF_ASK_INSTRUCTION, examples.strip(), _context_block(context), transcript)


def follow_up_messages(follow_up: str, context: str | None) -> list[dict]:
    """A self-ask follow-up put to the solver: a short answer, no explanation."""
    return _user(FOLLOW_UP_INSTRUCTION, _context_block(context), f"Question: {follow_up}")


def format_subquestions(subquestions: list[str]) -> str:
    """A decomposition as a decomposer writes it: one sub-question per line, or "No decomposition"."""
    return "\n".join(subquestions) if subquestions else NO_DECOMPOSITION


_ENUMERATION = re.compile(
    r"^\s*(?:[-*\u2022]+|\(?\d+[.):](?!\d)|(?:(?:sub-?)?question|q)\s*\d*\s*[:.)]|#+)\s*", re.IGNORECASE
)
_RESTATES_MAIN = re.compile(r"\b(?:main|original|complex) question\b", re.IGNORECASE)


def subquestions_schema(max_subquestions: int) -> str:
    """The JSON schema of a structured decomposition: at most `max_subquestions` questions (none: no decomposition)."""
    question = {"type": "string", "pattern": r"^[^\n]{1,100}\?$"}  # ~30 tokens: 3 of them fit max_tokens 128
    return json.dumps({"type": "array", "items": question, "maxItems": max_subquestions})


def parse_subquestions(text: str) -> list[str]:
    """Every line holding a "?" is a sub-question, minus enumeration marks and restatements of the main question;
    a structured decomposition (a JSON list of strings) is read as its lines."""
    structured = _json_list(text)
    subquestions = []
    for line in structured if structured is not None else text.splitlines():
        if "?" not in line or _RESTATES_MAIN.search(line):
            continue
        question = _ENUMERATION.sub("", line.strip().lstrip("*")).strip(" *")
        if question and question not in subquestions:
            subquestions.append(question)
    return subquestions


def _json_list(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return [line for item in value for line in item.splitlines()]


_MARKER = re.compile(re.escape(ANSWER_MARKER), re.IGNORECASE)


def extract_answer(solution: str) -> str:
    """The text after the last "The answer is", trimmed; without the marker, the last non-empty line."""
    matches = list(_MARKER.finditer(solution))
    if matches:
        tail = solution[matches[-1].end() :]
    else:
        lines = [line for line in solution.splitlines() if line.strip()]
        tail = lines[-1] if lines else ""
    first_line = tail.lstrip(" *:\t").split("\n")[0]
    return first_line.rstrip(" *.\t")


def replace_answer(solution: str, answer: str) -> str:
    """The solution with its final answer replaced (S_E-A targets); appended when it has none."""
    matches = list(_MARKER.finditer(solution))
    head = solution[: matches[-1].start()] if matches else solution.rstrip() + "\n"
    return f"{head}{ANSWER_MARKER}: {answer}"


def _context_block(context: str | None) -> str | None:
    return f"Context: {context.strip()}" if context else None


def _user(*parts: str | None) -> list[dict]:
    return [{"role": "user", "content": "\n\n".join(p for p in parts if p)}]
