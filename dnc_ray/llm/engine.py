"""The one interface for every model call: chat messages in -> text + token usage out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": "..."}]


@dataclass
class Completion:
    """One model answer, or the error that replaced it."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class Chunk:
    """A piece of a streamed answer: the text new since the last chunk; the last chunk (text "")
    carries the whole answer as a Completion, usage or error included."""

    text: str
    completion: Completion | None = None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: str | None = None  # guided decoding (engine vllm): the answer is JSON of this schema


class Engine(Protocol):
    """What every caller (Ray Data stages, Serve deployments, benchmarks) uses: a batch of chats in,
    one Completion per chat out, in order.

    An endpoint's failure for one chat (HTTP error, timeout, garbage reply) is that chat's Completion
    with `error` set; a bug in the engine itself raises.
    """

    name: str  # the model reference written into the `decomposer` / `solver` columns

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]: ...

    def astream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """One chat's answer as it is generated; the concatenated texts equal the final Completion's."""
        ...
