"""`dnc train`: the student, its training set, the steps and batches, DeepSpeed, LoRA, evaluation, logging."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from dnc_ray.config.generate import RayConfig
from dnc_ray.config.load import Strict

VARIANTS = ("sd-t", "sd-r", "se-t", "se-a")


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +weights")
    offload_optimizer: bool = Field(False, description="keep optimizer state in CPU memory (GPU runs only)")

    @model_validator(mode="before")
    @classmethod
    def _precision_moved(cls, data):
        if isinstance(data, dict) and "precision" in data:
            raise ValueError("deepspeed.precision is now the training config's `dtype` (auto, float32, bfloat16; "
                             "bf16 -> bfloat16, fp32 -> float32)")
        return data


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="module names, or all-linear")


class WandbConfig(Strict):
    """Weights & Biases logging of a training run (rank 0). Online runs need WANDB_API_KEY on the workers."""

    project: str
    entity: str | None = None
    name: str | None = Field(None, description="run name; None: the output folder's name")
    mode: Literal["online", "offline"] = Field("online", description="offline: files under output/wandb, `wandb sync` later")
    tags: list[str] = []


class TrainConfig(Strict):
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
