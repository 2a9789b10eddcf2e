"""The served graph: an HTTP ingress that composes the Decomposer and Solver deployments by handle.

    HTTP -> Ingress --handle--> Decomposer.complete (two_stage only) --handle--> Solver.complete -> answer

`serve run` / `serve deploy` / a KubeRay RayService: `import_path: dnc_ray.serve.app:build_app`
with `ServeAppConfig` settings under `args:`. `dnc serve --config <yaml>` runs `serve_forever`.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation to validate `args`.

import asyncio
import time
import uuid

from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from dnc_ray.config import HFModel, ServeAppConfig, ServeConfig, ServedModel
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm import SamplingParams
from dnc_ray.prompts import (
    decompose_messages,
    direct_messages,
    extract_answer,
    parse_subquestions,
    solve_messages,
)
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

APP_NAME = "dnc"
STAGE_OF_MODEL = {"decomposer": "decompose", "solver": "solve"}
_LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


@serve.deployment
@serve.ingress()
class Ingress:
    """Builds the prompts, calls the stages within one deadline, and turns failures into 502 / 504."""

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
        """An OpenAI chat completion from one stage, or from the pipeline (the last user message is the question)."""
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
        else:
            deadline = time.monotonic() + self.cfg.request_timeout_s
            text, usage = await self._call(stage, [m.model_dump() for m in request.messages], params, deadline)
            usages = [usage]
        prompt_tokens = sum(u.prompt_tokens for u in usages)
        completion_tokens = sum(u.completion_tokens for u in usages)
        return ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=request.model,
            choices=[ChatChoice(
                message=ChatMessage(role="assistant", content=text),
                finish_reason="length" if usages[-1].completion_tokens >= params.max_tokens else "stop",
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
        started = time.monotonic()
        deadline = started + self.cfg.request_timeout_s
        usage, decomposition, subquestions = {}, None, None
        if strategy == "two_stage":
            chat = decompose_messages(question, context, self.cfg.max_subquestions)
            decomposition, usage["decompose"] = await self._call("decompose", chat, self._params("decompose"), deadline)
            subquestions = parse_subquestions(decomposition)
            chat = solve_messages(question, context, subquestions)
        else:
            chat = direct_messages(question, context, task)
        solution, usage["solve"] = await self._call("solve", chat, solve_params, deadline)
        return SolveResponse(
            answer=extract_answer(solution),
            solution=solution,
            subquestions=subquestions,
            decomposition=decomposition,
            strategy=strategy,
            usage=usage,
            cost_usd=sum(u.cost_usd for u in usage.values()),
            latency_s=time.monotonic() - started,
        )

    async def _call(self, stage: str, chat: list[dict], params: SamplingParams, deadline: float) -> tuple[str, StageUsage]:
        """One model call through the stage's handle: 504 past the deadline, 502 when the model fails."""
        handle, model = self.stages[stage]
        started = time.monotonic()
        response = handle.complete.remote(chat, params)
        try:
            done = await asyncio.wait_for(response, deadline - started)
        except TimeoutError:
            response.cancel()  # frees the replica (and an upstream's connection) too
            self.calls.inc(tags={"stage": stage, "outcome": "timeout"})
            raise HTTPException(504, f"{stage}: no answer within request_timeout_s ({self.cfg.request_timeout_s:g} s)") from None
        latency = time.monotonic() - started
        self.latency.observe(latency, tags={"stage": stage})
        if done.error is not None or done.text is None:
            self.calls.inc(tags={"stage": stage, "outcome": "error"})
            raise HTTPException(502, f"{stage}: the model failed: {done.error or 'empty reply'}")
        self.calls.inc(tags={"stage": stage, "outcome": "ok"})
        return done.text, StageUsage(
            model=model.model,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cost_usd=model.price.cost(done.prompt_tokens, done.completion_tokens),
            latency_s=latency,
        )

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
