"""Typed configs loaded from YAML; a bad config is one clear error naming file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.configs import (
    LOCAL_ENGINES,
    HFModel,
    ModelConfig,
    OpenAIModel,
    ReferenceModel,
    VLLMModel,
)
from dnc_ray.method.strategies import STRATEGIES
from dnc_ray.tasks import TaskConfig, get_task


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_structured_decompositions(decomposer: object) -> None:
    if not isinstance(decomposer, VLLMModel):
        raise ValueError("structured_decompositions use vLLM's guided decoding: give the decomposer engine vllm")


class RayConfig(_Strict):
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


class GenerateConfig(_Strict):
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


C = TypeVar("C", bound=BaseModel)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a YAML file into `cls`; every problem becomes a ConfigError naming file, line, field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    duplicate = _duplicate_key(root)
    if duplicate:
        line, field = duplicate
        raise ConfigError(f"{path}: line {line}: duplicate key `{field}` (each key may appear once)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(path, root, e)) from None


def _duplicate_key(node: yaml.Node | None, prefix: str = "", visited: set | None = None) -> tuple[int, str] | None:
    """(1-based line, dotted field) of the first key repeated in a mapping (YAML itself lets the last one win)."""
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias seen before (anchors may even nest)
        return None
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                if name in seen:
                    return key.start_mark.line + 1, f"{prefix}{name}"
                seen.add(name)
            found = _duplicate_key(value, f"{prefix}{name}." if name is not None else prefix, visited)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix}{index}.", visited)
            if found:
                return found
    return None


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


# ---------------------------------------------------------------- training (`dnc train`)

VARIANTS = ("sd-t", "sd-r", "se-t", "se-a")


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +weights")
    offload_optimizer: bool = Field(False, description="keep optimizer state in CPU memory (GPU runs only)")

    @model_validator(mode="before")
    @classmethod
    def _precision_moved(cls, data):
        if isinstance(data, dict) and "precision" in data:
            raise ValueError("deepspeed.precision is now the training config's `dtype` (auto, float32, bfloat16; "
                             "bf16 -> bfloat16, fp32 -> float32)")
        return data


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="module names, or all-linear")


class WandbConfig(_Strict):
    """Weights & Biases logging of a training run (rank 0). Online runs need WANDB_API_KEY on the workers."""

    project: str
    entity: str | None = None
    name: str | None = Field(None, description="run name; None: the output folder's name")
    mode: Literal["online", "offline"] = Field("online", description="offline: files under output/wandb, `wandb sync` later")
    tags: list[str] = []


class TrainConfig(_Strict):
    train_set: str = Field(description="Parquet file or folder from `dnc distill` (path or URI)")
    variant: Literal[VARIANTS] = Field(description="the variant the training set must hold")
    model: str = Field("smollm2-135m-instruct", description="model reference of the student")
    output: str = Field(description="folder or URI: checkpoints/, metrics.jsonl, tensorboard/, model/")
    max_length: int = Field(512, gt=0, description="tokens per row: prompt kept whole, target cut")
    num_epochs: float = Field(
        3.0, gt=0, description="passes over the training rows (the paper: 3 on DROP, 5 on GSM8K and Bamboogle)"
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; replaces num_epochs")
    per_worker_batch_size: int = Field(4, gt=0, description="rows per micro-batch on each worker")
    global_batch_size: int | None = Field(
        None, gt=0, description="rows per optimizer step over all workers (the paper: 128); gradient accumulation "
        "is derived: global_batch_size / (num_workers x per_worker_batch_size)"
    )
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="micro-batches per optimizer step; None: from global_batch_size, else 1"
    )
    packing: bool = Field(False, description="padding-free: a micro-batch's rows end to end in one sequence")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory")
    lr: float = Field(2e-5, gt=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 mixed precision (fp32 master weights) where the workers' device computes bf16 "
        "natively (GPU, or CPU with AVX512-BF16/AMX), else float32"
    )
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    lora: LoraConfig | None = None
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    checkpoint_every_steps: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept (with keep_best: the best ones), and the latest")
    log_every_steps: int = Field(10, gt=0, description="one progress line per N steps")
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the run fails")
    resume_from: str | None = Field(None, description="a checkpoint folder (checkpoints/checkpoint_*)")
    eval_set: str | None = Field(None, description="a separate Parquet set of the same variant for validation")
    eval_fraction: float = Field(
        0.0, ge=0, le=0.5, description="share of the set's question ids held out for validation (0: none)"
    )
    eval_every_steps: int | None = Field(None, gt=0, description="None: at every checkpoint; always at the end")
    eval_generations: int = Field(
        8, ge=0, description="decomposer sets: eval prompts generated greedily at each evaluation for eval_parse_rate"
    )
    keep_best: Literal["eval_loss", "parse_rate"] | None = Field(
        None, description="track the best evaluation by this metric (lowest loss, highest parse rate)"
    )
    export: Literal["best", "last"] | None = Field(None, description="model/ from; None: best with keep_best, else last")
    patience: int | None = Field(None, gt=0, description="stop after this many evaluations without a new best")
    tensorboard: bool = Field(True, description="TensorBoard event files under output/tensorboard")
    wandb: WandbConfig | None = Field(None, description="Weights & Biases logging; None: off")
    ray: RayConfig = RayConfig()

    @property
    def accumulation_steps(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size // (self.num_workers * self.per_worker_batch_size)
        return self.gradient_accumulation_steps or 1

    @property
    def evaluates(self) -> bool:
        return self.eval_set is not None or self.eval_fraction > 0

    @property
    def eval_interval(self) -> int:
        return self.eval_every_steps or self.checkpoint_every_steps

    @property
    def best_metric(self) -> str | None:
        """The key of the keep_best metric in the evaluation's metrics."""
        return {"eval_loss": "eval_loss", "parse_rate": "eval_parse_rate", None: None}[self.keep_best]

    @property
    def exports(self) -> str:
        return self.export or ("best" if self.keep_best else "last")

    @model_validator(mode="after")
    def _gpu_settings_agree(self) -> "TrainConfig":
        if not self.use_gpu and self.deepspeed.offload_optimizer:
            raise ValueError("deepspeed.offload_optimizer moves GPU optimizer state to CPU: it needs use_gpu: true")
        return self

    @model_validator(mode="after")
    def _batch_sizes_agree(self) -> "TrainConfig":
        if self.global_batch_size is None:
            return self
        per_step = self.num_workers * self.per_worker_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of num_workers x per_worker_batch_size "
                f"= {self.num_workers} x {self.per_worker_batch_size} = {per_step}"
            )
        derived = self.global_batch_size // per_step
        if self.gradient_accumulation_steps not in (None, derived):
            raise ValueError(
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} disagrees with global_batch_size "
                f"{self.global_batch_size} (which gives {derived}): set one of them"
            )
        return self

    @model_validator(mode="after")
    def _eval_settings_agree(self) -> "TrainConfig":
        if self.eval_set is not None and self.eval_fraction > 0:
            raise ValueError("set either eval_set or eval_fraction, not both")
        needs_eval = [name for name in ("eval_every_steps", "keep_best", "patience") if getattr(self, name) is not None]
        if needs_eval and not self.evaluates:
            raise ValueError(f"{', '.join(needs_eval)} need(s) an evaluation: set eval_set or eval_fraction")
        if self.keep_best == "parse_rate" and (self.variant in ("se-t", "se-a") or self.eval_generations == 0):
            raise ValueError("keep_best parse_rate needs a decomposer set (sd-t, sd-r) and eval_generations > 0")
        if self.patience is not None and self.keep_best is None:
            raise ValueError("patience counts evaluations without a new best: set keep_best (eval_loss or parse_rate)")
        if self.export == "best" and self.keep_best is None:
            raise ValueError("export best needs keep_best (eval_loss or parse_rate)")
        return self


# ---------------------------------------------------------------- serving (`dnc serve`)

ServedEngine = Annotated[Union[OpenAIModel, HFModel, VLLMModel], Field(discriminator="engine")]


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica the autoscaler aims at")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class ServedModel(_Strict):
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


class ServedIngress(_Strict):
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(256, gt=0, description="HTTP requests the ingress holds at once")


class ServeAppConfig(_Strict):
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


# ---------------------------------------------------------------- the whole method (`dnc pipeline`)


class StudentTraining(TrainConfig):
    """TrainConfig of the pipeline's student: the pipeline fills in train_set, variant and output."""

    train_set: str | None = None
    variant: Literal[VARIANTS] | None = None
    output: str | None = None


class StudentDecomposer(HFModel):
    """How the trained student decomposes at evaluation (hf, the default engine); the pipeline fills in `model`."""

    engine: Literal["hf"] = "hf"
    model: str | None = None


class VLLMStudentDecomposer(VLLMModel):
    """The student decomposing on vLLM at evaluation; the pipeline fills in `model`."""

    model: str | None = None


def engine_or_hf(value: object) -> str:
    """A student's engine: `hf` unless the config names another."""
    return (value.get("engine") if isinstance(value, dict) else getattr(value, "engine", None)) or "hf"


StudentEngine = Annotated[Union[Annotated[StudentDecomposer, Tag("hf")], Annotated[VLLMStudentDecomposer, Tag("vllm")]],
                          Discriminator(engine_or_hf)]


class PipelineConfig(_Strict):
    """Teacher run on train questions -> S_D set -> student decomposer -> evaluation on held-out ones."""

    output: str = Field(description="folder or URI holding every stage's output and the report")
    train_task: TaskConfig = Field(description="the questions the teacher decomposes for distillation")
    eval_task: TaskConfig = Field(description="held-out questions for the evaluation")
    teacher_decomposer: ModelConfig
    teacher_solver: Annotated[Union[OpenAIModel, HFModel, VLLMModel], Field(discriminator="engine")]
    variant: Literal["sd-t", "sd-r"] = "sd-r"
    num_samples: int = Field(1, gt=0, description="teacher decompositions per train question")
    max_subquestions: int | None = Field(
        None,
        gt=0,
        description="None: the task's default (the paper: 2 on Bamboogle, 3 elsewhere), taken from train_task; "
        "the teacher, the student's training prompts and the evaluation all use it",
    )
    student: StudentTraining = StudentTraining()
    student_decomposer: StudentEngine = StudentDecomposer()
    max_failed_rows: FailedRows = Field(0, description="failed rows allowed per generation run (teacher and each "
                                        "evaluation) before `dnc pipeline` exits 3: a count, or a share such as '5%'")
    budget_usd: float | None = Field(None, gt=0, description="spend cap of the whole pipeline (every generation run's "
                                     "rows): a run starts no request past it; `dnc pipeline` then exits 4")
    progress_interval_s: float = Field(10.0, gt=0)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _batch_solver_pairs_with_no_student(self) -> "PipelineConfig":
        if getattr(self.teacher_solver, "mode", "online") == "batch":
            raise ValueError("teacher_solver in mode batch: the evaluation runs pair it with the hf student, which a "
                             "batch run cannot hold; a batch-mode teacher_decomposer is fine")
        return self

    @model_validator(mode="after")
    def _max_subquestions_of_the_task(self) -> "PipelineConfig":
        if self.max_subquestions is None:
            self.max_subquestions = get_task(self.train_task).rules.max_subquestions
        return self

    @model_validator(mode="after")
    def _teacher_can_make_the_set(self) -> "PipelineConfig":
        if isinstance(self.teacher_decomposer, ReferenceModel) and (
            self.train_task.name != "gsm8k" or self.eval_task.name != "gsm8k"
        ):
            raise ValueError("the reference decomposer exists for task gsm8k only")
        if self.num_samples > 1 and getattr(self.teacher_decomposer, "temperature", 0) == 0:
            raise ValueError("num_samples > 1 needs a sampling teacher decomposer (temperature > 0)")
        return self
