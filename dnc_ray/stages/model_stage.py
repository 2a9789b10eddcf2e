"""Ray Data actors that run one model over batches of rows for one stage (decompose, solve, direct)."""

from __future__ import annotations

import functools

import pyarrow as pa

from dnc_ray.config import HFModel, OpenAIModel
from dnc_ray.llm import Completion, Messages, SamplingParams, make_engine
from dnc_ray.stages.decompose import decompose_chat, record_decomposition
from dnc_ray.stages.rows import to_table
from dnc_ray.stages.solve import direct_chat, record_solution, solve_chat

MODEL_COLUMN = {"decompose": "decomposer", "solve": "solver", "direct": "solver"}
USAGE_KEY = {"decompose": "decompose", "solve": "solve", "direct": "solve"}


class ModelStage:
    """Callable class for `Dataset.map_batches`: the engine is built once per actor."""

    def __init__(self, stage: str, model: HFModel | OpenAIModel, max_subquestions: int = 3):
        self.stage = stage
        self.model = model
        self.engine = make_engine(model)
        self.build_chat, self.record = {
            "decompose": (functools.partial(decompose_chat, max_subquestions=max_subquestions), record_decomposition),
            "solve": (solve_chat, record_solution),
            "direct": (direct_chat, record_solution),
        }[stage]
        self.params = SamplingParams(temperature=model.temperature, max_tokens=model.max_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, todo, chats = self._prepare(batch)
        return self._finish(rows, todo, self.engine.generate(chats, self.params))

    def _prepare(self, batch: pa.Table) -> tuple[list[dict], list[dict], list[Messages]]:
        """All rows of the batch, the rows to run and their chats (a row failed upstream is kept as is)."""
        rows = batch.to_pylist()
        todo, chats = [], []
        for row in rows:
            if row["error"] is not None:
                continue  # failed upstream: kept as is, retried on the next run
            try:
                chats.append(self.build_chat(row))
                todo.append(row)
            except ValueError as e:
                row["error"] = str(e)
        return rows, todo, chats

    def _finish(self, rows: list[dict], todo: list[dict], completions: list[Completion]) -> pa.Table:
        for row, completion in zip(todo, completions):
            self._apply(row, completion)
        return to_table(rows)

    def _apply(self, row: dict, completion: Completion) -> None:
        row[MODEL_COLUMN[self.stage]] = self.engine.name
        row["usage"][USAGE_KEY[self.stage]] = {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "latency_s": completion.latency_s,
            "cost_usd": self.model.price.cost(completion.prompt_tokens, completion.completion_tokens),
        }
        if completion.error is not None or completion.text is None:
            row["error"] = f"{self.stage}: {completion.error or 'empty reply'}"
        else:
            self.record(row, completion)


class HTTPModelStage(ModelStage):
    """An `openai` engine's stage, async: Ray Data runs several batches at once in one actor, so the
    engine's `max_in_flight` requests stay busy across batch boundaries instead of draining at each."""

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows, todo, chats = self._prepare(batch)
        return self._finish(rows, todo, await self.engine.agenerate(chats, self.params))
