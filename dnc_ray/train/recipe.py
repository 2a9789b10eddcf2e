"""`dnc train`: supervised fine-tuning of a student on a distilled training set, on Ray Train + DeepSpeed.

    driver   check config, model reference and training set -> tokenize with Ray Data
             -> TorchTrainer(num_workers), each worker reading its own shard of the set
    worker   a Transformers Trainer whose TrainingArguments carry the DeepSpeed config (Ray's own
             DeepSpeed fine-tuning route: the Trainer brings gradient accumulation, the schedule
             and ZeRO checkpoint save/load); rank 0 exports the final model

Output folder (a path or URI):
    checkpoints/checkpoint_*/checkpoint/   Transformers + DeepSpeed state, every N steps; `resume_from`
                                           takes one of these. Running the same config again continues
                                           from the latest one, and so does a run restarted after a
                                           worker failure (FailureConfig(max_failures)).
    metrics.jsonl                          one line per step (loss, learning_rate, tokens/s, elapsed,
                                           rank 0's peak memory), rewritten at every checkpoint and at the end
    model/                                 the final model as a plain Transformers folder (ZeRO-3
                                           shards gathered, LoRA merged), chat template included
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import tempfile

import deepspeed
import peft
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from dnc_ray.config import ConfigError, TrainConfig
from dnc_ray.infra import storage
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.models import resolve_model
from dnc_ray.train import TrainSetError
from dnc_ray.train.data import (
    PadBatch,
    check_train_set,
    load_tokenizer,
    tokenized_dataset,
)

logger = logging.getLogger(__name__)

# DeepSpeed's warm-up schedules: linear warm-up from 0, then cosine or linear decay over the run.
SCHEDULES = {
    "cosine": {"type": "WarmupCosineLR", "params": {}},
    "linear": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}},
}


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config; the Trainer fills each "auto" from the TrainingArguments below."""
    # Bucket sizes from the model's hidden size (DeepSpeed's fixed defaults hold 5e8 elements)
    zero = {"stage": cfg.deepspeed.zero_stage, "reduce_bucket_size": "auto"}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints hold whole weights
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
    schedule = SCHEDULES[cfg.schedule]
    params = {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_type": "linear", **schedule["params"]}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {"type": schedule["type"], "params": params},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def training_args(cfg: TrainConfig, steps: int, work_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=work_dir,  # this worker's local checkpoints; RayTrainReportCallback persists them
        deepspeed=deepspeed_config(cfg),
        use_cpu=not cfg.use_gpu,
        bf16=cfg.deepspeed.precision == "bf16",
        max_steps=steps,
        per_device_train_batch_size=cfg.per_worker_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of max_steps
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every_steps,
        save_total_limit=1,
        include_num_input_tokens_seen="non_padding",
        # A resumed run starts a fresh pass over its shard: skipping batches of a stream with no
        # length could run past its end and stop training early.
        ignore_data_skip=True,
        report_to="none",
        disable_tqdm=True,
    )


class Progress(TrainerCallback):
    """Every N steps a progress line (rank 0) and a metrics report to Ray Train; rank 0 keeps metrics.jsonl."""

    def __init__(self, cfg: TrainConfig):
        self.every = cfg.log_every_steps
        self.metrics = storage.join(cfg.output, "metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if "loss" not in logs:
            return
        state.log_history[-1]["peak_memory_gib"] = peak_memory_gib()  # the entry of these logs
        if step % self.every and step != state.max_steps:
            return
        ray.train.report({**logs, "step": step})  # every rank: a report is a barrier
        if state.is_world_process_zero:
            logger.info(
                f"[train] step {step}/{state.max_steps}  loss {logs['loss']:.4f}  lr {logs['learning_rate']:.2e}  "
                f"{logs['train_tokens_per_second']:.0f} tok/s  {logs['train_runtime']:.0f}s"
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            steps = [entry for entry in state.log_history if "loss" in entry]
            storage.write_text(self.metrics, "".join(json.dumps(s) + "\n" for s in steps))

    on_train_end = on_save


def peak_memory_gib() -> float:
    """This worker's peak so far: GPU memory allocated by torch, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker: fine-tune on this worker's shard; rank 0 exports the model and returns the summary."""
    cfg = TrainConfig.model_validate(config["cfg"])
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory(prefix="dnc-train-") as work_dir:
        args = training_args(cfg, config["steps"], work_dir)  # before the model: ZeRO-3 builds it sharded
        deepspeed.init_distributed()  # DeepSpeed joins Ray's process group (ZeRO-3 shards while loading)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model))
        if cfg.lora:
            model = peft.get_peft_model(model, lora_config(cfg))
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.per_worker_batch_size, collate_fn=PadBatch(tokenizer.pad_token_id)
        )
        callbacks = [Progress(cfg), RayTrainReportCallback()]
        trainer = prepare_trainer(
            Trainer(model=model, args=args, train_dataset=batches, processing_class=tokenizer, callbacks=callbacks)
        )
        trainer.remove_callback(PrinterCallback)  # Progress prints instead
        checkpoint = ray.train.get_checkpoint() or (Checkpoint(cfg.resume_from) if cfg.resume_from else None)
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
            resume = restored and os.path.join(restored, RayTrainReportCallback.CHECKPOINT_NAME)
            if not resume or _state(resume).global_step < args.max_steps:  # a finished run is not trained again
                trainer.train(resume_from_checkpoint=resume)
            if ray.train.get_context().get_world_rank() == 0:
                return export(get_last_checkpoint(work_dir) or resume, cfg)
    return None


def lora_config(cfg: TrainConfig) -> peft.LoraConfig:
    lora = cfg.lora
    return peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def export(checkpoint_dir: str, cfg: TrainConfig) -> dict:
    """output/model from the final checkpoint: a plain Transformers folder (LoRA merged); returns the summary.

    The checkpoint holds whole weights: ZeRO-3 gathers them on save (stage3_gather_16bit_weights_on_model_save).
    """
    unset_hf_deepspeed_config()  # load whole, on this worker alone: not sharded over the (finished) group
    if cfg.lora:
        base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model))
        model = peft.PeftModel.from_pretrained(base, checkpoint_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="dnc-export-") as out:
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(out)
        storage.copy_folder(out, storage.join(cfg.output, "model"))
    state = _state(checkpoint_dir)
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {"steps": state.global_step, "final_loss": losses[-1]}


def _state(checkpoint_dir: str) -> TrainerState:
    return TrainerState.load_from_json(os.path.join(checkpoint_dir, "trainer_state.json"))


def total_steps(cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs over each worker's equal share of the rows."""
    if cfg.max_steps:
        return cfg.max_steps
    rows_per_worker = rows // cfg.num_workers  # Ray Data splits the set equally
    batches = math.ceil(rows_per_worker / cfg.per_worker_batch_size)
    return max(1, math.ceil(cfg.epochs * math.ceil(batches / cfg.gradient_accumulation_steps)))


def check_resume_from(uri: str) -> None:
    if not storage.exists(storage.join(uri, RayTrainReportCallback.CHECKPOINT_NAME, "trainer_state.json")):
        raise ConfigError(f"resume_from: {uri} is not a training checkpoint (no checkpoint/trainer_state.json)")


def run_train(cfg: TrainConfig) -> dict:
    """Fine-tune the student described by `cfg`; returns (and prints) the run's summary."""
    local = {"train_set": storage.absolute(cfg.train_set), "output": storage.absolute(cfg.output)}
    cfg = cfg.model_copy(update={**local, "resume_from": cfg.resume_from and storage.absolute(cfg.resume_from)})
    if cfg.resume_from:
        check_resume_from(cfg.resume_from)
    resolve_model(cfg.model)  # an unknown reference fails here, before any worker starts
    rows = check_train_set(cfg.train_set, cfg.variant)
    init_ray(cfg.ray)
    dataset, counts = tokenized_dataset(cfg.train_set, cfg.model, cfg.max_length, cfg.seed)
    counts = {"rows": rows, **counts, "dropped": rows - counts["used"]}
    print(f"[train] {cfg.train_set}: {rows} rows, {counts['used']} used, {counts['truncated']} truncated, "
          f"{counts['dropped']} dropped (max_length {cfg.max_length})", flush=True)
    if counts["used"] < cfg.num_workers:
        raise TrainSetError(f"train set {cfg.train_set}: {counts['used']} usable rows for {cfg.num_workers} workers")
    steps = total_steps(cfg, counts["used"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "steps": steps},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=cfg.output,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # DeepSpeed picks CUDA when it finds it; on CPU it must be told.
            worker_runtime_env={} if cfg.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    latest = result.checkpoint and result.checkpoint.path
    summary = {**result.return_value, **counts, "model": f"{cfg.output}/model", "checkpoint": latest}
    print("[train] done: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return summary
