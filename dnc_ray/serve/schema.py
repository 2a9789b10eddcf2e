"""The HTTP API's request and response bodies: `/v1/solve` and the OpenAI-compatible subset."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dnc_ray.tasks import TASKS

MODELS = ("decomposer", "solver", "pipeline")


class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    context: str | None = Field(None, description="a passage the question is about (DROP-like tasks)")
    task: str | None = Field(None, description="a task's prompt rules (bamboogle: bare direct prompt, 2 sub-questions)")
    strategy: Literal["two_stage", "direct", "self_ask"] = "two_stage"

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task; known: {', '.join(TASKS)}")
        return task


class StageUsage(BaseModel):
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float = Field(description="as the ingress saw it: queueing, batching and generation")
    calls: int = Field(description="model calls of the stage (self_ask: one per turn or follow-up)")


class SolveResponse(BaseModel):
    answer: str
    solution: str
    subquestions: list[str] | None = Field(description="null for the direct strategy; self_ask: the follow-ups")
    decomposition: str | None = Field(description="the decomposer's raw text (two_stage)")
    strategy: Literal["two_stage", "direct", "self_ask"]
    usage: dict[str, StageUsage] = Field(description="per stage: decompose (two_stage, self_ask), solve")
    cost_usd: float
    latency_s: float


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat completion request that the server honours; others are ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dnc-ray"
    root: str = Field(description="the model behind it: decomposer+solver for the pipeline")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
