"""The Ray Data stage that runs a strategy: an async actor that runs each row's steps as a coroutine.

Why one async actor per strategy, not one operator per step (see docs/architecture.md): a row that
needs another turn (self_ask) never holds up the rows that are done, and the model calls of every
row in flight, at whatever step or turn, share the actor's models: an `openai` model keeps its
`max_in_flight` requests busy across turns and batch boundaries, and an `hf` model batches the
calls of different rows and turns into one `generate` (`MicroBatcher`).

Ray Data hands a batch on only when all its rows are done. So that a crash redoes no finished step,
each row is also sent to the driver's `sink` (a Ray queue) as soon as it is done, and after each
step that leaves another to run (a two_stage row decomposed, not yet solved) as an *unfinished* row:
its `error` says which step is still to run (`unfinished_error`), so the resume logic restarts it
there like a failed row. The sends keep the order of the steps; a batch leaves the actor only
after its rows are in the sink, so the driver always writes a row's last state last.
"""

from __future__ import annotations

import asyncio
import copy

import pyarrow as pa

from dnc_ray.llm.configs import HFModel, OpenAIModel
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.row import to_table
from dnc_ray.stages.cost_controls import chat_models

UNFINISHED = "unfinished"


def unfinished_error(step_name: str) -> str:
    """The error of a row persisted between two steps: `step_name` is the one still to run."""
    return f"{step_name}: {UNFINISHED} (the run stopped before this step ended; a re-run resumes here)"


def is_unfinished(row: dict) -> bool:
    return row["error"] is not None and row["error"].partition(": ")[2].startswith(f"{UNFINISHED} (")


class MethodStage:
    """Callable class for `Dataset.map_batches`: the models are built once per actor."""

    def __init__(self, strategy: str, models: dict[str, HFModel | OpenAIModel], options: MethodOptions, sink=None,
                 controls=None):
        self.strategy = STRATEGIES[strategy]
        self.models = chat_models(models, controls)  # controls: the run's shared rate limits and budget
        self.options = options
        self.sink = sink  # ray.util.queue.Queue of row lists, drained and written by the driver; None: no sends
        self._pending: list[dict] = []
        self._queued = self._delivered = 0  # rows handed to _send / put into the sink
        self._sender: asyncio.Task | None = None
        self._send_failed: BaseException | None = None
        self._delivery = asyncio.Condition()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        await asyncio.gather(*(self._run(row) for row in rows))
        await self._sent()
        return to_table(rows)

    async def _run(self, row: dict) -> None:
        on_step = self._send_unfinished if self.sink is not None else None
        await run_row(self.strategy, row, self.models, self.options, on_step)
        if self.sink is not None:
            self._send(copy.deepcopy(row))

    def _send_unfinished(self, row: dict, next_step) -> None:
        self._send({**copy.deepcopy(row), "error": unfinished_error(next_step.name)})

    def _send(self, row: dict) -> None:
        self._pending.append(row)
        self._queued += 1
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_pending())

    async def _send_pending(self) -> None:
        """One sender at a time, in order: what arrives while a send is in flight goes in the next one."""
        try:
            while self._pending:
                rows, self._pending = self._pending, []
                await self.sink.put_async(rows)
                self._delivered += len(rows)
                async with self._delivery:
                    self._delivery.notify_all()
        except Exception as e:  # the sink is gone (the driver died): the batches waiting on it fail
            self._send_failed = e
            async with self._delivery:
                self._delivery.notify_all()

    async def _sent(self) -> None:
        """Wait until every row handed to _send so far is in the sink."""
        if self.sink is None:
            return
        target = self._queued
        async with self._delivery:
            await self._delivery.wait_for(lambda: self._delivered >= target or self._send_failed is not None)
        if self._delivered < target:
            raise RuntimeError(f"rows could not be sent to the driver: {self._send_failed!r}")
