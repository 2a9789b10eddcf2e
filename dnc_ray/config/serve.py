"""`dnc serve`: the served graph (a decomposer and a solver deployment behind one ingress) and where it listens."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import (
    Field,
    model_validator,
)

from dnc_ray.config.generate import RayConfig, check_structured_decompositions
from dnc_ray.config.load import Strict
from dnc_ray.llm.configs import (
    HFModel,
    OpenAIModel,
    VLLMModel,
)

ServedEngine = Annotated[Union[OpenAIModel, HFModel, VLLMModel], Field(discriminator="engine")]


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica the autoscaler aims at")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class ServedModel(Strict):
    """One half of the served graph (decomposer or solver): its model and its Serve deployment.

    An hf model's replica reserves the model's `num_gpus` and batches up to its `batch_size`
    concurrent requests into one generate call.
    """

    model: ServedEngine
    replicas: int | None = Field(None, gt=0, description="fixed replica count; 1 when autoscaling is not set either")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs each replica reserves")
    max_ongoing_requests: int = Field(32, gt=0, description="requests a replica holds at once")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="hf models: how long a batch waits to fill")

    @model_validator(mode="after")
    def _settings_agree(self) -> "ServedModel":
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set either `replicas` or `autoscaling`, not both")
        if getattr(self.model, "mode", "online") == "batch":
            raise ValueError("model.mode batch is for offline runs (`dnc generate`): a served model answers online")
        if isinstance(self.model, HFModel) and self.model.batch_size > self.max_ongoing_requests:
            raise ValueError("model.batch_size is larger than max_ongoing_requests: batches could never fill")
        return self


class ServedIngress(Strict):
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(256, gt=0, description="HTTP requests the ingress holds at once")


class ServeAppConfig(Strict):
    """The served graph: what `dnc_ray.serve.app:build_app` takes (`args:` of a Serve config file)."""

    decomposer: ServedModel
    solver: ServedModel
    ingress: ServedIngress = ServedIngress()
    request_timeout_s: float = Field(60.0, gt=0, description="bound on one request over all its stages: then 504")
    max_body_bytes: int = Field(65536, gt=0, description="larger request bodies get 413")
    auth_token_env: str | None = Field(None, description="NAME of the env var holding the bearer token; null: no auth")
    max_subquestions: int | None = Field(
        None, gt=0, description="None: the request's task's default (2 on Bamboogle), else 3"
    )
    max_turns: int = Field(8, gt=0, description="self_ask: decomposer turns before a request without a final answer fails")
    structured_decompositions: bool = Field(False, description="the decomposer (engine vllm) writes its sub-questions "
                                            "as a JSON list (guided decoding), for two_stage requests")

    @model_validator(mode="after")
    def _structured_decompositions_need_vllm(self) -> "ServeAppConfig":
        if self.structured_decompositions:
            check_structured_decompositions(self.decomposer.model)
        return self


class ServeConfig(ServeAppConfig):
    """`dnc serve`: the served graph, where it listens and which Ray runs it."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    log_dir: str = Field("runs/serve/logs", description="where Ray's and Serve's logs go (unless dnc --verbose)")
    ray: RayConfig = RayConfig()
