"""What a strategy is (named Steps, each calling models by role) and running one over a row: the steps in
order, each model call's usage summed per stage.

A step that is already done (its output is in the row: a reference decomposition, a decomposition
kept from an earlier attempt) is skipped, so a resumed row restarts at the step that failed.
A model failure ends the row with `error` = "<step>: <reason>"; an exception that is not a model
failure (an engine bug, a runtime's deadline) propagates to the runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from dnc_ray.llm.engine import Completion, Messages

if TYPE_CHECKING:
    from dnc_ray.tasks import PromptRules

Role = Literal["decomposer", "solver"]
STAGE_OF_ROLE = {"decomposer": "decompose", "solver": "solve"}  # the usage columns


class Model(Protocol):
    """One model as a strategy sees it: a chat in, a Completion out (with `error` on failure)."""

    name: str  # written into the row's `decomposer` / `solver` column

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float: ...

    async def complete(self, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> Completion:
        """json_schema: the reply is JSON of this schema (guided decoding; engine vllm)."""
        ...


@dataclass(frozen=True)
class MethodOptions:
    rules: PromptRules  # the task's prompt rules, max_subquestions already set by the config
    max_turns: int = 8  # self_ask: model turns before a row without a final answer fails
    structured_decompositions: bool = False  # the decomposer writes a JSON list of sub-questions (guided decoding)


class StepFailed(Exception):
    """A model call of a step failed (endpoint error, empty or unusable reply): the row fails."""


class StepContext:
    """What a step may do: call a model by role (usage recorded into the row), read the options."""

    def __init__(self, row: dict, models: dict[Role, Model], options: MethodOptions):
        self.row, self.models, self.options = row, models, options

    async def ask(self, role: Role, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> str:
        """The model's reply text; raises StepFailed when the call fails or the reply is empty."""
        model = self.models[role]
        completion = await model.complete(chat, stop, json_schema)
        self.row[role] = model.name
        _add_usage(self.row, STAGE_OF_ROLE[role], completion, model.cost(completion.prompt_tokens, completion.completion_tokens))
        if completion.error is not None:
            raise StepFailed(completion.error)
        if not completion.text:
            raise StepFailed("empty reply")
        return completion.text


@dataclass(frozen=True)
class Step:
    name: str  # the prefix of a failed row's error
    roles: tuple[Role, ...]  # the models it calls
    outputs: tuple[str, ...]  # the row fields it writes (cleared when it starts)
    done_when: str  # the step is done when this row field is set
    run: Callable[[dict, StepContext], Awaitable[None]]


@dataclass(frozen=True)
class Strategy:
    name: str
    steps: tuple[Step, ...]

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(dict.fromkeys(role for step in self.steps for role in step.roles))


StepDone = Callable[[dict, Step], None]


async def run_row(
    strategy: Strategy, row: dict, models: dict[Role, Model], options: MethodOptions, on_step: StepDone | None = None
) -> dict:
    """Run the strategy's steps that are not done yet on `row` (in place); a failed row keeps its error.

    `on_step(row, next_step)` is called when a step has just finished and `next_step` is still to run
    (Ray Data persists such a row at once: a crash then redoes no finished step).
    """
    if row["error"] is not None:
        return row  # failed before the method (e.g. no reference decomposition): kept as is
    ctx = StepContext(row, models, options)
    ran = None
    for step in strategy.steps:
        if row[step.done_when] is not None:
            continue
        if ran is not None and on_step is not None:
            on_step(row, step)
        _reset(row, step)
        try:
            await step.run(row, ctx)
        except StepFailed as e:
            row["error"] = f"{step.name}: {e}"
            return row
        ran = step
    return row


def _reset(row: dict, step: Step) -> None:
    """A step starts from nothing: its outputs and the usage of its stages are cleared."""
    for name in step.outputs:
        row[name] = None
    for role in step.roles:
        row["usage"][STAGE_OF_ROLE[role]] = None


def _add_usage(row: dict, stage: str, completion: Completion, cost_usd: float) -> None:
    usage = row["usage"][stage] or {"prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "cost_usd": 0.0, "calls": 0}
    usage["prompt_tokens"] += completion.prompt_tokens
    usage["completion_tokens"] += completion.completion_tokens
    usage["latency_s"] += completion.latency_s
    usage["cost_usd"] += cost_usd
    usage["calls"] += 1
    row["usage"][stage] = usage
