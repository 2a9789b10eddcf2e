"""Rate limits per endpoint: `requests_per_minute` and `tokens_per_minute` as token buckets, and the
pauses a 429 asks for.

    Bucket          the arithmetic (no clock of its own): two buckets refilled continuously at limit/60 per
                    second, each holding at most BURST_S seconds' worth; a request takes 1 request and its
                    tokens (`rate_tokens`: the prompt estimated from its characters, plus max_tokens, as
                    OpenAI counts them against a limit); a pause holds every request until it ends
    Limiter         a Bucket behind an asyncio lock: callers go in arrival order (one process)
    LimiterActor    a Limiter in a Ray actor: one per endpoint per run, shared by every actor of the stage
                    and by the decomposer and the solver when they call the same endpoint
    SharedLimiter   what an engine in a Ray actor holds: acquire() waits in the actor's queue; pause()
                    reaches every engine of the stage

Why one shared bucket and not the limit split per actor: measured in `benchmarks/rate_limits.py` (the
README's Generate section has the figures). A split share idles whenever its actor has nothing to send
(starting up, between batches, the last rows of a run) while the others wait on theirs; a shared bucket
hands that room to whoever is ready, and a 429's pause reaches every actor at once. Its cost, one actor
call per request, is small next to a request to a hosted model.

The buckets hold a quarter of a second's worth: the limiter paces requests rather than letting a burst
go. Two delays pull against each other. The time from a grant to the request reaching the server varies
(a Ray reply, an event loop, a connection; most of a second on an overloaded machine): a server that
enforces its limit per second (as OpenAI may) sees more than its limit once that variation passes the
part of its second the bucket does not use (here 0.75 s). And a limiter that wakes late for a grant
loses that time unless its bucket holds it: a quarter of a second absorbs wake-ups up to that late
(measured: a bucket of 0.1 s reached 89 % of the limit on a machine at load 40-80, where wake-ups ran
late, against 99 % at load ~20).

Without limits the engines still share pauses: a 429 pauses the engine that got it at once, the others
when they next look (at most every SYNC_S), so a stage backs off together instead of each request
finding the limit on its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable

BURST_S = 0.25  # seconds' worth of each limit that may go at once (at least 1 request): well under any server's
SYNC_S = 0.5  # without limits: how often an engine asks the shared limiter whether the stage is paused
CHARS_PER_TOKEN = 4  # OpenAI's estimate of a prompt's tokens before tokenizing it (what its limiter counts)


def _contents(messages: Iterable[dict]) -> Iterable[str]:
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content


def rate_tokens(messages: list[dict], max_tokens: int) -> int:
    """The tokens a request counts against a tokens-per-minute limit: its prompt estimated from its
    characters (4 a token, 4 more per message) plus the completion it may write (max_tokens)."""
    prompt = sum(math.ceil(len(text) / CHARS_PER_TOKEN) + 4 for text in _contents(messages))
    return prompt + max(0, max_tokens)


class Bucket:
    """Requests and tokens per minute as two token buckets; times are seconds on one monotonic clock."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, burst_s: float = BURST_S,
                 now: float | None = None):
        self.rates = [None if limit is None else limit / 60.0 for limit in (requests_per_minute, tokens_per_minute)]
        self.capacity = [None if rate is None else max(1.0, rate * burst_s) for rate in self.rates]
        self.level = [c or 0.0 for c in self.capacity]  # full at the start
        self.at = time.monotonic() if now is None else now
        self.paused_until = float("-inf")

    @property
    def limited(self) -> bool:
        return any(rate is not None for rate in self.rates)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.at = max(self.at, now)
        for i, rate in enumerate(self.rates):
            if rate is not None:
                self.level[i] = min(self.capacity[i], self.level[i] + rate * elapsed)

    def wait_s(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` may go (0: now). A request larger than a bucket goes when the
        bucket is full, leaving it in debt, so that no request waits forever."""
        self._refill(now)
        wait = max(0.0, self.paused_until - now)
        for i, cost in enumerate((1, tokens)):
            rate = self.rates[i]
            if rate is not None:
                need = min(cost, self.capacity[i])
                if self.level[i] < need:
                    wait = max(wait, (need - self.level[i]) / rate)
        return wait

    def take(self, tokens: int, now: float) -> None:
        self._refill(now)
        for i, cost in enumerate((1, tokens)):
            if self.rates[i] is not None:
                self.level[i] -= cost

    def pause(self, seconds: float, now: float) -> None:
        """Nothing goes for `seconds`; then the buckets start empty (the server said it had no room left)."""
        self._refill(now)
        self.paused_until = max(self.paused_until, now + seconds)
        self.level = [min(level, 0.0) for level in self.level]

    def paused_for(self, now: float) -> float:
        return max(0.0, self.paused_until - now)


class Limiter:
    """A Bucket for the coroutines of one process: `acquire` waits its turn (first come, first served)."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 burst_s: float = BURST_S):
        self.bucket = Bucket(requests_per_minute, tokens_per_minute, burst_s)
        self.granted = self.pauses = 0
        self.waited_s = self.paused_s = 0.0
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def limited(self) -> bool:
        return self.bucket.limited

    async def acquire(self, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:  # an asyncio.Lock belongs to one loop
            self._lock = (loop, asyncio.Lock())
        started = time.monotonic()
        async with self._lock[1]:
            while (wait := self.bucket.wait_s(tokens, time.monotonic())) > 0:
                await asyncio.sleep(wait)
            self.bucket.take(tokens, time.monotonic())
        self.granted += 1
        self.waited_s += time.monotonic() - started

    def pause(self, seconds: float) -> None:
        now = time.monotonic()
        self.pauses += 1
        self.paused_s += max(0.0, now + seconds - max(now, self.bucket.paused_until))  # overlaps counted once
        self.bucket.pause(seconds, now)

    def paused_for(self) -> float:
        return self.bucket.paused_for(time.monotonic())

    def stats(self) -> dict:
        return {"granted": self.granted, "pauses": self.pauses, "paused_s": round(self.paused_s, 3),
                "waited_s": round(self.waited_s, 3)}


class LimiterActor:
    """A Limiter in a Ray actor (`shared_limiter` starts it): the one queue of an endpoint for a whole stage."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.limiter = Limiter(requests_per_minute, tokens_per_minute)

    async def acquire(self, tokens: int) -> None:
        await self.limiter.acquire(tokens)

    async def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    async def paused_for(self) -> float:
        return self.limiter.paused_for()

    async def stats(self) -> dict:
        return self.limiter.stats()


class SharedLimiter:
    """An engine's handle on a LimiterActor (picklable: the driver hands it to each Ray Data actor).

    With limits, every request waits its turn in the actor (which also holds them through a pause).
    Without, a request waits only while the stage is paused: the engine's own 429s pause it at once, the
    other engines' are learnt from the actor at most every SYNC_S.
    """

    def __init__(self, actor, limited: bool, sync_s: float = SYNC_S):
        self.actor, self.limited, self.sync_s = actor, limited, sync_s
        self._paused_until = float("-inf")
        self._synced_at = float("-inf")
        self._sync: asyncio.Future | None = None

    def __getstate__(self) -> dict:
        return {"actor": self.actor, "limited": self.limited, "sync_s": self.sync_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    async def acquire(self, tokens: int) -> None:
        if self.limited:
            await self.actor.acquire.remote(tokens)
            return
        now = time.monotonic()
        if now - self._synced_at >= self.sync_s:
            if self._sync is None or self._sync.done():  # one question to the actor at a time
                self._synced_at = now
                self._sync = asyncio.ensure_future(self._learn_pause(now))
            await asyncio.shield(self._sync)
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def _learn_pause(self, asked_at: float) -> None:
        remaining = await self.actor.paused_for.remote()
        self._paused_until = max(self._paused_until, asked_at + remaining)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        self.actor.pause.remote(seconds)  # the others learn it (limited: at once; else within sync_s)

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())


def shared_limiter(requests_per_minute: float | None, tokens_per_minute: float | None) -> SharedLimiter:
    """Start a LimiterActor (it lives as long as the driver that started it, or until killed) and its handle."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=100_000)(LimiterActor).remote(requests_per_minute, tokens_per_minute)
    return SharedLimiter(actor, limited=requests_per_minute is not None or tokens_per_minute is not None)
