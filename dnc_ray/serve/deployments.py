"""The two model deployments behind the ingress: `complete(chat, params) -> Completion` and
`stream(chat, params) -> Chunk...` each.

An hf model batches concurrent requests into one `generate` call (`@serve.batch`; streaming
requests are batched with each other, one streamer per request in the batch); a vLLM engine and an
upstream OpenAI-compatible endpoint take each request as it comes, many in flight, and batch on their side.
Serve exports the batch sizes it forms as the `ray_serve_actual_batch_size` histogram.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

from ray import serve

from dnc_ray.llm import Completion, Messages, SamplingParams, make_engine
from dnc_ray.llm.configs import HFModel, OpenAIModel, VLLMModel
from dnc_ray.llm.engine import Chunk


@serve.deployment
class LocalModel:
    """A Transformers model; up to `batch_size` requests arriving within `batch_wait_timeout_s` run as one batch."""

    def __init__(self, model: HFModel, batch_wait_timeout_s: float):
        self.engine = make_engine(model)  # imports torch in this replica only
        self.generating = 0  # streamed requests whose batch is still generating
        self.streamed_tokens: list[int] = []  # tokens generated per request of the last finished streamed batch
        for batched in (self.complete, self._stream_batch):
            batched.set_max_batch_size(model.batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def complete(self, chats: list[Messages], params: list[SamplingParams]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(chats)
        for same in dict.fromkeys(params):  # one generate call per distinct sampling setting
            picked = [i for i, p in enumerate(params) if p == same]
            done = await self.engine.agenerate([chats[i] for i in picked], same)
            for i, completion in zip(picked, done, strict=True):
                out[i] = completion
        return out

    async def stream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """The answer as it is generated; a caller that goes away stops its row of the batch."""
        cancelled = threading.Event()
        try:
            async for chunks in self._stream_batch(chat, params, cancelled):
                for chunk in chunks:
                    yield chunk
        finally:
            cancelled.set()

    def stats(self) -> dict:
        """Streamed requests still generating, and the tokens each request of the last streamed batch got
        (a cancelled stream's row ends early)."""
        return {"generating": self.generating, "streamed_tokens": self.streamed_tokens}

    @serve.batch()  # parametrised: Ray's bare-decorator check rejects async generators, the batcher supports them
    async def _stream_batch(self, chats: list[Messages], params: list[SamplingParams],
                            cancelled: list[threading.Event]) -> AsyncIterator[list]:
        """Per step, each request's new chunks ([] when none); StopIteration once its answer is whole."""
        pending: list[list[Chunk] | type[StopIteration]] = [[] for _ in chats]
        tokens = [0] * len(chats)
        self.generating += len(chats)
        try:
            for same in dict.fromkeys(params):  # one streamed generate per distinct sampling setting
                picked = [i for i, p in enumerate(params) if p == same]
                async for j, chunk in self.engine.astream_batch([chats[i] for i in picked], same, [cancelled[i] for i in picked]):
                    pending[picked[j]].append(chunk)
                    yield [_take(pending, i) for i in range(len(chats))]
                    if chunk.completion is not None:
                        pending[picked[j]] = StopIteration
                        tokens[picked[j]] = chunk.completion.completion_tokens
        finally:
            self.generating -= len(chats)
            self.streamed_tokens = tokens


def _take(pending: list, i: int) -> list[Chunk] | type[StopIteration]:
    taken = pending[i]
    if taken is not StopIteration:
        pending[i] = []
    return taken


@serve.deployment
class EngineModel:
    """An engine that batches on its own, each request handed to it as it comes: an OpenAI-compatible upstream
    (a hosted teacher, vLLM, another `dnc serve`) or a vLLM engine in the replica (continuous batching)."""

    def __init__(self, model: OpenAIModel | VLLMModel):
        self.engine = make_engine(model)  # vllm: imports vLLM and loads the model in this replica only

    async def complete(self, chat: Messages, params: SamplingParams) -> Completion:
        return (await self.engine.agenerate([chat], params))[0]

    async def stream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """The engine's stream relayed; closing it ends the request (upstream, or in vLLM)."""
        async for chunk in self.engine.astream(chat, params):
            yield chunk
