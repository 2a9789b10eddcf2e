"""Streamed responses: the events of a request's choices, written as server-sent events.

Each choice of a request (n of them) runs as its own task and puts its events into one `Events`
queue: `decomposition`, `subquestion`, `token` (new text), then `done` or `error`. The writers turn
them into OpenAI chat / text completion chunks or `/v1/solve` events. Closing the response (the
client went away) cancels every choice's task, which cancels its model calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException

from dnc_ray.serve.schema import error_body, sse_data

logger = logging.getLogger(__name__)

Choice = Callable[["Events", int], Awaitable[None]]


@dataclass
class Event:
    index: int  # the choice
    kind: str  # decomposition | subquestion | token | done | error
    payload: object = None


class Events:
    """The choices' tasks and the queue they share."""

    def __init__(self, choices: list[Choice]):
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._run(choice, i)) for i, choice in enumerate(choices)]
        self.open = len(choices)

    def put(self, index: int, kind: str, payload: object = None) -> None:
        self.queue.put_nowait(Event(index, kind, payload))

    async def _run(self, choice: Choice, index: int) -> None:
        try:
            await choice(self, index)
        except HTTPException as e:
            self.put(index, "error", (e.status_code, str(e.detail)))
        except Exception:  # a bug: the client gets a 500-style error event, the log gets the traceback
            logger.exception("a streamed choice failed")
            self.put(index, "error", (500, "internal error"))

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while self.open:
                event = await self.queue.get()
                self.open -= event.kind in ("done", "error")
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


async def first_event(events: Events) -> Event:
    """The first event; an error before any output becomes the HTTP status (nothing was sent yet)."""
    try:
        event = await events.queue.get()
    except asyncio.CancelledError:
        events.cancel()
        raise
    if event.kind == "error":
        events.cancel()
        raise HTTPException(*event.payload)
    events.queue.put_nowait(event)  # back in front: the queue is FIFO and nothing else was read
    return event


@dataclass
class ChunkWriter:
    """OpenAI chunks of one streamed response (`chat.completion.chunk` or `text_completion`)."""

    model: str
    chat: bool
    include_usage: bool
    started: float
    on_first_token: Callable[[float], None]
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    decompositions: dict[int, dict] = field(default_factory=dict)  # choice -> the pipeline's decomposition

    async def write(self, events: Events) -> AsyncIterator[str]:
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        opened, first_token = set(), True
        async for event in events:
            if event.kind == "error":
                yield sse_data(error_body(*event.payload))
                continue
            if self.chat and event.index not in opened and event.kind in ("token", "done"):
                opened.add(event.index)
                yield self._chunk(event.index, {"role": "assistant", "content": "", **self._decomposition(event)})
            if event.kind == "token":
                if first_token:
                    first_token = False
                    self.on_first_token(time.monotonic() - self.started)
                yield self._chunk(event.index, {"content": event.payload} if self.chat else event.payload)
            elif event.kind == "done":
                for key in usage:
                    usage[key] += event.payload[key]
                yield self._chunk(event.index, {} if self.chat else "", finish=event.payload["finish_reason"])
            elif event.kind == "decomposition":
                self.decompositions[event.index] = event.payload
        if self.include_usage:
            yield sse_data(self._head() | {"choices": [], "usage": usage | {"total_tokens": sum(usage.values())}})
        yield sse_data("[DONE]")

    def _decomposition(self, event: Event) -> dict:
        """The pipeline's decomposition rides on its choice's first chunk, as `dnc_decomposition`."""
        found = self.decompositions.get(event.index)
        return {"dnc_decomposition": found} if found else {}

    def _head(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, index: int, delta: dict | str, finish: str | None = None) -> str:
        choice = {"index": index, "finish_reason": finish, "logprobs": None}
        choice |= {"delta": delta} if self.chat else {"text": delta}
        return sse_data(self._head() | {"choices": [choice]})


async def solve_events(events: Events) -> AsyncIterator[str]:
    """`/v1/solve` events: decomposition, subquestion, token, then answer (or error)."""
    async for event in events:
        if event.kind == "error":
            yield sse_data(error_body(*event.payload), event="error")
        elif event.kind == "done":
            yield sse_data(event.payload, event="answer")
        else:
            yield sse_data(event.payload if event.kind != "token" else {"text": event.payload}, event=event.kind)
