"""Typed configs loaded from YAML; a bad config is one clear error naming file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    """$ per 1K tokens of an endpoint, for the cost columns."""

    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1k + completion_tokens * self.output_per_1k) / 1000


class _ModelBase(_Strict):
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(256, gt=0)
    price: Price = Price()
    actors: int = Field(1, gt=0, description="Ray Data actors running this model")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs each actor reserves")


class OpenAIModel(_ModelBase):
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, Ray Serve LLM, `dnc serve`)."""

    engine: Literal["openai"]
    model: str
    base_url: str
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="NAME of the env var holding the key; null for none"
    )
    max_in_flight: int = Field(64, gt=0, description="concurrent requests per actor")
    request_timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries on 429/5xx/timeouts, exponential backoff")
    batch_size: int = Field(256, gt=0)
    num_cpus: float = Field(0.25, ge=0)


class HFModel(_ModelBase):
    """A local Transformers model: hub id, local directory or a bundled name."""

    engine: Literal["hf"]
    model: str = "smollm2-135m-instruct"
    batch_size: int = Field(8, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _gpu_settings_agree(self) -> "HFModel":
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError("device is cuda but num_gpus is 0: set num_gpus (e.g. 1)")
        if self.dtype != "float32" and not self.device.startswith("cuda"):
            raise ValueError(f"dtype {self.dtype} needs a GPU: use float32 with device cpu")
        return self


class ReferenceModel(_Strict):
    """GSM8K's human-written socratic sub-questions: a decomposer with no model call."""

    engine: Literal["reference"]


ModelConfig = Annotated[Union[OpenAIModel, HFModel, ReferenceModel], Field(discriminator="engine")]


class TaskConfig(_Strict):
    name: Literal["gsm8k", "drop", "bamboogle", "records"]
    split: str = "test"
    path: str | None = Field(None, description="local JSONL/Parquet replacing the bundled data")
    limit: int | None = Field(None, gt=0, description="first N rows only")
    fields: dict[str, str] | None = Field(
        None, description="records only: row field -> column in the file (question, answers, context, id)"
    )
    metric: Literal["gsm8k", "drop", "bamboogle"] | None = Field(None, description="records only")

    @model_validator(mode="after")
    def _records_need_path_and_metric(self) -> "TaskConfig":
        if self.name == "records" and (self.path is None or self.metric is None):
            raise ValueError("task records needs `path` and `metric`")
        if self.name != "records" and (self.fields or self.metric):
            raise ValueError("`fields` and `metric` are for task records only")
        return self


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address; null starts (or joins) local Ray")
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local Ray; null = all cores")


STAGES_OF = {
    "direct": ("solve",),
    "two_stage": ("decompose", "solve"),
    "decompose": ("decompose",),
    "solve": ("solve",),
}


class GenerateConfig(_Strict):
    task: TaskConfig
    strategy: Literal["direct", "two_stage", "decompose", "solve"]
    output: str
    decomposer: ModelConfig | None = None
    solver: ModelConfig | None = None
    decompositions: str | None = Field(None, description="strategy solve: the run holding decompositions")
    num_samples: int = Field(1, gt=0, description="decompositions sampled per question")
    max_subquestions: int = Field(3, gt=0)
    progress_interval_s: float = Field(10.0, gt=0)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _strategy_has_its_models(self) -> "GenerateConfig":
        stages = STAGES_OF[self.strategy]
        if "decompose" in stages and self.decomposer is None:
            raise ValueError(f"strategy {self.strategy} needs a `decomposer`")
        if "solve" in stages and self.solver is None:
            raise ValueError(f"strategy {self.strategy} needs a `solver`")
        if "decompose" not in stages and self.decomposer is not None:
            raise ValueError(f"strategy {self.strategy} runs no decomposer: remove `decomposer`")
        if isinstance(self.solver, ReferenceModel):
            raise ValueError("the reference engine only decomposes; pick an hf or openai solver")
        if (self.strategy == "solve") != (self.decompositions is not None):
            raise ValueError("`decompositions` (an earlier run) goes with strategy solve, and only with it")
        if isinstance(self.decomposer, ReferenceModel) and self.task.name != "gsm8k":
            raise ValueError("the reference decomposer exists for task gsm8k only")
        if self.num_samples > 1:
            if "decompose" not in stages:
                raise ValueError("num_samples > 1 samples decompositions: use strategy two_stage or decompose")
            if isinstance(self.decomposer, ReferenceModel) or self.decomposer.temperature == 0:
                raise ValueError("num_samples > 1 needs a sampling decomposer (temperature > 0)")
        return self


C = TypeVar("C", bound=BaseModel)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a YAML file into `cls`; every problem becomes a ConfigError naming file, line, field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(path, root, e)) from None


def _describe(path: Path, root: yaml.Node, error: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in ("openai", "hf", "reference"))]
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"line {line}, " if line else ""
        lines.append(f"  {where}field `{field}`: {err['msg']}")
    return "\n".join(lines)


def _line_of(node: yaml.Node | None, loc: list) -> int | None:
    """1-based line of the deepest YAML node on the path `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if k.value == str(key)]
        if not match:
            break
        key_node, node = match[0]
        line = key_node.start_mark.line + 1
    return line
