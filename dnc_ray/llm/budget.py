"""`budget_usd`: no request starts once the spend so far plus the worst case of the requests in flight
would pass the budget.

    Ledger          the arithmetic: spent before this attempt (the run's rows), spent in it, reserved
                    by the requests in flight; the first request that does not fit stops the ledger:
                    every later one is refused too, so the run winds down instead of trickling on
    LedgerActor     a Ledger in a Ray actor, one per run: every actor of the stage reserves from it
    BudgetedModel   a model (the method's `Model`) whose calls reserve their worst case before they start
                    and settle at their real cost when they end

A request's worst case is its price with the prompt counted at 3 characters a token (more than any
tokenizer of a chat model spends on text: the rate limiter's 4 is OpenAI's average, this is a bound),
4 tokens per message, and the completion at max_tokens. A refused call fails its row's step with
BUDGET_STOPPED: the row is written as unfinished (`<step>: unfinished (budget_usd ...)`), so a later run
with a higher budget resumes it at that step, keeping the steps it finished.
"""

from __future__ import annotations

import asyncio
import math
import time

from dnc_ray.llm.engine import Completion, Messages

BUDGET_CHARS_PER_TOKEN = 3
# The row error's reason: the stages treat "<step>: unfinished (...)" as a step still to run (method_stage.py).
BUDGET_STOPPED = "unfinished (budget_usd {budget:g} reached: no request is started past it; a run with a higher budget_usd resumes here)"


def worst_prompt_tokens(messages: Messages) -> int:
    return sum(math.ceil(len(m["content"]) / BUDGET_CHARS_PER_TOKEN) + 4 for m in messages if isinstance(m.get("content"), str))


class Ledger:
    def __init__(self, budget_usd: float, spent_before_usd: float = 0.0):
        self.budget, self.spent_before = budget_usd, spent_before_usd
        self.spent = self.reserved = 0.0
        self.started = self.refused = 0
        self.stopped_at: float | None = None

    def reserve(self, worst_usd: float) -> bool:
        """True: the call may start (its worst case is reserved); False: the ledger is stopped."""
        if self.stopped_at is None and self.spent_before + self.spent + self.reserved + worst_usd > self.budget:
            self.stopped_at = time.time()
        if self.stopped_at is not None:
            self.refused += 1
            return False
        self.reserved += worst_usd
        self.started += 1
        return True

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        self.reserved = max(0.0, self.reserved - worst_usd)
        self.spent += actual_usd

    def summary(self) -> dict:
        return {"budget_usd": self.budget, "spent_before_usd": round(self.spent_before, 6),
                "spent_usd": round(self.spent, 6), "total_usd": round(self.spent_before + self.spent, 6),
                "requests_started": self.started, "requests_refused": self.refused,
                "stopped": self.stopped_at is not None}


class LedgerActor:
    """A Ledger in a Ray actor (one call at a time: the arithmetic is never interleaved)."""

    def __init__(self, budget_usd: float, spent_before_usd: float):
        self.ledger = Ledger(budget_usd, spent_before_usd)

    def reserve(self, worst_usd: float) -> bool:
        return self.ledger.reserve(worst_usd)

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        self.ledger.settle(worst_usd, actual_usd)

    def summary(self) -> dict:
        return self.ledger.summary()


class LocalLedger:
    """The async face of a Ledger in this process (the batch driver)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    @property
    def budget(self) -> float:
        return self.ledger.budget

    async def reserve(self, worst_usd: float) -> bool:
        return self.ledger.reserve(worst_usd)

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        self.ledger.settle(worst_usd, actual_usd)

    async def summary(self) -> dict:
        return self.ledger.summary()


class SharedLedger:
    """A handle on a LedgerActor, picklable into each Ray Data actor; settle() does not wait (calls from one
    caller to an actor run in order, so it lands before that caller's next reserve)."""

    def __init__(self, actor, budget: float):
        self.actor, self.budget = actor, budget

    async def reserve(self, worst_usd: float) -> bool:
        return await self.actor.reserve.remote(worst_usd)

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        self.actor.settle.remote(worst_usd, actual_usd)

    async def summary(self) -> dict:
        return await self.actor.summary.remote()


def shared_ledger(budget_usd: float, spent_before_usd: float) -> SharedLedger:
    import ray

    actor = ray.remote(num_cpus=0)(LedgerActor).remote(budget_usd, spent_before_usd)
    return SharedLedger(actor, budget_usd)


class BudgetedModel:
    """`model` (a ChatModel or BatchModel) whose every call is reserved from `ledger` first.

    `in_flight`: the calls the model sends at once (an openai engine's max_in_flight, an hf model's
    batch_size): only that many hold a reservation, the others wait their turn before reserving, so that
    the calls queued in an actor do not count as in flight. None (a batch-mode model: every request of a
    round is in flight): no bound.
    """

    def __init__(self, model, ledger, in_flight: int | None = None):
        self.model, self.ledger, self.in_flight = model, ledger, in_flight
        self.name = model.name
        self.cost = model.cost
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    async def complete(self, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> Completion:
        if self.in_flight is None:
            return await self._complete(chat, stop, json_schema)
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.in_flight))
        async with self._slots[1]:
            return await self._complete(chat, stop, json_schema)

    async def _complete(self, chat: Messages, stop: tuple[str, ...], json_schema: str | None) -> Completion:
        worst = self.model.cost(worst_prompt_tokens(chat), self.model.params.max_tokens)
        if not await self.ledger.reserve(worst):
            return Completion(text=None, error=BUDGET_STOPPED.format(budget=self.ledger.budget))
        actual = 0.0
        try:
            completion = await self.model.complete(chat, stop, json_schema)
            actual = self.model.cost(completion.prompt_tokens, completion.completion_tokens)
            return completion
        finally:
            self.ledger.settle(worst, actual)
