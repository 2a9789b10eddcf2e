"""The Ray Data stage that runs a strategy: an async actor that runs each row's steps as a coroutine.

Why one async actor per strategy, not one operator per step (see docs/architecture.md): a row that
needs another turn (self_ask) never holds up the rows that are done, and the model calls of every
row in flight, at whatever step or turn, share the actor's models: an `openai` model keeps its
`max_in_flight` requests busy across turns and batch boundaries, and an `hf` model batches the
calls of different rows and turns into one `generate` (`MicroBatcher`).
"""

from __future__ import annotations

import asyncio

import pyarrow as pa

from dnc_ray.config import HFModel, OpenAIModel
from dnc_ray.llm import make_engine
from dnc_ray.llm.chat_model import ChatModel
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.row import to_table


class MethodStage:
    """Callable class for `Dataset.map_batches`: the models are built once per actor."""

    def __init__(self, strategy: str, models: dict[str, HFModel | OpenAIModel], options: MethodOptions):
        self.strategy = STRATEGIES[strategy]
        self.models = {role: ChatModel(cfg, make_engine(cfg)) for role, cfg in models.items()}
        self.options = options

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        await asyncio.gather(*(run_row(self.strategy, row, self.models, self.options) for row in rows))
        return to_table(rows)
