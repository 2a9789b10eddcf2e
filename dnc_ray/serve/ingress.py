"""The ingress of the served graph: an HTTP front (api.py routes) that runs the method's strategies over the
Decomposer and Solver deployments, called by handle (`DeploymentModel`: a deployment as the method's Model),
within one deadline per request; it builds no prompt and parses no answer (`dnc_ray.method` does)."""

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from dnc_ray.config import ServeAppConfig
from dnc_ray.llm import Completion, Messages, SamplingParams
from dnc_ray.llm.engine import Chunk
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.row import new_row
from dnc_ray.serve.api import build_api
from dnc_ray.serve.schema import (
    MODELS,
    ChatChoice,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SolveRequest,
    SolveResponse,
    StageUsage,
    TextChoice,
    Usage,
)
from dnc_ray.serve.streaming import ChunkWriter, Events, first_event, solve_events
from dnc_ray.tasks import GENERIC_RULES, TASKS

STAGE_OF_MODEL = {"decomposer": "decompose", "solver": "solve", "pipeline": "solve"}
ROLE_OF_STAGE = {"decompose": "decomposer", "solve": "solver"}
_LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ENGINE_ERROR = re.compile(r"^(\w+): ")  # "<ExceptionType>: <upstream text>", as the engines describe failures


@serve.deployment
@serve.ingress()
class Ingress:
    """Runs a strategy per request over the two deployments within one deadline; failures become 502 / 504."""

    def __init__(self, decomposer: DeploymentHandle, solver: DeploymentHandle, cfg: ServeAppConfig):
        self.cfg = cfg
        self.stages = {"decompose": (decomposer, cfg.decomposer.model), "solve": (solver, cfg.solver.model)}
        self.calls = Counter(
            "dnc_stage_requests", description="model calls per stage and outcome (ok, error, timeout)",
            tag_keys=("stage", "outcome"),
        )
        self.latency = Histogram(
            "dnc_stage_latency_s", description="seconds per model call, queueing and batching included",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("stage",),
        )
        self.ttft = Histogram(
            "dnc_time_to_first_token_s", description="seconds from a streamed request to its first content token",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("model",),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.cfg)

    # ------------------------------------------------------------------ /v1/solve
    async def solve(self, request: SolveRequest) -> SolveResponse:
        started = time.monotonic()
        row = await self._run(request.strategy, request.question, request.context, request.task, self._params("solve"))
        return self._solve_response(row, request.strategy, started)

    def solve_events(self, request: SolveRequest) -> AsyncIterator[str]:
        async def choice(events: Events, index: int) -> None:
            started = time.monotonic()
            sink = Sink(events, index, tokens_from_solver=request.strategy != "self_ask")
            row = await self._run(request.strategy, request.question, request.context, request.task,
                                  self._params("solve"), sink)
            events.put(index, "done", self._solve_response(row, request.strategy, started).model_dump())

        return solve_events(Events([choice]))

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, request: ChatRequest) -> ChatResponse:
        """An OpenAI chat completion from one model, or from the pipeline (the last user message is the question)."""
        answers = await asyncio.gather(*self._answers(request))
        params = self._params(STAGE_OF_MODEL[request.model], request)
        return ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=request.model,
            choices=[ChatChoice(index=i, message=ChatMessage(role="assistant", content=text),
                                finish_reason=_finish(last_tokens, params))
                     for i, (text, _, last_tokens) in enumerate(answers)],
            usage=_sum_usage([usage for _, usage, _ in answers]),
        )

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[str]:
        """Chat chunks of `n` choices; an error before the first output is the response's status."""
        started = time.monotonic()
        self._check_model(request.model, MODELS)
        params = self._params(STAGE_OF_MODEL[request.model], request)
        if request.model == "pipeline":
            question = _last_user_message(request)
            choice = self._pipeline_choice(question, params)
        else:
            choice = self._model_choice(STAGE_OF_MODEL[request.model], [m.model_dump() for m in request.messages], params)
        return await self._stream(request, [choice] * request.n, started, chat=True)

    # ------------------------------------------------------------------ /v1/completions
    async def completion(self, request: CompletionRequest) -> CompletionResponse:
        stage, params, chats = self._completion_calls(request)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        done = await asyncio.gather(*(self._call_ok(stage, chat, params, deadline) for chat in chats))
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=request.model,
            choices=[TextChoice(index=i, text=c.text, finish_reason=_finish(c.completion_tokens, params))
                     for i, c in enumerate(done)],
            usage=_sum_usage(done),
        )

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[str]:
        started = time.monotonic()
        stage, params, chats = self._completion_calls(request)
        return await self._stream(request, [self._model_choice(stage, chat, params) for chat in chats], started, chat=False)

    def models(self) -> ModelList:
        decomposer, solver = self.cfg.decomposer.model.model, self.cfg.solver.model.model
        roots = {"decomposer": decomposer, "solver": solver, "pipeline": f"{decomposer}+{solver}"}
        return ModelList(data=[ModelCard(id=name, root=roots[name]) for name in MODELS])

    # ------------------------------------------------------------------ the strategies, one request
    async def _run(self, strategy: str, question: str, context: str | None, task: str | None,
                   solve_params: SamplingParams, sink: "Sink | None" = None) -> dict:
        """The strategy over one question, as a row: the method builds the prompts and reads the answer."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        row = new_row({"id": "request", "task": task, "split": None, "question": question, "context": context, "answers": None})
        if sink is not None:
            sink.row = row
        models = {
            "decomposer": DeploymentModel(self, "decompose", self._params("decompose"), deadline, sink),
            "solver": DeploymentModel(self, "solve", solve_params, deadline, sink),
        }
        await run_row(STRATEGIES[strategy], row, models, self._options(task))
        if row["error"] is not None:
            raise HTTPException(502, _public_error(row["error"]))
        if sink is not None:
            sink.announce()
        return row

    def _solve_response(self, row: dict, strategy: str, started: float) -> SolveResponse:
        usage = {
            stage: StageUsage(model=row[ROLE_OF_STAGE[stage]], **used)
            for stage, used in row["usage"].items() if used is not None
        }
        return SolveResponse(
            answer=row["prediction"],
            solution=row["solution"],
            subquestions=row["subquestions"],
            decomposition=row["decomposition"],
            strategy=strategy,
            usage=usage,
            cost_usd=sum(u.cost_usd for u in usage.values()),
            latency_s=time.monotonic() - started,
        )

    def _options(self, task: str | None) -> MethodOptions:
        """The request's task's prompt rules (generic ones without a task); the config's cap wins when set."""
        rules = TASKS[task].rules if task else GENERIC_RULES
        if self.cfg.max_subquestions is not None:
            rules = replace(rules, max_subquestions=self.cfg.max_subquestions)
        return MethodOptions(rules=rules, max_turns=self.cfg.max_turns,
                             structured_decompositions=self.cfg.structured_decompositions)

    # ------------------------------------------------------------------ choices of a completion request
    def _answers(self, request: ChatRequest) -> list:
        """`n` coroutines, each (text, usage, completion tokens of the last model call) of one choice."""
        self._check_model(request.model, MODELS)
        stage = STAGE_OF_MODEL[request.model]
        params = self._params(stage, request)

        async def one():
            if request.model == "pipeline":
                row = await self._run("two_stage", _last_user_message(request), None, None, params)
                return row["solution"], _row_usage(row), row["usage"]["solve"]["completion_tokens"]
            deadline = time.monotonic() + self.cfg.request_timeout_s
            done = await self._call_ok(stage, [m.model_dump() for m in request.messages], params, deadline)
            return done.text, _sum_usage([done]), done.completion_tokens

        return [one() for _ in range(request.n)]

    def _model_choice(self, stage: str, chat: Messages, params: SamplingParams):
        async def choice(events: Events, index: int) -> None:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            completion = None
            async for chunk in self._stream_call(stage, chat, params, deadline):
                if chunk.text:
                    events.put(index, "token", chunk.text)
                completion = chunk.completion or completion
            _raise_if_failed(stage, completion)
            events.put(index, "done", _done(completion.prompt_tokens, completion.completion_tokens, params))
        return choice

    def _pipeline_choice(self, question: str, params: SamplingParams):
        async def choice(events: Events, index: int) -> None:
            row = await self._run("two_stage", question, None, None, params, Sink(events, index, tokens_from_solver=True))
            usage = _row_usage(row)
            events.put(index, "done", _done(usage.prompt_tokens, usage.completion_tokens, params,
                                            row["usage"]["solve"]["completion_tokens"]))
        return choice

    async def _stream(self, request, choices: list, started: float, chat: bool) -> AsyncIterator[str]:
        events = Events(choices)
        await first_event(events)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        writer = ChunkWriter(request.model, chat, include_usage, started,
                             on_first_token=lambda s: self.ttft.observe(s, tags={"model": request.model}))
        return writer.write(events)

    def _completion_calls(self, request: CompletionRequest) -> tuple[str, SamplingParams, list[Messages]]:
        self._check_model(request.model, ("decomposer", "solver"))
        stage = STAGE_OF_MODEL[request.model]
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise HTTPException(422, "invalid request: prompt: at least one prompt")
        chats = [[{"role": "user", "content": p}] for p in prompts for _ in range(request.n)]
        return stage, self._params(stage, request), chats

    # ------------------------------------------------------------------ model calls
    async def _call(self, stage: str, chat: Messages, params: SamplingParams, deadline: float) -> Completion:
        """One model call through the stage's handle, its latency as the ingress saw it; 504 past the deadline."""
        handle = self.stages[stage][0]
        started = time.monotonic()
        response = handle.complete.remote(chat, params)
        try:
            done = await asyncio.wait_for(response, deadline - started)
        except asyncio.TimeoutError:  # (TimeoutError from 3.11; asyncio's own on 3.10)
            response.cancel()  # frees the replica (and an upstream's connection) too
            raise self._timeout(stage) from None
        done.latency_s = time.monotonic() - started
        self._observe(stage, done)
        return done

    async def _call_ok(self, stage: str, chat: Messages, params: SamplingParams, deadline: float) -> Completion:
        done = await self._call(stage, chat, params, deadline)
        _raise_if_failed(stage, done)
        return done

    async def _stream_call(self, stage: str, chat: Messages, params: SamplingParams,
                           deadline: float) -> AsyncIterator[Chunk]:
        """One streamed model call: its chunks as they come; the call is cancelled when the reader stops."""
        handle = self.stages[stage][0]
        started = time.monotonic()
        stream = handle.options(stream=True).stream.remote(chat, params)
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), deadline - time.monotonic())
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise self._timeout(stage) from None
                if chunk.completion is not None:
                    chunk.completion.latency_s = time.monotonic() - started
                    self._observe(stage, chunk.completion)
                yield chunk
        finally:
            stream.cancel()  # no-op once finished; otherwise the replica stops generating for nobody

    def _observe(self, stage: str, done: Completion) -> None:
        self.latency.observe(done.latency_s, tags={"stage": stage})
        self.calls.inc(tags={"stage": stage, "outcome": "error" if done.error is not None or done.text is None else "ok"})

    def _timeout(self, stage: str) -> HTTPException:
        self.calls.inc(tags={"stage": stage, "outcome": "timeout"})
        return HTTPException(504, f"{stage}: no answer within request_timeout_s ({self.cfg.request_timeout_s:g} s)")

    def _check_model(self, name: str, allowed: tuple[str, ...]) -> None:
        if name not in allowed:
            raise HTTPException(404, f"the model does not exist on this route: choose one of {', '.join(allowed)}")

    def _params(self, stage: str, request: ChatRequest | CompletionRequest | None = None) -> SamplingParams:
        """The stage model's settings; a request may lower max_tokens and set the rest; n > 1 needs sampling."""
        model = self.stages[stage][1]
        if request is None:
            return SamplingParams(temperature=model.temperature, max_tokens=model.max_tokens)
        temperature = model.temperature if request.temperature is None else request.temperature
        if request.n > 1 and temperature == 0:
            raise HTTPException(400, "n > 1 needs temperature > 0 (greedy decoding gives n identical choices)")
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        asked = request.max_completion_tokens or request.max_tokens or model.max_tokens
        return SamplingParams(temperature=temperature, max_tokens=min(asked, model.max_tokens), stop=stop,
                              seed=request.seed)


class Sink:
    """Where a streamed request's run puts its events: the decomposition and sub-questions as they
    appear in the row, and the solver's tokens when the solver writes the answer (not self_ask's follow-ups)."""

    def __init__(self, events: Events, index: int, tokens_from_solver: bool):
        self.events, self.index, self.tokens_from_solver = events, index, tokens_from_solver
        self.row: dict | None = None
        self.decomposition_sent, self.subquestions_sent = False, 0

    def announce(self) -> None:
        row = self.row
        if not self.decomposition_sent and row["decomposition"] is not None:
            self.decomposition_sent = True
            self.events.put(self.index, "decomposition", {"decomposition": row["decomposition"],
                                                          "subquestions": row["subquestions"]})
        for i, text in enumerate((row["subquestions"] or [])[self.subquestions_sent:], start=self.subquestions_sent):
            self.events.put(self.index, "subquestion", {"index": i, "text": text})
            self.subquestions_sent = i + 1

    def token(self, text: str) -> None:
        self.events.put(self.index, "token", text)


class DeploymentModel:
    """A Decomposer or Solver deployment as the method's Model, within one request's deadline."""

    def __init__(self, ingress: Ingress, stage: str, params: SamplingParams, deadline: float, sink: Sink | None = None):
        self.ingress, self.stage, self.params, self.deadline, self.sink = ingress, stage, params, deadline, sink
        model = ingress.stages[stage][1]
        self.name, self.cost = model.model, model.price.cost

    async def complete(self, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> Completion:
        params = replace(self.params, stop=self.params.stop + stop, json_schema=json_schema) if stop or json_schema else self.params
        if self.sink is None:
            return await self.ingress._call(self.stage, chat, params, self.deadline)
        self.sink.announce()
        if not (self.stage == "solve" and self.sink.tokens_from_solver):
            return await self.ingress._call(self.stage, chat, params, self.deadline)
        completion = None
        async for chunk in self.ingress._stream_call(self.stage, chat, params, self.deadline):
            if chunk.text:
                self.sink.token(chunk.text)
            completion = chunk.completion or completion
        return completion


def _public_error(error: str) -> str:
    """A failed row's error for an HTTP client: the step and what failed, never an upstream's text."""
    step, _, reason = error.partition(": ")
    engine_error = _ENGINE_ERROR.match(reason)
    return f"{step}: the model failed: {engine_error.group(1) if engine_error else reason}"


def _raise_if_failed(stage: str, done: Completion | None) -> None:
    if done is None or done.error is not None or done.text is None:
        reason = "no answer" if done is None else (done.error or "empty reply")
        raise HTTPException(502, _public_error(f"{stage}: {reason}"))


def _last_user_message(request: ChatRequest) -> str:
    question = next((m.content for m in reversed(request.messages) if m.role == "user"), None)
    if question is None:
        raise HTTPException(422, "model pipeline answers the last user message, and there is none")
    return question


def _row_usage(row: dict) -> Usage:
    used = [u for u in row["usage"].values() if u is not None]
    prompt, completion = sum(u["prompt_tokens"] for u in used), sum(u["completion_tokens"] for u in used)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sum_usage(usages: list) -> Usage:
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(completion_tokens: int, params: SamplingParams) -> str:
    return "length" if completion_tokens >= params.max_tokens else "stop"


def _done(prompt_tokens: int, completion_tokens: int, params: SamplingParams, last_tokens: int | None = None) -> dict:
    """A choice's end: its finish reason (from the last model call's tokens) and its usage."""
    last = completion_tokens if last_tokens is None else last_tokens
    return {"finish_reason": _finish(last, params), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
