"""The strategies: each a short sequence of steps; a step builds chats from the row, calls a model by
role and records the reply into the row.

| strategy  | steps                 | models              |
| direct    | direct                | solver              |
| two_stage | decompose, solve      | decomposer, solver  |
| decompose | decompose             | decomposer          |
| solve     | solve (over an earlier run's decompositions) | solver |
| self_ask  | self_ask (a loop of up to max_turns turns)   | decomposer asks, solver answers |
"""

from __future__ import annotations

from dnc_ray.method import prompts
from dnc_ray.method.run import Step, StepContext, StepFailed, Strategy
from dnc_ray.method.self_ask import self_ask


async def _decompose(row: dict, ctx: StepContext) -> None:
    most = ctx.options.rules.max_subquestions
    chat = prompts.decompose_messages(row["question"], row["context"], most)
    schema = prompts.subquestions_schema(most) if ctx.options.structured_decompositions else None
    row["decomposition"] = await ctx.ask("decomposer", chat, json_schema=schema)
    row["subquestions"] = prompts.parse_subquestions(row["decomposition"])


async def _solve(row: dict, ctx: StepContext) -> None:
    if row["subquestions"] is None:
        raise StepFailed("the row has no decomposition")
    chat = prompts.solve_messages(row["question"], row["context"], row["subquestions"], ctx.options.rules.short_answer)
    _record_solution(row, await ctx.ask("solver", chat))


async def _direct(row: dict, ctx: StepContext) -> None:
    chat = prompts.direct_messages(row["question"], row["context"], ctx.options.rules.bare_direct_prompt)
    _record_solution(row, await ctx.ask("solver", chat))


def _record_solution(row: dict, solution: str) -> None:
    row["solution"] = solution
    row["prediction"] = prompts.extract_answer(solution)


_SOLVED = ("solution", "prediction")
DECOMPOSE = Step("decompose", ("decomposer",), ("decomposition", "subquestions"), "subquestions", _decompose)
SOLVE = Step("solve", ("solver",), _SOLVED, "prediction", _solve)
DIRECT = Step("direct", ("solver",), _SOLVED, "prediction", _direct)
SELF_ASK = Step("self_ask", ("decomposer", "solver"), ("subquestions", *_SOLVED), "prediction", self_ask)

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("direct", (DIRECT,)),
        Strategy("two_stage", (DECOMPOSE, SOLVE)),
        Strategy("decompose", (DECOMPOSE,)),
        Strategy("solve", (SOLVE,)),
        Strategy("self_ask", (SELF_ASK,)),
    )
}
