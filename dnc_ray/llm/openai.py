"""An `Engine` over any OpenAI-compatible endpoint (OpenAI, vLLM, Ray Serve LLM, the stub server).

Retries (`agenerate`), the official client's policy made our own so that it also covers replies the
client accepts but we cannot use: on 408, 409, 429, every 5xx, timeouts, a connection dropped
mid-reply, and a 200 whose body is not JSON or has no choices, a request is retried up to
`max_retries` times, sleeping min(0.5 * 2**n, 8) s times a 0.75-1 jitter, or the server's
`retry-after(-ms)` when that is at most 2 minutes. Other 4xx are not retried.

Fail fast when the upstream is down: a request that cannot connect (refused, unreachable, connect
timeout) is not retried, and a circuit breaker per engine (so per Ray actor or Serve replica)
opens after `breaker_failures` such failures in a row: every call then fails at once, without
touching the network, until `breaker_open_s` has passed; then one call is let through (half-open):
a reply closes the circuit, another connection failure opens it again.

Rate limits (`requests_per_minute`, `tokens_per_minute`; rate_limit.py): every attempt, retries included,
first waits its turn in `limiter` (an in-process Limiter by default; in a Ray Data run the stage's
SharedLimiter, set by the driver). A 429 pauses the limiter for its retry-after (or the backoff when it
has none): the whole stage waits, not only the request that was refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator

import openai

from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.engine import Chunk, Completion, Messages, SamplingParams
from dnc_ray.llm.rate_limit import Limiter, rate_tokens

_MAX_ERROR_CHARS = 300


class MalformedResponse(ValueError):
    """A 200 answer that is not JSON, or has no choices or message content."""


class CircuitOpen(Exception):
    """The upstream could not be reached by the last calls: this one fails without trying."""


_RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx, as the official client
_RETRY_AFTER_MAX_S = 120.0  # as the official client


def _connect_failure(e: BaseException) -> bool:
    """The request never reached the upstream: refused, no route, DNS, connect timeout."""
    names = {c.__name__ for c in type(e.__cause__).__mro__} if e.__cause__ is not None else set()
    return isinstance(e, openai.APIConnectionError) and bool(names & {"ConnectError", "ConnectTimeout"})


class Breaker:
    """Closed -> open after `failures` connection failures in a row -> half-open after `open_s` (one probe)."""

    def __init__(self, failures: int, open_s: float):
        self.failures, self.open_s = failures, open_s
        self.in_a_row = 0
        self.opened_at: float | None = None
        self.probing = False

    def allow(self) -> bool:
        if self.failures == 0 or self.opened_at is None:
            return True
        if not self.probing and time.monotonic() - self.opened_at >= self.open_s:
            self.probing = True  # half-open: this call is the probe, the others still fail at once
            return True
        return False

    def reached(self) -> None:
        """The upstream answered (whatever the answer): the circuit closes."""
        self.in_a_row, self.opened_at, self.probing = 0, None, False

    def unreachable(self) -> None:
        self.in_a_row += 1
        if self.failures and (self.probing or self.in_a_row >= self.failures):
            self.opened_at, self.probing = time.monotonic(), False


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
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_open_s)
        self.limiter = Limiter(cfg.requests_per_minute, cfg.tokens_per_minute)  # replaced by a run's SharedLimiter
        # Nothing is opened here: the client starts on first use, on the loop that uses it.
        # (loop, client, request slots, the client without retries of its own)
        self._bound: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI, asyncio.Semaphore, openai.AsyncOpenAI] | None = None

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        client, slots = self._client()
        kwargs = self._request(params)
        return list(await asyncio.gather(*(self._one(client, slots, chat, kwargs) for chat in chats)))

    async def astream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """The upstream's own stream relayed (`stream: true`, usage in its last event)."""
        client, slots = self._client()
        async with slots:
            start, parts, usage, stream = time.perf_counter(), [], None, None
            await self.limiter.acquire(rate_tokens(chat, params.max_tokens))
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
        client = self._bound[3]  # the same connections, no retries of the client's own: ours below
        async with slots:
            start = time.perf_counter()
            for retry in range(self.cfg.max_retries + 1):
                if not self.breaker.allow():
                    error = (f"CircuitOpen: the upstream could not be reached ({self.breaker.in_a_row} connection "
                             f"failures in a row); calls fail at once for {self.cfg.breaker_open_s:g}s, then one is tried")
                    return Completion(text=None, latency_s=time.perf_counter() - start, error=error)
                await self.limiter.acquire(rate_tokens(chat, kwargs["max_tokens"]))
                try:
                    response = await self._create(client, chat, kwargs)
                    break
                except (openai.APIError, MalformedResponse) as e:  # the endpoint failed this chat: the batch goes on
                    delay = self._retry_delay(e, retry)
                    if isinstance(e, openai.APIStatusError) and e.status_code == 429:  # the endpoint is full: all wait
                        self.limiter.pause(_retry_after_s(e.response.headers) or delay or _backoff_s(retry))
                    if delay is None:
                        return Completion(text=None, latency_s=time.perf_counter() - start, error=self._describe(e))
                    await asyncio.sleep(delay)
            latency = time.perf_counter() - start
        text = response.choices[0].message.content
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            completion_tokens=getattr(usage, "completion_tokens", None) or 0,
            latency_s=latency,
        )

    async def _create(self, client: openai.AsyncOpenAI, chat: Messages, kwargs: dict):
        """One request; raises MalformedResponse for a 200 we cannot use, and tells the breaker how it went."""
        try:
            response = await client.chat.completions.create(messages=chat, **kwargs)
        except openai.APIError as e:
            if _connect_failure(e):
                self.breaker.unreachable()
            elif not isinstance(e, openai.APITimeoutError):
                self.breaker.reached()
            raise
        except json.JSONDecodeError as e:  # a 200 labelled JSON that is not
            self.breaker.reached()
            raise MalformedResponse(f"response body is not JSON ({e.msg})") from None
        self.breaker.reached()
        choices = getattr(response, "choices", None)
        message = choices[0].message if isinstance(choices, list) and choices else None
        if not isinstance(getattr(message, "content", None), str):
            raise MalformedResponse("response has no choices or message content")
        return response

    def _retry_delay(self, e: Exception, retry: int) -> float | None:
        """Seconds to wait before retrying `e`, or None when it is not retried (or no retry is left)."""
        if retry >= self.cfg.max_retries or _connect_failure(e):
            return None
        if isinstance(e, openai.APIStatusError):
            should = e.response.headers.get("x-should-retry")
            if should in ("true", "false"):
                if should == "false":
                    return None
            elif e.status_code not in _RETRY_STATUSES and e.status_code < 500:
                return None
            after = _retry_after_s(e.response.headers)
            if after is not None:
                return after
        elif not isinstance(e, (openai.APIConnectionError, MalformedResponse)):
            return None  # e.g. a reply that does not fit the schema: not a transient failure
        return _backoff_s(retry)

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
            self._bound = (loop, client, asyncio.Semaphore(self.cfg.max_in_flight), client.with_options(max_retries=0))
        return self._bound[1], self._bound[2]

    async def aclose(self) -> None:
        """Close the client (its connections); the engine opens a new one if used again."""
        bound, self._bound = self._bound, None
        if bound is not None:
            await bound[1].close()


def _backoff_s(retry: int) -> float:
    return min(0.5 * 2.0**retry, 8.0) * (1 - 0.25 * random.random())


def _retry_after_s(headers) -> float | None:
    """The server's retry-after-ms / retry-after (seconds) when it is in (0, 120] s."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) / scale
        except ValueError:
            continue
        if 0 < seconds <= _RETRY_AFTER_MAX_S:
            return seconds
    return None
