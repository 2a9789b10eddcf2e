"""What happens at each log, evaluation and save of a training run: keep_best and patience, checkpoints reported
to Ray Train (ranked by the eval metric), progress lines and metrics.jsonl, rank 0's TensorBoard and W&B."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import (
    Checkpoint,
)
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import (
    TrainerCallback,
)
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.trainer_utils import get_last_checkpoint

from dnc_ray.config import TrainConfig
from dnc_ray.infra import console, storage

SCORE = "checkpoint_score"  # what Ray Train ranks checkpoints by with keep_best


def best_evaluation(log_history: list[dict], key: str, greater: bool) -> tuple[int | None, float | None, int]:
    """(step, value) of the best evaluation by `key` (the first of equals), and the evaluations after it."""
    evals = [(entry["step"], entry[key]) for entry in log_history if key in entry]
    best = None
    for i, (step, value) in enumerate(evals):
        if best is None or (value > best[1] if greater else value < best[1]):
            best = (step, value, i)
    if best is None:
        return None, None, 0
    return best[0], best[1], len(evals) - 1 - best[2]


def stopped_early(cfg: TrainConfig, log_history: list[dict]) -> bool:
    if not cfg.patience:
        return False
    return best_evaluation(log_history, cfg.best_metric, cfg.keep_best == "parse_rate")[2] >= cfg.patience


class KeepBest(TrainerCallback):
    """keep_best: a checkpoint at each new best evaluation; with patience, the stop after that many without one."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        best_step, _, _ = best_evaluation(state.log_history, self.cfg.best_metric, self.cfg.keep_best == "parse_rate")
        if best_step == state.global_step:
            control.should_save = True
        if stopped_early(self.cfg, state.log_history):
            control.should_training_stop = True
            control.should_save = True  # the last model, for export: last


class ReportCheckpoint(RayTrainReportCallback):
    """Reports each checkpoint to Ray Train with this step's metrics; with keep_best, its score for the ranking
    (a checkpoint of a step without an evaluation gets the worst score: kept only while it is the latest)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.key, self.worst = cfg.best_metric, -math.inf if cfg.keep_best == "parse_rate" else math.inf

    def on_save(self, args, state, control, **kwargs):
        metrics = {"step": state.global_step}
        for entry in state.log_history:
            if entry.get("step") == state.global_step:
                metrics |= entry
        if self.key:
            metrics[SCORE] = metrics.get(self.key, self.worst)
        with tempfile.TemporaryDirectory() as folder:
            shutil.copytree(get_last_checkpoint(args.output_dir), os.path.join(folder, self.CHECKPOINT_NAME))
            ray.train.report(metrics=metrics, checkpoint=Checkpoint.from_directory(folder))


class Progress(TrainerCallback):
    """Every N steps a progress line (rank 0); rank 0 keeps metrics.jsonl.

    Metrics reach Ray Train only with checkpoints (ReportCheckpoint): a report waits until the controller, which
    polls every 2 s, took the previous one, so a report per logged step would hold every worker up to 2 s a step."""

    def __init__(self, cfg: TrainConfig, logs: "LogFolder | None" = None):
        self.every = cfg.log_every_steps
        self.metrics = storage.join(cfg.output, "metrics.jsonl")
        self.logs = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if "eval_loss" in logs and state.is_world_process_zero:
            parse = f"  parse rate {logs['eval_parse_rate']:.2f}" if "eval_parse_rate" in logs else ""
            console.say(f"[train] eval at step {step}: loss {logs['eval_loss']:.4f}{parse}")
        if "loss" not in logs or (step % self.every and step != state.max_steps):
            return
        if state.is_world_process_zero:
            eta = logs["train_runtime"] / step * (state.max_steps - step)  # steps run so far at their mean pace
            console.say(
                f"[train] step {step}/{state.max_steps}  loss {logs['loss']:.4f}  lr {logs['learning_rate']:.2e}  "
                f"{logs['train_tokens_per_second']:.0f} tok/s  elapsed {logs['train_runtime']:.0f}s  eta {eta:.0f}s"
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            storage.write_text(self.metrics, "".join(json.dumps(s) + "\n" for s in step_metrics(state.log_history)))
            if self.logs:
                self.logs.sync()

    on_train_end = on_save


def step_metrics(log_history: list[dict]) -> list[dict]:
    """One entry per step: its training log merged with its evaluation, if any."""
    steps: dict[int, dict] = {}
    for entry in log_history:
        if "loss" in entry or "eval_loss" in entry:
            steps.setdefault(entry["step"], {}).update(entry)
    return [steps[step] for step in sorted(steps)]


class LogFolder:
    """Where rank 0's TensorBoard and W&B files go: the output itself when local, else a local folder
    copied to the output at every checkpoint and at the end."""

    def __init__(self, output: str):
        fs, path = storage.filesystem(output)
        self.output = output
        self.local = path if isinstance(fs, pafs.LocalFileSystem) else tempfile.mkdtemp(prefix="dnc-train-logs-")
        self.remote = not isinstance(fs, pafs.LocalFileSystem)
        os.makedirs(self.local, exist_ok=True)

    def sync(self) -> None:
        if self.remote:
            for name in os.listdir(self.local):
                storage.copy_folder(os.path.join(self.local, name), storage.join(self.output, name))


def logging_callbacks(cfg: TrainConfig, logs: LogFolder) -> list[TrainerCallback]:
    """Rank 0's TensorBoard writer and W&B run (started here with the config, finished after training)."""
    callbacks = []
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=os.path.join(logs.local, "tensorboard"))))
    if cfg.wandb:
        import wandb

        w = cfg.wandb
        wandb.init(
            project=w.project, entity=w.entity, name=w.name or os.path.basename(cfg.output.rstrip("/")),
            mode=w.mode, tags=w.tags, dir=logs.local, config=cfg.model_dump(mode="json"),
            id=hashlib.sha1(cfg.output.encode()).hexdigest()[:16], resume="allow",  # a restarted run continues it
        )
        callbacks.append(WandbCallback())
    return callbacks
