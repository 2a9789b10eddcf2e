"""The two model deployments behind the ingress: one `complete(chat, params) -> Completion` each.

A local model batches concurrent requests into one `generate` call (`@serve.batch`); an upstream
OpenAI-compatible endpoint takes each request as it comes, many in flight, and batches on its side.
Serve exports the batch sizes it forms as the `ray_serve_actual_batch_size` histogram.
"""

from __future__ import annotations

import asyncio

from ray import serve

from dnc_ray.config import HFModel, OpenAIModel
from dnc_ray.llm import Completion, Messages, SamplingParams, make_engine
from dnc_ray.llm.openai import OpenAIEngine


@serve.deployment
class LocalModel:
    """A Transformers model; up to `batch_size` requests arriving within `batch_wait_timeout_s` run as one batch."""

    def __init__(self, model: HFModel, batch_wait_timeout_s: float):
        self.engine = make_engine(model)  # imports torch in this replica only
        self.complete.set_max_batch_size(model.batch_size)
        self.complete.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def complete(self, chats: list[Messages], params: list[SamplingParams]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(chats)
        for same in dict.fromkeys(params):  # one generate call per distinct sampling setting
            picked = [i for i, p in enumerate(params) if p == same]
            done = await asyncio.to_thread(self.engine.generate, [chats[i] for i in picked], same)
            for i, completion in zip(picked, done):
                out[i] = completion
        return out


@serve.deployment
class RemoteModel:
    """An OpenAI-compatible upstream (a hosted teacher, vLLM, another `dnc serve`)."""

    def __init__(self, model: OpenAIModel):
        self.engine = OpenAIEngine(model)

    async def complete(self, chat: Messages, params: SamplingParams) -> Completion:
        return (await self.engine.agenerate([chat], params))[0]
