"""`dnc generate`: a strategy over a task split as a Ray Data pipeline, written as resumable Parquet.

    rows -> [reference decompositions] -> [MethodStage: the strategy's steps per row] -> [score]
         -> driver writes each finished batch

`MethodStage` is one async actor pool holding every model the strategy uses (method_stage.py).
Rows whose latest attempt succeeded are skipped; a failed row restarts at the step that failed.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow as pa
import ray

from dataclasses import replace

from dnc_ray.config import ConfigError, GenerateConfig, OpenAIModel, ReferenceModel, RowsFailed, failed_rows_allowed
from dnc_ray.infra import storage
from dnc_ray.infra.cluster import init_ray
from dnc_ray.infra.progress import Progress
from dnc_ray.infra.store import RunStore
from dnc_ray.method import STRATEGIES, MethodOptions
from dnc_ray.stages.method_stage import MethodStage
from dnc_ray.stages.reference import reference_decompose
from dnc_ray.method.row import new_row, row_key, to_table
from dnc_ray.stages.score import score_batch
from dnc_ray.tasks import get_task, load_rows, scorer

# What makes two configs the same run (resumable into one output); the rest are runtime knobs.
_MODEL_IDENTITY = {"engine", "model", "base_url", "temperature", "max_tokens"}
BATCHES_PER_ACTOR = 4  # batches a MethodStage actor runs at once: its models' calls stay busy across batches


def run_identity(cfg: GenerateConfig) -> dict:
    def model(m):
        return None if m is None else m.model_dump(mode="json", include=_MODEL_IDENTITY)

    return {
        "task": cfg.task.model_dump(mode="json", exclude={"limit"}),
        "strategy": cfg.strategy,
        "num_samples": cfg.num_samples,
        "max_subquestions": cfg.max_subquestions,
        "max_turns": cfg.max_turns,
        "decompositions": cfg.decompositions,
        "decomposer": model(cfg.decomposer),
        "solver": model(cfg.solver),
    }


def input_rows(cfg: GenerateConfig) -> list[dict]:
    """The rows to run: a task split (x num_samples), or the decompositions of an earlier run."""
    if cfg.strategy != "solve":
        return [new_row(r, s) for r in load_rows(cfg.task) for s in range(cfg.num_samples)]
    source = RunStore(cfg.decompositions)
    if not source.exists():
        raise ConfigError(f"decompositions: {cfg.decompositions} holds no run (no run.json)")
    rows = [r for r in source.read_rows() if r["error"] is None and r["subquestions"] is not None]
    for row in rows:
        row.update(solution=None, prediction=None, solver=None, score=None, correct=None)
        row["usage"]["solve"] = None
    ids = list(dict.fromkeys(r["id"] for r in rows))  # questions in order; offset/limit count questions
    end = cfg.task.offset + cfg.task.limit if cfg.task.limit else None
    kept = set(ids[cfg.task.offset : end])
    return [r for r in rows if r["id"] in kept]


def build_dataset(cfg: GenerateConfig, rows: list[dict]) -> ray.data.Dataset:
    """The Ray Data pipeline: reference decompositions (if any), the strategy's MethodStage, scoring."""
    models = {role: getattr(cfg, role) for role in STRATEGIES[cfg.strategy].roles}
    reference = isinstance(models.get("decomposer"), ReferenceModel)
    models = {role: model for role, model in models.items() if not isinstance(model, ReferenceModel)}
    rows_per_batch = max((m.batch_size for m in models.values()), default=64)
    table = to_table(rows)
    ds = ray.data.from_arrow([table.slice(i, rows_per_batch) for i in range(0, len(rows), rows_per_batch)])
    if reference:
        ds = ds.map_batches(reference_decompose, batch_format="pyarrow", num_cpus=0)
    if models:
        ds = ds.map_batches(
            MethodStage,
            fn_constructor_args=(cfg.strategy, models, method_options(cfg)),
            batch_size=rows_per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=max(m.actors for m in models.values()), max_concurrent_calls_per_actor=BATCHES_PER_ACTOR
            ),
            num_cpus=sum(m.num_cpus for m in models.values()),
            num_gpus=sum(getattr(m, "num_gpus", 0) for m in models.values()) or None,
        )
    if cfg.strategy != "decompose":
        ds = ds.map_batches(score_batch, fn_kwargs={"scorer": scorer(cfg.task)}, batch_format="pyarrow", num_cpus=0)
    return ds


def method_options(cfg: GenerateConfig) -> MethodOptions:
    rules = replace(get_task(cfg.task).rules, max_subquestions=cfg.max_subquestions)
    return MethodOptions(rules=rules, max_turns=cfg.max_turns)


def rows_to_run(rows: list[dict], stored: list[dict]) -> list[dict]:
    """The rows whose latest attempt did not succeed; a failed one keeps the steps it finished."""
    latest = {row_key(r): r for r in stored}
    todo = []
    for row in rows:
        earlier = latest.get(row_key(row))
        if earlier is None:
            todo.append(row)
        elif earlier["error"] is not None:
            todo.append({**earlier, "error": None, "score": None, "correct": None})
    return todo


def check_output(output: str) -> None:
    """The output is a folder or nothing yet: never a file (nor a path through one)."""
    if storage.exists(output) and not storage.is_folder(output):
        raise ConfigError(f"output {output}: is a file, not a folder; choose another output")
    if "://" not in output:
        for parent in Path(storage.absolute(output)).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"output {output}: {parent} is a file, not a folder; choose another output")
                break


def check_api_keys(models: dict[str, object]) -> None:
    """Every `api_key_env` names a variable that is set here (the driver; Ray workers inherit it, as do
    `ray job submit` runtime_env env_vars): one line naming the variable, never its value."""
    for role, model in models.items():
        if isinstance(model, OpenAIModel) and model.api_key_env is not None and not os.environ.get(model.api_key_env):
            raise ConfigError(
                f"environment variable {model.api_key_env} (api_key_env of {role}, model {model.model}) is not set: "
                "export it with the API key, or set api_key_env: null for an endpoint without a key"
            )


def check_failed_rows(cfg: GenerateConfig, attempt: dict) -> None:
    """Raise RowsFailed when the run's failed rows (after this attempt) exceed `max_failed_rows`."""
    allowed = failed_rows_allowed(cfg.max_failed_rows, attempt["run_rows"])
    if attempt["errors"] > allowed:
        raise RowsFailed(
            f"{cfg.output}: {attempt['errors']} of {attempt['run_rows']} rows failed, more than max_failed_rows "
            f"({cfg.max_failed_rows}) allows; the rows are written with their error: run the same config again "
            "to retry them"
        )


def run_generate(cfg: GenerateConfig) -> dict:
    """Run (or resume) the config's generation; returns this attempt's summary.

    Checked before Ray starts and before anything is written: the output is not a file, every
    `api_key_env` is set, the output holds no other run, the task data reads.
    """
    check_output(cfg.output)
    check_api_keys({role: getattr(cfg, role) for role in ("decomposer", "solver")})
    store = RunStore(cfg.output)
    meta = store.read_meta() if store.exists() else {"identity": run_identity(cfg), "attempts": []}
    if meta["identity"] != run_identity(cfg):
        raise ConfigError(
            f"output {cfg.output} holds a different run (task, strategy or models differ): "
            "choose a new output, or delete that folder"
        )
    rows = input_rows(cfg)
    todo = rows_to_run(rows, store.read_rows())
    if todo:
        init_ray(cfg.ray)  # before anything is written: an unreachable cluster leaves the output as it was
    print(f"[generate] {cfg.strategy} on {cfg.task.name}/{cfg.task.split}: {len(rows)} rows, "
          f"{len(rows) - len(todo)} done earlier, {len(todo)} to run -> {cfg.output}", flush=True)
    meta["config"] = cfg.model_dump(mode="json")  # holds env var NAMES only, never keys
    store.write_meta(meta)
    progress = Progress("generate", len(todo), cfg.progress_interval_s)
    if todo:
        for batch in build_dataset(cfg, todo).iter_batches(batch_size=None, batch_format="pyarrow"):
            store.write_rows(batch)
            progress.update(batch.num_rows, _errors(batch))
    attempt = {
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": progress.done,
        "errors": progress.errors,
        "elapsed_s": round(progress.elapsed_s, 3),
        "run_rows": len(rows),
    }
    meta["attempts"].append(attempt)
    store.write_meta(meta)
    print(f"[generate] finished: {progress.done} rows run ({progress.errors} failed), {len(rows) - len(todo)} done "
          f"earlier, {len(rows)} in the run, {progress.elapsed_s:.1f}s -> {cfg.output}", flush=True)
    return attempt


def _errors(batch: pa.Table) -> int:
    return batch.num_rows - batch["error"].null_count
