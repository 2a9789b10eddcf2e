"""`dnc generate`: a task, a strategy and its models, the run's limits (failed rows, budget) and its Ray."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from dnc_ray.config.load import Strict
from dnc_ray.llm.configs import (
    LOCAL_ENGINES,
    ModelConfig,
    OpenAIModel,
    ReferenceModel,
    VLLMModel,
)
from dnc_ray.method.strategies import STRATEGIES
from dnc_ray.tasks import TaskConfig, get_task


def check_structured_decompositions(decomposer: object) -> None:
    if not isinstance(decomposer, VLLMModel):
        raise ValueError("structured_decompositions use vLLM's guided decoding: give the decomposer engine vllm")


class RayConfig(Strict):
    address: str | None = Field(None, description="cluster address; null starts (or joins) local Ray")
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local Ray; null = all cores")


def _failed_rows(value: int | str) -> int | str:
    if isinstance(value, str):
        share = value.strip().removesuffix("%")
        try:
            number = float(share) if value.strip().endswith("%") else None
        except ValueError:
            number = None
        if number is None or not 0 <= number <= 100:
            raise ValueError(f"expected a count (0, 10) or a share such as '5%', got {value!r}")
        return value.strip()
    if value < 0:
        raise ValueError("a count of rows cannot be negative")
    return value


FailedRows = Annotated[Union[int, str], AfterValidator(_failed_rows)]


def failed_rows_allowed(limit: int | str, rows: int) -> int:
    """How many of `rows` may fail under a `max_failed_rows` setting (a count, or a share '5%')."""
    if isinstance(limit, str):
        return int(float(limit.removesuffix("%")) * rows / 100)
    return limit


class GenerateConfig(Strict):
    task: TaskConfig
    strategy: str = Field(description="a strategy of dnc_ray.method.STRATEGIES: direct, two_stage, decompose, solve, self_ask")
    output: str
    decomposer: ModelConfig | None = None
    solver: ModelConfig | None = None
    decompositions: str | None = Field(None, description="strategy solve: the run holding decompositions")
    num_samples: int = Field(1, gt=0, description="decompositions sampled per question")
    max_subquestions: int | None = Field(
        None, gt=0, description="None: the task's default (the paper: 2 on Bamboogle, 3 elsewhere)"
    )
    max_turns: int = Field(8, gt=0, description="self_ask: decomposer turns before a row without a final answer fails")
    structured_decompositions: bool = Field(False, description="the decomposer (engine vllm) writes its sub-questions "
                                            "as a JSON list of at most max_subquestions questions (guided decoding)")
    max_failed_rows: FailedRows = Field(0, description="failed rows allowed before `dnc generate` exits 3: "
                                        "a count, or a share of the run's rows such as '5%'")
    budget_usd: float | None = Field(None, gt=0, description="the run's spend cap (its rows' cost, earlier attempts "
                                     "included): no request starts past it; `dnc generate` then exits 4")
    progress_interval_s: float = Field(10.0, gt=0)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cost_controls_agree(self) -> "GenerateConfig":
        models = [m for m in (self.decomposer, self.solver) if m is not None]
        online = [m for m in models if isinstance(m, OpenAIModel) and m.mode == "online"]
        for a in online:
            for b in online:
                limits = zip((a.requests_per_minute, a.tokens_per_minute), (b.requests_per_minute, b.tokens_per_minute), strict=True)
                if a.limit_key == b.limit_key and any(x is not None and y is not None and x != y for x, y in limits):
                    raise ValueError(f"decomposer and solver call {a.model} at {a.base_url}: one rate limit holds for "
                                     "both, give them the same requests_per_minute and tokens_per_minute")
        if any(isinstance(m, OpenAIModel) and m.mode == "batch" for m in models) and any(isinstance(m, LOCAL_ENGINES) for m in models):
            raise ValueError("a run with a batch-mode model is driven from the driver and cannot hold a local (hf, vllm) "
                             "model: run the local step as its own run (e.g. strategy decompose), then strategy solve in batch mode")
        return self

    @model_validator(mode="after")
    def _structured_decompositions_need_vllm(self) -> "GenerateConfig":
        if self.structured_decompositions:
            check_structured_decompositions(self.decomposer)
            if self.strategy not in ("two_stage", "decompose"):
                raise ValueError("structured_decompositions shape the decompose step: use strategy two_stage or decompose")
        return self

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        return strategy

    @model_validator(mode="after")
    def _max_subquestions_of_the_task(self) -> "GenerateConfig":
        if self.max_subquestions is None:
            self.max_subquestions = get_task(self.task).rules.max_subquestions
        return self

    @model_validator(mode="after")
    def _strategy_has_its_models(self) -> "GenerateConfig":
        roles = STRATEGIES[self.strategy].roles
        for role in ("decomposer", "solver"):
            if role in roles and getattr(self, role) is None:
                raise ValueError(f"strategy {self.strategy} needs a `{role}`")
            if role not in roles and getattr(self, role) is not None:
                raise ValueError(f"strategy {self.strategy} runs no {role}: remove `{role}`")
        if self.strategy == "self_ask" and isinstance(self.decomposer, ReferenceModel):
            raise ValueError("self_ask writes its follow-ups turn by turn: the reference decomposer cannot")
        if isinstance(self.solver, ReferenceModel):
            raise ValueError("the reference engine only decomposes; pick an hf or openai solver")
        if (self.strategy == "solve") != (self.decompositions is not None):
            raise ValueError("`decompositions` (an earlier run) goes with strategy solve, and only with it")
        if isinstance(self.decomposer, ReferenceModel) and self.task.name != "gsm8k":
            raise ValueError("the reference decomposer exists for task gsm8k only")
        if self.num_samples > 1:
            if "decomposer" not in roles or self.strategy == "self_ask":
                raise ValueError("num_samples > 1 samples decompositions: use strategy two_stage or decompose")
            if isinstance(self.decomposer, ReferenceModel) or self.decomposer.temperature == 0:
                raise ValueError("num_samples > 1 needs a sampling decomposer (temperature > 0)")
        return self
