"""An engine as the method's `Model` (one chat in, one Completion out), with the model config's sampling
settings and price. Local (hf) engines batch: the calls of concurrent rows, whatever turn each row is
at, are gathered into one `generate` of up to `batch_size` chats (`MicroBatcher`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from dnc_ray.llm.configs import HFModel, OpenAIModel, VLLMModel
from dnc_ray.llm.engine import Completion, Engine, Messages, SamplingParams


class ChatModel:
    """`complete(chat, stop)` on the engine a model config names."""

    def __init__(self, cfg: HFModel | OpenAIModel | VLLMModel, engine: Engine):
        self.name = cfg.model
        self.cost = cfg.price.cost
        self.params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        self._agenerate = MicroBatcher(engine, cfg.batch_size).agenerate if isinstance(cfg, HFModel) else engine.agenerate

    async def complete(self, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> Completion:
        params = replace(self.params, stop=stop, json_schema=json_schema) if stop or json_schema else self.params
        [completion] = await self._agenerate([chat], params)
        return completion


class MicroBatcher:
    """Gathers the chats of concurrent callers into engine calls of up to `max_batch_size` chats.

    A caller's chats join the queue; one drain task at a time takes the oldest request's sampling
    settings and every queued chat that shares them (up to the batch size), so rows at different
    turns share a batch. A batch that is not full waits `wait_s` first (as Serve's
    `batch_wait_timeout_s`), letting the callers the previous batch woke queue their next chats.
    """

    def __init__(self, engine: Engine, max_batch_size: int, wait_s: float = 0.01):
        self.engine, self.max_batch_size, self.wait_s = engine, max_batch_size, wait_s
        self._queue: list[tuple[Messages, SamplingParams, asyncio.Future]] = []
        self._drain_task: asyncio.Task | None = None

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in chats]
        self._queue += [(chat, params, future) for chat, future in zip(chats, futures, strict=True)]
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        while self._queue:
            await asyncio.sleep(self.wait_s if len(self._queue) < self.max_batch_size else 0)
            params = self._queue[0][1]
            batch = [item for item in self._queue if item[1] == params][: self.max_batch_size]
            taken = {id(item) for item in batch}
            self._queue = [item for item in self._queue if id(item) not in taken]
            try:
                done = await self.engine.agenerate([chat for chat, _, _ in batch], params)
                for (_, _, future), completion in zip(batch, done, strict=True):
                    future.set_result(completion)
            except Exception as e:  # an engine bug: every caller of the batch sees it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
