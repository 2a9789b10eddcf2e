"""The one interface for every model call: chat messages in -> text + token usage out."""

from __future__ import annotations

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


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Engine(Protocol):
    """What a stage needs from a model: a batch of chats in, one Completion per chat out.

    A failure of one chat is returned as a Completion with `error` set; it never raises for it.
    """

    name: str  # the model reference written into the `decomposer` / `solver` columns

    def generate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]: ...
