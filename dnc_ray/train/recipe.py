"""`dnc train`: supervised fine-tuning of a student on a distilled training set, on Ray Train + DeepSpeed.

    driver   check config, model reference, training (and eval) set -> tokenize with Ray Data (an
             `eval_fraction` of the question ids held out) -> plan the steps -> TorchTrainer(num_workers),
             each worker reading its own shard of the sets
    worker   a Transformers Trainer whose TrainingArguments carry the DeepSpeed config (Ray's own
             DeepSpeed fine-tuning route: the Trainer brings gradient accumulation, the schedule,
             gradient checkpointing and ZeRO checkpoint save/load); every `eval_every_steps` all workers
             evaluate (eval loss over their shards, greedy generations of a few eval prompts for the
             parse rate); rank 0 logs to TensorBoard (and W&B) and exports the best or the last model

Output folder (a path or URI):
    checkpoints/checkpoint_*/checkpoint/   Transformers + DeepSpeed state, every N steps (with keep_best also
                                           at each new best); `resume_from` takes one of these. Running the
                                           same config again continues from the latest one, and so does a run
                                           restarted after a worker failure (FailureConfig(max_failures)).
    metrics.jsonl                          one line per step (loss, learning_rate, tokens/s, padding share,
                                           rank 0's peak memory, eval metrics on evaluation steps), rewritten
                                           at every checkpoint and at the end
    tensorboard/                           event files: train/* and eval/* scalars per step
    wandb/                                 W&B run files (when `wandb` is set)
    model/                                 the best or last model as a plain Transformers folder (ZeRO-3
                                           shards gathered, LoRA merged), chat template included

Steps: an optimizer step takes num_workers x per_worker_batch_size x accumulation rows (global_batch_size);
each worker reads its equal share of the rows in ceil(share / per_worker_batch_size) micro-batches per
epoch, and the run takes max_steps, else ceil(num_epochs x micro-batches / accumulation) steps. The
workers read their shards as one stream of epochs, so an accumulation may span two epochs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import tempfile

import deepspeed
import peft
import pyarrow.fs as pafs
import ray
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
from ray.train.huggingface.transformers import RayTrainReportCallback
from ray.train.torch import TorchTrainer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from dnc_ray.config import TrainConfig
from dnc_ray.infra import console, storage
from dnc_ray.infra.cluster import init_ray
from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.llm.models import resolve_model
from dnc_ray.train import TrainSetError
from dnc_ray.train.callbacks import (
    SCORE,
    KeepBest,
    LogFolder,
    Progress,
    ReportCheckpoint,
    best_evaluation,
    logging_callbacks,
    step_metrics,
    stopped_early,
)
from dnc_ray.train.data import (
    check_train_set,
    collate_fn,
    eval_prompts,
    held_out_ids,
    load_tokenizer,
    read_rows,
    tokenized_dataset,
)
from dnc_ray.train.trainer import Passes, StudentTrainer


def deepspeed_config(cfg: TrainConfig, dtype: str) -> dict:
    """The DeepSpeed config (`dtype` resolved: bfloat16 or float32); the Trainer fills each "auto" from the
    TrainingArguments below.

    The optimizer is the Trainer's (torch's fused AdamW, which ZeRO partitions like any other) unless the optimizer
    state is offloaded, which takes DeepSpeed's CPU Adam: DeepSpeed's own Adam is a C++/CUDA op built on first use
    (a minute on a fresh machine) and, on CPU, probes the CPU in a subprocess at every worker start."""
    # Bucket sizes from the model's hidden size (DeepSpeed's fixed defaults hold 5e8 elements)
    zero = {"stage": cfg.deepspeed.zero_stage, "reduce_bucket_size": "auto"}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints hold whole weights
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
    config = {
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    if cfg.deepspeed.offload_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def training_args(cfg: TrainConfig, plan: dict, work_dir: str) -> TrainingArguments:
    evaluates = plan["eval_rows"] > 0
    return TrainingArguments(
        output_dir=work_dir,  # this worker's local checkpoints; RayTrainReportCallback persists them
        deepspeed=deepspeed_config(cfg, plan["dtype"]),
        use_cpu=not cfg.use_gpu,
        bf16=plan["dtype"] == "bfloat16",
        max_steps=plan["steps"],
        per_device_train_batch_size=cfg.per_worker_batch_size,
        gradient_accumulation_steps=plan["accumulation"],
        activation_checkpointing=cfg.gradient_checkpointing,  # Transformers' new name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        learning_rate=cfg.lr,
        # The Trainer's schedule (DeepSpeed's warm-up schedules read their rate before the first step and warn)
        lr_scheduler_type=cfg.schedule,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of max_steps
        seed=cfg.seed,
        logging_steps=1,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=cfg.eval_interval if evaluates else None,
        # The best checkpoint is kept locally beside the latest one (the export reads it from here when it can)
        metric_for_best_model=cfg.best_metric if evaluates else None,
        greater_is_better=cfg.keep_best == "parse_rate" if cfg.keep_best else None,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every_steps,
        save_total_limit=2 if cfg.keep_best else 1,  # the best one and the latest
        # Packed batches hold no padding at all; padded ones count their attention mask.
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        # A resumed run starts a fresh pass over its shard: skipping batches of a stream with no
        # length could run past its end and stop training early.
        ignore_data_skip=True,
        report_to="none",
        disable_tqdm=True,
    )


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker: fine-tune on this worker's shard; rank 0 exports the model and returns the summary."""
    with console.scope(config["scope"]):  # the driver's (a study's cell), in this worker's lines too
        return train_on_shard(config)


def train_on_shard(config: dict) -> dict | None:
    cfg, plan = TrainConfig.model_validate(config["cfg"]), config["plan"]
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(cfg.model)
    rank = ray.train.get_context().get_world_rank()
    logs = LogFolder(cfg.output) if rank == 0 else None
    with tempfile.TemporaryDirectory(prefix="dnc-train-") as work_dir:
        args = training_args(cfg, plan, work_dir)  # before the model: ZeRO-3 builds it sharded
        deepspeed.init_distributed()  # DeepSpeed joins Ray's process group (ZeRO-3 shards while loading)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model))
        model.config.use_cache = False  # training keeps no cache; with one, packed rows would attend across rows
        if cfg.lora:
            model = peft.get_peft_model(model, lora_config(cfg))
        collate = collate_fn(cfg.packing, tokenizer.pad_token_id)
        batch = cfg.per_worker_batch_size
        train = Passes(ray.train.get_dataset_shard("train"), plan["passes"], batch, collate)
        evals = Passes(ray.train.get_dataset_shard("eval"), 1, batch, collate) if plan["eval_rows"] else None
        callbacks = [Progress(cfg, logs), ReportCheckpoint(cfg)]
        callbacks += [KeepBest(cfg)] if cfg.keep_best else []
        callbacks += logging_callbacks(cfg, logs) if logs else []
        trainer = StudentTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                 processing_class=tokenizer, callbacks=callbacks, plan=plan)
        trainer.remove_callback(PrinterCallback)  # Progress prints instead
        checkpoint = ray.train.get_checkpoint() or (Checkpoint(cfg.resume_from) if cfg.resume_from else None)
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
            resume = restored and os.path.join(restored, RayTrainReportCallback.CHECKPOINT_NAME)
            if resume and rank == 0:
                warn_if_dtype_changed(_state(resume), plan["dtype"])
            if not resume or not finished(cfg, _state(resume), plan["steps"]):  # a finished run is not trained again
                trainer.train(resume_from_checkpoint=resume)
            if cfg.wandb and rank == 0:
                import wandb

                wandb.finish()
            if rank == 0:
                summary = export(get_last_checkpoint(work_dir) or resume, work_dir, cfg)
                logs.sync()
                return summary
    return None


def warn_if_dtype_changed(state: TrainerState, dtype: str) -> None:
    trained = [entry["dtype"] for entry in state.log_history if "dtype" in entry]
    if trained and trained[-1] != dtype:
        console.say(f"[train] warning: resuming a run trained in {trained[-1]} up to step {state.global_step} in {dtype}: "
                    "metrics.jsonl shows each step's dtype")


def finished(cfg: TrainConfig, state: TrainerState, steps: int) -> bool:
    return state.global_step >= steps or stopped_early(cfg, state.log_history)


def lora_config(cfg: TrainConfig) -> peft.LoraConfig:
    lora = cfg.lora
    return peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def export(last_dir: str, work_dir: str, cfg: TrainConfig) -> dict:
    """output/model from the best (keep_best) or the last checkpoint: a plain Transformers folder (LoRA merged);
    returns the summary.

    The checkpoint holds whole weights: ZeRO-3 gathers them on save (stage3_gather_16bit_weights_on_model_save).
    """
    unset_hf_deepspeed_config()  # load whole, on this worker alone: not sharded over the (finished) group
    state = _state(last_dir)
    summary = {"steps": state.global_step, "final_loss": [e["loss"] for e in state.log_history if "loss" in e][-1]}
    evals = [entry for entry in step_metrics(state.log_history) if "eval_loss" in entry]
    if evals:
        last = evals[-1]
        summary |= {k: last[k] for k in ("eval_loss", "eval_parse_rate") if k in last}
    exported, step = "last", state.global_step
    with tempfile.TemporaryDirectory(prefix="dnc-export-") as scratch:
        checkpoint_dir = last_dir
        if cfg.keep_best:
            best_step, best_value, _ = best_evaluation(state.log_history, cfg.best_metric, cfg.keep_best == "parse_rate")
            summary |= {"best_step": best_step, f"best_{cfg.best_metric}": best_value,
                        "stopped_early": stopped_early(cfg, state.log_history)}
            if cfg.exports == "best" and best_step is not None:
                checkpoint_dir = find_checkpoint(best_step, work_dir, cfg.output, scratch)
                exported, step = "best", best_step
        if cfg.lora:
            base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model))
            model = peft.PeftModel.from_pretrained(base, checkpoint_dir).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
        model.config.use_cache = True  # off for training only
        out = os.path.join(scratch, "model")
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(out)
        storage.copy_folder(out, storage.join(cfg.output, "model"))
    return summary | {"exported": exported, "exported_step": step}


def find_checkpoint(step: int, work_dir: str, output: str, scratch: str) -> str:
    """The Transformers checkpoint of `step`: this worker's local copy, else the model files (no optimizer
    state) of the one Ray Train kept in the output, copied into `scratch`."""
    local = os.path.join(work_dir, f"checkpoint-{step}")
    if os.path.isdir(local):
        return local
    root = storage.join(output, "checkpoints")
    name = RayTrainReportCallback.CHECKPOINT_NAME
    for state_file in storage.list_files(root, f"{name}/trainer_state.json"):
        folder = storage.join(root, state_file.rsplit("/", 1)[0])
        if json.loads(storage.read_text(storage.join(folder, "trainer_state.json")))["global_step"] != step:
            continue
        fs, path = storage.filesystem(folder)
        target = os.path.join(scratch, f"checkpoint-{step}")
        for file in storage.list_files(folder):
            if not file.startswith("global_step"):  # DeepSpeed's optimizer and ZeRO shards: not needed
                os.makedirs(os.path.dirname(os.path.join(target, file)), exist_ok=True)
                pafs.copy_files(f"{path}/{file}", os.path.join(target, file), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return target
    raise FileNotFoundError(f"{root}: no checkpoint of step {step} (the best evaluation's)")


def _state(checkpoint_dir: str) -> TrainerState:
    return TrainerState.load_from_json(os.path.join(checkpoint_dir, "trainer_state.json"))


def plan_steps(cfg: TrainConfig, rows: int) -> dict:
    """Optimizer steps of the run (max_steps, else num_epochs over each worker's equal share of the rows), the
    micro-batches per worker per epoch, and the epochs each worker's stream must hold."""
    accumulation = cfg.accumulation_steps
    batches = max(1, math.ceil((rows // cfg.num_workers) / cfg.per_worker_batch_size))  # Ray Data splits equally
    steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * batches / accumulation))
    return {"steps": steps, "accumulation": accumulation, "batches_per_pass": batches,
            "passes": math.ceil(steps * accumulation / batches)}


def check_resume_from(uri: str) -> None:
    if not storage.exists(storage.join(uri, RayTrainReportCallback.CHECKPOINT_NAME, "trainer_state.json")):
        raise ConfigError(f"resume_from: {uri} is not a training checkpoint (no checkpoint/trainer_state.json)")
    check_schedule(storage.join(uri, RayTrainReportCallback.CHECKPOINT_NAME, "training_args.bin"))


def check_schedule(training_args_uri: str) -> None:
    """A checkpoint of an earlier dnc_ray, whose learning-rate schedule was DeepSpeed's, cannot be continued
    with the Trainer's schedule (its state does not load): say so before any worker starts."""
    args = torch.load(io.BytesIO(storage.read_bytes(training_args_uri)), weights_only=False)  # the Trainer's pickle
    scheduler = args.deepspeed.get("scheduler") if isinstance(args.deepspeed, dict) else None
    if scheduler:
        checkpoint = training_args_uri.rsplit("/", 2)[0]
        raise ConfigError(
            f"{checkpoint}: written by an earlier dnc_ray with DeepSpeed's {scheduler['type']} learning-rate "
            "schedule, which this version (the Trainer's schedule) cannot continue: train into a new output, "
            "or finish this run with the earlier version")


def run_train(cfg: TrainConfig) -> dict:
    """Fine-tune the student described by `cfg`; returns (and prints) the run's summary."""
    paths = {k: storage.absolute(getattr(cfg, k)) for k in ("train_set", "output", "resume_from", "eval_set")
             if getattr(cfg, k)}
    cfg = cfg.model_copy(update=paths)
    if cfg.resume_from:
        check_resume_from(cfg.resume_from)
    checkpoints = storage.join(cfg.output, "checkpoints")  # a run started again continues from its latest one
    for relative in storage.list_files(checkpoints, suffix="/training_args.bin"):
        check_schedule(storage.join(checkpoints, relative))
    resolve_model(cfg.model)  # an unknown reference fails here, before any worker starts
    rows = check_train_set(cfg.train_set, cfg.variant)
    if cfg.eval_set:
        check_train_set(cfg.eval_set, cfg.variant)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb: the wandb package is not installed (pip install 'dnc-ray[wandb]')")
    held_out, held_out_rows = None, 0
    if cfg.eval_fraction:
        ids = read_rows(cfg.train_set, ["id"])["id"]
        held_out = held_out_ids(ids, cfg.eval_fraction, cfg.seed)
        wanted = set(held_out)
        held_out_rows = sum(i in wanted for i in ids)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    dataset, counts = tokenized_dataset(cfg.train_set, cfg.model, cfg.max_length, cfg.seed, ids=held_out, keep=False)
    counts = {"rows": rows, **counts, "dropped": rows - held_out_rows - counts["used"]}
    console.say(f"[train] {cfg.train_set}: {rows} rows, {counts['used']} used, {counts['truncated']} truncated, "
                f"{counts['dropped']} dropped (max_length {cfg.max_length})"
                + (f", {held_out_rows} held out for evaluation" if held_out else ""))
    if counts["used"] < cfg.num_workers:
        raise TrainSetError(f"train set {cfg.train_set}: {counts['used']} usable rows for {cfg.num_workers} workers")
    source = {"uri": cfg.eval_set, "ids": None} if cfg.eval_set else {"uri": cfg.train_set, "ids": held_out}
    datasets, prompts, eval_rows = {"train": dataset}, [], 0
    if cfg.evaluates:
        datasets["eval"], eval_counts = tokenized_dataset(source["uri"], cfg.model, cfg.max_length, cfg.seed,
                                                          ids=source["ids"], keep=True)
        eval_rows = eval_counts["used"]
        console.say(f"[train] eval: {eval_rows} rows of {source['uri']}"
                    + (f" ({len(held_out)} question ids held out)" if held_out else ""))
        if eval_rows < cfg.num_workers:
            raise TrainSetError(f"eval set {source['uri']}: {eval_rows} usable rows for {cfg.num_workers} workers")
        if cfg.variant in ("sd-t", "sd-r") and cfg.eval_generations:
            prompts = eval_prompts(read_rows_of(source["uri"], source["ids"]), cfg.eval_generations)
    plan = plan_steps(cfg, counts["used"]) | {"eval_rows": eval_rows, "prompts": prompts, "dtype": training_dtype(cfg)}
    console.say(f"[train] dtype {plan['dtype']}" + (f" (auto on {'GPU' if cfg.use_gpu else 'CPU'})" if cfg.dtype == "auto" else "")
                + (": bf16 mixed precision, fp32 master weights" if plan["dtype"] == "bfloat16" else ""))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan, "scope": console.current_scope()},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=cfg.output,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=SCORE if cfg.keep_best else None,
                checkpoint_score_order="max" if cfg.keep_best == "parse_rate" else "min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # DeepSpeed picks CUDA when it finds it; on CPU it must be told.
            worker_runtime_env={} if cfg.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    latest = result.checkpoint and result.checkpoint.path
    batches = {"num_epochs": None if cfg.max_steps else cfg.num_epochs, "planned_steps": plan["steps"],
               "gradient_accumulation_steps": plan["accumulation"],
               "global_batch_size": cfg.num_workers * cfg.per_worker_batch_size * plan["accumulation"],
               "eval_rows": eval_rows, "dtype": plan["dtype"]}
    summary = {**result.return_value, **counts, **batches, "model": f"{cfg.output}/model", "checkpoint": latest}
    console.say("[train] done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def training_dtype(cfg: TrainConfig) -> str:
    """The dtype the workers train in (`auto` resolved), found by a Ray task with a worker's GPU, so on the kind of
    machine the workers run on; one answer for every worker (DeepSpeed needs them to agree)."""
    task = _dtype_on_a_worker.options(num_gpus=1 if cfg.use_gpu else None)
    return ray.get(task.remote(cfg.dtype, "cuda" if cfg.use_gpu else "cpu"))


@ray.remote(num_cpus=0)
def _dtype_on_a_worker(requested: str, device: str) -> str:
    return resolve_dtype(requested, device, device_caps())


def read_rows_of(uri: str, ids: list[str] | None) -> dict[str, list]:
    """id, task and prompt of the rows of `uri` with these ids (all rows when ids is None)."""
    rows = read_rows(uri, ["id", "task", "prompt"])
    if ids is None:
        return rows
    wanted = set(ids)
    keep = [i for i, row_id in enumerate(rows["id"]) if row_id in wanted]
    return {k: [v[i] for i in keep] for k, v in rows.items()}
