"""`self_ask`, the paper's dynamic baseline (Press et al. 2022): the decomposer writes the transcript one
turn at a time ("Follow up: ..." or "So the final answer is: ..."); each follow-up is answered by another
call to the solver, appended as "Intermediate answer: ...".

    Question: <question>
    Are follow up questions needed here: Yes.
    Follow up: <sub-question>
    Intermediate answer: <the solver's answer>
    So the final answer is: <prediction>

The transcript is rebuilt in this canonical form from each reply (whatever the model adds after the
line it was asked for is dropped), stored as `solution`; the follow-ups are the `subquestions`. A row
that fails keeps the transcript so far in `solution`, ending with the reply that could not be used.
"""

from __future__ import annotations

import re

from dnc_ray.method import prompts
from dnc_ray.method.run import StepContext, StepFailed

FOLLOW_UP = "Follow up:"
INTERMEDIATE = "Intermediate answer:"
FINAL = "So the final answer is:"
NEEDED = "Are follow up questions needed here:"
_NEXT_LINE = re.compile(rf"({re.escape(FOLLOW_UP)}|{re.escape(FINAL)})[ \t]*(.*)", re.IGNORECASE)
_NO_FOLLOW_UP = re.compile(r"^\W*no\b", re.IGNORECASE)


async def self_ask(row: dict, ctx: StepContext) -> None:
    """Turns until a final answer, at most ctx.options.max_turns decomposer calls."""
    lines = [f"Question: {row['question']}"]
    row["subquestions"] = []
    for turn in range(1, ctx.options.max_turns + 1):
        first = turn == 1
        transcript = "\n".join(lines) + ("\n" + NEEDED if first else "\n")
        chat = prompts.self_ask_messages(ctx.options.rules.self_ask_examples, row["context"], transcript)
        reply = await ctx.ask("decomposer", chat, stop=(INTERMEDIATE,))
        kind, text = next_line(reply)
        if kind is None:  # the transcript keeps the unusable reply, for whoever reads the failed row
            row["solution"] = f"{transcript} {reply}" if first else f"{transcript}{reply}"
            raise StepFailed(f'turn {turn}: the reply has neither "{FOLLOW_UP}" nor "{FINAL}"')
        if first:
            lines.append(f"{NEEDED} {'No' if kind == FINAL and _NO_FOLLOW_UP.match(reply) else 'Yes'}.")
        if kind == FINAL:
            lines.append(f"{FINAL} {text}")
            row["solution"], row["prediction"] = "\n".join(lines), text
            return
        row["subquestions"].append(text)
        answer = await ctx.ask("solver", prompts.follow_up_messages(text, row["context"]))
        lines += [f"{FOLLOW_UP} {text}", f"{INTERMEDIATE} {first_line(answer)}"]
        row["solution"] = "\n".join(lines)
    raise StepFailed(f"no final answer within max_turns ({ctx.options.max_turns}) turns")


def next_line(reply: str) -> tuple[str | None, str]:
    """The first "Follow up:" or "So the final answer is:" line of a reply: (its marker, its text)."""
    for line in reply.splitlines():
        match = _NEXT_LINE.search(line)
        if match and match.group(2).strip():
            kind = FOLLOW_UP if match.group(1).lower() == FOLLOW_UP.lower() else FINAL
            text = match.group(2).strip()
            return kind, text if kind == FOLLOW_UP else text.rstrip(" *.\t")
    return None, ""


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
