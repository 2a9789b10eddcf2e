"""The served graph: an HTTP ingress that runs the method's strategies over the Decomposer and Solver
deployments, called by handle.

    HTTP -> Ingress: run_row(strategy) --handle--> Decomposer.complete / Solver.complete -> answer

The ingress builds no prompt and parses no answer: `dnc_ray.method` does, as in every runtime.

`serve run` / `serve deploy` / a KubeRay RayService: `import_path: dnc_ray.serve.app:build_app`
with `ServeAppConfig` settings under `args:`. `dnc serve --config <yaml>` runs `serve_forever`.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation to validate `args`.

import asyncio
import time
import uuid
from dataclasses import replace

from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from dnc_ray.config import HFModel, ServeAppConfig, ServeConfig, ServedModel
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm import Completion, Messages, SamplingParams
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.serve.api import build_api
from dnc_ray.serve.deployments import LocalModel, RemoteModel
from dnc_ray.serve.schema import (
    MODELS,
    ChatChoice,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ModelCard,
    ModelList,
    SolveRequest,
    SolveResponse,
    StageUsage,
    Usage,
)
from dnc_ray.method.row import new_row
from dnc_ray.tasks import GENERIC_RULES, TASKS

APP_NAME = "dnc"
STAGE_OF_MODEL = {"decomposer": "decompose", "solver": "solve"}
ROLE_OF_STAGE = {"decompose": "decomposer", "solve": "solver"}
_LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


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

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.cfg)

    async def solve(self, request: SolveRequest) -> SolveResponse:
        return await self._solve(request.question, request.context, request.task, request.strategy, self._params("solve"))

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """An OpenAI chat completion from one model, or from the pipeline (the last user message is the question)."""
        if request.model not in MODELS:
            raise HTTPException(404, f"model {request.model!r} does not exist: choose one of {', '.join(MODELS)}")
        stage = STAGE_OF_MODEL.get(request.model, "solve")
        params = self._params(stage, request)
        if request.model == "pipeline":
            question = next((m.content for m in reversed(request.messages) if m.role == "user"), None)
            if question is None:
                raise HTTPException(422, "model pipeline answers the last user message, and there is none")
            solved = await self._solve(question, None, None, "two_stage", params)
            text, usages = solved.solution, list(solved.usage.values())
            last_completion_tokens = solved.usage["solve"].completion_tokens
        else:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            done = await self._call(stage, [m.model_dump() for m in request.messages], params, deadline)
            if done.error is not None or not done.text:
                raise HTTPException(502, f"{stage}: the model failed: {done.error or 'empty reply'}")
            text, usages = done.text, [done]
            last_completion_tokens = done.completion_tokens
        prompt_tokens = sum(u.prompt_tokens for u in usages)
        completion_tokens = sum(u.completion_tokens for u in usages)
        return ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=request.model,
            choices=[ChatChoice(
                message=ChatMessage(role="assistant", content=text),
                finish_reason="length" if last_completion_tokens >= params.max_tokens else "stop",
            )],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
        )

    def models(self) -> ModelList:
        decomposer, solver = self.cfg.decomposer.model.model, self.cfg.solver.model.model
        roots = {"decomposer": decomposer, "solver": solver, "pipeline": f"{decomposer}+{solver}"}
        return ModelList(data=[ModelCard(id=name, root=roots[name]) for name in MODELS])

    async def _solve(self, question: str, context: str | None, task: str | None, strategy: str,
                     solve_params: SamplingParams) -> SolveResponse:
        """The strategy over one question, as a row: the method builds the prompts and reads the answer."""
        started = time.monotonic()
        deadline = started + self.cfg.request_timeout_s
        models = {
            "decomposer": DeploymentModel(self, "decompose", self._params("decompose"), deadline),
            "solver": DeploymentModel(self, "solve", solve_params, deadline),
        }
        row = new_row({"id": "request", "task": task, "split": None, "question": question, "context": context, "answers": None})
        await run_row(STRATEGIES[strategy], row, models, self._options(task))
        if row["error"] is not None:
            step, _, reason = row["error"].partition(": ")
            raise HTTPException(502, f"{step}: the model failed: {reason}")
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
        return MethodOptions(rules=rules, max_turns=self.cfg.max_turns)

    async def _call(self, stage: str, chat: Messages, params: SamplingParams, deadline: float) -> Completion:
        """One model call through the stage's handle, its latency as the ingress saw it; 504 past the deadline."""
        handle = self.stages[stage][0]
        started = time.monotonic()
        response = handle.complete.remote(chat, params)
        try:
            done = await asyncio.wait_for(response, deadline - started)
        except TimeoutError:
            response.cancel()  # frees the replica (and an upstream's connection) too
            self.calls.inc(tags={"stage": stage, "outcome": "timeout"})
            raise HTTPException(504, f"{stage}: no answer within request_timeout_s ({self.cfg.request_timeout_s:g} s)") from None
        done.latency_s = time.monotonic() - started
        self.latency.observe(done.latency_s, tags={"stage": stage})
        self.calls.inc(tags={"stage": stage, "outcome": "error" if done.error is not None or not done.text else "ok"})
        return done

    def _params(self, stage: str, request: ChatRequest | None = None) -> SamplingParams:
        """The stage model's settings; a chat request may lower max_tokens and set the rest."""
        model = self.stages[stage][1]
        if request is None:
            return SamplingParams(temperature=model.temperature, max_tokens=model.max_tokens)
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        return SamplingParams(
            temperature=model.temperature if request.temperature is None else request.temperature,
            max_tokens=min(request.max_tokens or model.max_tokens, model.max_tokens),
            stop=stop,
            seed=request.seed,
        )


class DeploymentModel:
    """A Decomposer or Solver deployment as the method's Model, within one request's deadline."""

    def __init__(self, ingress: Ingress, stage: str, params: SamplingParams, deadline: float):
        self.ingress, self.stage, self.params, self.deadline = ingress, stage, params, deadline
        model = ingress.stages[stage][1]
        self.name, self.cost = model.model, model.price.cost

    async def complete(self, chat: Messages, stop: tuple[str, ...] = ()) -> Completion:
        params = replace(self.params, stop=self.params.stop + stop) if stop else self.params
        return await self.ingress._call(self.stage, chat, params, self.deadline)


def build_app(args: ServeAppConfig) -> Application:
    """The Serve application: the Ingress bound to a Decomposer and a Solver deployment."""
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": args.ingress.num_cpus},
        max_ongoing_requests=args.ingress.max_ongoing_requests,
    )
    return ingress.bind(_model_deployment("Decomposer", args.decomposer), _model_deployment("Solver", args.solver), args)


def _model_deployment(name: str, served: ServedModel) -> Application:
    if isinstance(served.model, HFModel):
        deployment, init = LocalModel, (served.model, served.batch_wait_timeout_s)
        resources = {"num_cpus": served.num_cpus, "num_gpus": served.model.num_gpus}
    else:
        deployment, init = RemoteModel, (served.model,)
        resources = {"num_cpus": served.num_cpus}
    if served.autoscaling is not None:
        scaling = {"autoscaling_config": served.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": served.replicas or 1}
    return deployment.options(
        name=name,
        ray_actor_options=resources,
        max_ongoing_requests=served.max_ongoing_requests,
        **scaling,
    ).bind(*init)


def serve_forever(cfg: ServeConfig) -> None:
    """Run the app on cfg.host:cfg.port until Ctrl-C, then shut Serve down."""
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix)
        print(f"[serve] http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1 is up (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    finally:
        serve.shutdown()
