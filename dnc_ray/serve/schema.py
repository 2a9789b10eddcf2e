"""The HTTP API's request and response bodies: `/v1/solve` and the OpenAI-compatible subset.

A request field the server does not honour is refused (400, naming the field) rather than ignored:
`HONOURED` lists what each route reads; `unsupported_fields` finds the rest. OpenAI fields the
server does not implement are named in the refusal; other unknown fields are counted, not repeated.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dnc_ray.tasks import TASKS

MODELS = ("decomposer", "solver", "pipeline")

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                502: "upstream_error", 504: "timeout_error"}

# OpenAI request fields this server does not implement; accepted only at their neutral value.
NOT_IMPLEMENTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "top_p": (None, 1, 1.0), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,), "suffix": (None, ""),
    "echo": (None, False), "best_of": (None, 1),
}


def unsupported_fields(extra: dict[str, Any] | None) -> str | None:
    """Why the request's extra fields are refused (None when every one is a neutral OpenAI default)."""
    extra = extra or {}
    named = sorted(k for k, v in extra.items() if k in NOT_IMPLEMENTED and v not in NOT_IMPLEMENTED[k])
    unknown = sum(k not in NOT_IMPLEMENTED for k in extra)
    if named:
        return f"field `{named[0]}` is not supported by this server (see the honoured fields in the README)"
    if unknown:
        return f"the request has {unknown} unknown field{'s' * (unknown > 1)} (see the honoured fields in the README)"
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by unsupported_fields with a 400


class SolveRequest(_Request):
    question: str = Field(min_length=1)
    context: str | None = Field(None, description="a passage the question is about (DROP-like tasks)")
    task: str | None = Field(None, description="a task's prompt rules (bamboogle: bare direct prompt, 2 sub-questions)")
    strategy: Literal["two_stage", "direct", "self_ask"] = "two_stage"
    stream: bool = Field(False, description="server-sent events: decomposition, subquestion, token, answer")

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(_Request):
    """The sampling fields both completion routes honour."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0, description="the newer name of max_tokens")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16, description="samples per prompt; > 1 needs temperature > 0")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and not used")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="each prompt is sent as one user message through the chat template")


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


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
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


HONOURED = {
    "/v1/solve": sorted(SolveRequest.model_fields),
    "/v1/chat/completions": sorted(ChatRequest.model_fields),
    "/v1/completions": sorted(CompletionRequest.model_fields),
}


def sse_data(payload: dict | str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
