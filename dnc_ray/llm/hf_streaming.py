"""Streaming a batch of chats from a local model: each row's new text as the batch generates, rows
that nobody reads any more stopped early, and the same final Completions as `HFEngine.generate`.

    async for row, chunk in engine.astream_batch(chats, params, cancelled):  # an HFEngine; threading.Events
        ...   # chunk.text: new text of that row; its last chunk carries the Completion

`generate` runs in a worker thread; a `RowStreamer` gets each step's tokens, decodes every row's
text so far and hands the new part to the event loop. Text that could still change is held back:
an incomplete UTF-8 character, a possible start of a stop string, trailing whitespace (the final
text is stripped). A `Cancelled` stopping criterion ends a row whose event is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dnc_ray.llm.engine import Chunk, Completion, Messages, SamplingParams

GenerateBatch = Callable[[list[Messages], SamplingParams, BaseStreamer, StoppingCriteriaList], list[Completion]]


async def stream_batch(
    tokenizer, generate_batch: GenerateBatch, chats: list[Messages], params: SamplingParams,
    cancelled: list[threading.Event],
) -> AsyncIterator[tuple[int, Chunk]]:
    """(row, chunk) events of one batch, in the order they are produced; each row ends with its Completion."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sent = [""] * len(chats)

    def on_text(row: int, text: str) -> None:  # called from the generate thread
        loop.call_soon_threadsafe(events.put_nowait, (row, text))

    streamer = RowStreamer(tokenizer, len(chats), params.stop, on_text)
    stopping = StoppingCriteriaList([Cancelled(cancelled)])
    generation = asyncio.ensure_future(asyncio.to_thread(generate_batch, chats, params, streamer, stopping))
    generation.add_done_callback(lambda _: events.put_nowait(None))
    while (event := await events.get()) is not None:
        row, text = event
        sent[row] += text
        yield row, Chunk(text)
    for row, completion in enumerate(await generation):
        # the held-back rest: the final text is what generate returns, and starts with what was sent
        rest = completion.text[len(sent[row]):] if completion.text.startswith(sent[row]) else ""
        yield row, Chunk(rest, completion)


class Cancelled(StoppingCriteria):
    """Ends the rows whose event is set (their reader went away); the others go on."""

    def __init__(self, cancelled: list[threading.Event]):
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([event.is_set() for event in self.cancelled], device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Receives each generation step's token per row; passes each row's safely final new text on."""

    def __init__(self, tokenizer, rows: int, stop: tuple[str, ...], on_text: Callable[[int, str], None]):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.finished = [False] * rows
        self.prompt_seen = False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[row]:
                continue
            if token in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
                self.finished[row] = True
                continue
            self.ids[row].append(token)
            self._emit(row)

    def end(self) -> None:
        """Nothing: the rest of each row comes from the final Completion."""

    def _emit(self, row: int) -> None:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True).lstrip()
        cuts = [text.index(s) for s in self.stop if s in text]
        if cuts:
            self.finished[row] = True
            text = text[: min(cuts)]
        elif self.hold:
            text = text[: max(len(text) - self.hold, 0)]
        ready = text.rstrip().removesuffix("\ufffd")
        if len(ready) > len(self.sent[row]) and ready.startswith(self.sent[row]):
            self.on_text(row, ready[len(self.sent[row]):])
            self.sent[row] = ready
