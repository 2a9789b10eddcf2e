"""An `Engine` over any OpenAI-compatible endpoint (OpenAI, vLLM, Ray Serve LLM, the stub server).

Retries are the official client's own: on connection errors, timeouts, 408, 409, 429 and every 5xx
it retries up to `max_retries` times, sleeping min(0.5 * 2**n, 8) s times a 0.75-1 jitter, or the
server's `retry-after(-ms)` when that is at most 2 minutes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import openai

from dnc_ray.config import OpenAIModel
from dnc_ray.llm.engine import Chunk, Completion, Messages, SamplingParams

_MAX_ERROR_CHARS = 300


class MalformedResponse(ValueError):
    """A 200 answer without choices or message content."""


class OpenAIEngine:
    """Sends each chat as one `chat.completions.create`, at most `max_in_flight` at a time."""

    def __init__(self, cfg: OpenAIModel):
        self.cfg = cfg
        self.name = cfg.model
        if cfg.api_key_env is None:
            self._api_key = "not-needed"
        else:
            self._api_key = os.environ.get(cfg.api_key_env, "")
            if not self._api_key:
                raise RuntimeError(
                    f"environment variable {cfg.api_key_env} (api_key_env of model {cfg.model}) is not set: "
                    "export it with the API key, or set api_key_env: null for an endpoint without a key"
                )
        # Nothing is opened here: the client starts on first use, on the loop that uses it.
        self._bound: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI, asyncio.Semaphore] | None = None

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        client, slots = self._client()
        kwargs = self._request(params)
        return list(await asyncio.gather(*(self._one(client, slots, chat, kwargs) for chat in chats)))

    async def astream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """The upstream's own stream relayed (`stream: true`, usage in its last event)."""
        client, slots = self._client()
        async with slots:
            start, parts, usage, stream = time.perf_counter(), [], None, None
            try:
                stream = await client.chat.completions.create(
                    messages=chat, stream=True, stream_options={"include_usage": True}, **self._request(params)
                )
                async for event in stream:
                    usage = event.usage or usage
                    delta = event.choices[0].delta.content if event.choices and event.choices[0].delta else None
                    if delta:
                        parts.append(delta)
                        yield Chunk(delta)
            except openai.APIError as e:
                yield Chunk("", Completion(text=None, latency_s=time.perf_counter() - start, error=self._describe(e)))
                return
            finally:
                if stream is not None:
                    await stream.close()  # a consumer that stops early closes the upstream connection
        yield Chunk("", Completion(
            text="".join(parts),
            prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            completion_tokens=getattr(usage, "completion_tokens", None) or 0,
            latency_s=time.perf_counter() - start,
        ))

    def _request(self, params: SamplingParams) -> dict:
        kwargs: dict = {"model": self.cfg.model, "temperature": params.temperature, "max_tokens": params.max_tokens}
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.seed is not None:
            kwargs["seed"] = params.seed
        return kwargs

    async def _one(self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, chat: Messages, kwargs: dict) -> Completion:
        async with slots:
            start = time.perf_counter()
            try:
                response = await client.chat.completions.create(messages=chat, **kwargs)
                latency = time.perf_counter() - start
                choices = getattr(response, "choices", None)
                text = choices[0].message.content if choices and choices[0].message else None
                if not isinstance(text, str):
                    raise MalformedResponse("response has no choices or message content")
            except (openai.APIError, MalformedResponse) as e:  # the endpoint failed this chat: the batch goes on
                return Completion(text=None, latency_s=time.perf_counter() - start, error=self._describe(e))
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            completion_tokens=getattr(usage, "completion_tokens", None) or 0,
            latency_s=latency,
        )

    def _describe(self, e: Exception) -> str:
        message = " ".join(str(e).split()) or repr(e)
        if self._api_key:
            message = message.replace(self._api_key, "***")
        if len(message) > _MAX_ERROR_CHARS:
            message = message[: _MAX_ERROR_CHARS - 3] + "..."
        return f"{type(e).__name__}: {message}"

    def _client(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """The client and request slots of the running loop (an AsyncOpenAI is bound to its loop)."""
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self.cfg.base_url,
                timeout=self.cfg.request_timeout_s,
                max_retries=self.cfg.max_retries,
            )
            self._bound = (loop, client, asyncio.Semaphore(self.cfg.max_in_flight))
        return self._bound[1], self._bound[2]

    async def aclose(self) -> None:
        """Close the client (its connections); the engine opens a new one if used again."""
        bound, self._bound = self._bound, None
        if bound is not None:
            await bound[1].close()
