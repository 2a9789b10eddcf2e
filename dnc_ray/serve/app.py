"""The served graph: an HTTP ingress that runs the method's strategies over the Decomposer and Solver
deployments, called by handle.

    HTTP -> Ingress: run_row(strategy) --handle--> Decomposer / Solver (.complete, or .stream) -> answer

This file binds the graph (`build_app`: the Ingress of ingress.py over one deployment per role, deployments.py)
and runs it (`serve_forever`). The ingress builds no prompt and parses no answer: `dnc_ray.method` does, as in
every runtime.
Streamed responses (streaming.py) relay the models' chunks as they come; a client that goes away
cancels the model calls.

`serve run` / `serve deploy` / a KubeRay RayService: `import_path: dnc_ray.serve.app:build_app`
with `ServeAppConfig` settings under `args:`. `dnc serve --config <yaml>` runs `serve_forever`.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation to validate `args`.

import time

from ray import serve
from ray.serve import Application

from dnc_ray.config import ServeAppConfig, ServeConfig, ServedModel
from dnc_ray.infra import console
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.configs import HFModel, VLLMModel
from dnc_ray.llm.vllm_settings import check_settings
from dnc_ray.serve.deployments import EngineModel, LocalModel
from dnc_ray.serve.ingress import Ingress

APP_NAME = "dnc"


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
        deployment, init = EngineModel, (served.model,)
        resources = {"num_cpus": served.num_cpus, "num_gpus": getattr(served.model, "num_gpus", 0)}
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
    for role in ("decomposer", "solver"):  # a bad vllm setting: one line, before Ray starts
        if isinstance(model := getattr(cfg, role).model, VLLMModel):
            check_settings(model, role)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix)
        console.say(f"[serve] http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1 is up (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.say("[serve] shutting down")
    finally:
        serve.shutdown()
