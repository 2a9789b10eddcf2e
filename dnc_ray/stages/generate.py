"""`dnc generate`: a strategy over a task split as a Ray Data pipeline, written as resumable Parquet.

    rows -> [reference decompositions] -> [MethodStage: the strategy's steps per row] -> [score]
         -> driver writes each finished batch
    MethodStage --(each row as it finishes a step: a Ray queue)--> driver writes them at once

`MethodStage` is one async actor pool holding every model the strategy uses (method_stage.py).
Rows whose latest attempt succeeded are skipped; a failed row restarts at the step that failed, an
unfinished one (a crash between two steps) at the step still to run. One driver per output at a
time: it holds the output's lease (infra/lease.py) while it runs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import ray

from dnc_ray.config import GenerateConfig, failed_rows_allowed
from dnc_ray.infra import console, storage
from dnc_ray.infra.cluster import init_ray
from dnc_ray.infra.errors import ConfigError, RowsFailed
from dnc_ray.infra.lease import Lease
from dnc_ray.infra.progress import Progress
from dnc_ray.llm.configs import HFModel, OpenAIModel, ReferenceModel, VLLMModel
from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.llm.vllm_settings import check_settings
from dnc_ray.method import STRATEGIES, MethodOptions
from dnc_ray.method.row import new_row, row_key, to_table
from dnc_ray.stages import cost_controls
from dnc_ray.stages.batch_rounds import run_rounds, uses_batch_api
from dnc_ray.stages.method_stage import MethodStage
from dnc_ray.stages.reference import reference_decompose
from dnc_ray.stages.row_writer import RowWriter
from dnc_ray.stages.run_record import load_meta, now
from dnc_ray.stages.score import score_batch
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import get_task, load_rows, scorer

BATCHES_PER_ACTOR = 4  # batches a MethodStage actor runs at once: its models' calls stay busy across batches


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


def build_dataset(cfg: GenerateConfig, rows: list[dict], sink=None, controls=None) -> ray.data.Dataset:
    """The Ray Data pipeline: reference decompositions (if any), the strategy's MethodStage, scoring.

    `sink` (a ray.util.queue.Queue): where MethodStage sends each row as soon as it finishes a step.
    """
    models = {role: getattr(cfg, role) for role in STRATEGIES[cfg.strategy].roles}
    reference = isinstance(models.get("decomposer"), ReferenceModel)
    models = {role: model for role, model in models.items() if not isinstance(model, ReferenceModel)}
    rows_per_batch = max((m.batch_size for m in models.values()), default=64)
    engines = list({cost_controls.engine_key(m): m for m in models.values()}.values())  # what an actor reserves
    table = to_table(rows)
    ds = ray.data.from_arrow([table.slice(i, rows_per_batch) for i in range(0, len(rows), rows_per_batch)])
    if reference:
        ds = ds.map_batches(reference_decompose, batch_format="pyarrow", num_cpus=0)
    if models:
        ds = ds.map_batches(
            MethodStage,
            fn_constructor_args=(cfg.strategy, models, method_options(cfg), sink, controls),
            batch_size=rows_per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=max(m.actors for m in models.values()), max_concurrent_calls_per_actor=BATCHES_PER_ACTOR
            ),
            num_cpus=sum(m.num_cpus for m in engines),
            num_gpus=sum(getattr(m, "num_gpus", 0) for m in engines) or None,
        )
    if cfg.strategy != "decompose":
        ds = ds.map_batches(score_batch, fn_kwargs={"scorer": scorer(cfg.task)}, batch_format="pyarrow", num_cpus=0)
    return ds


def method_options(cfg: GenerateConfig) -> MethodOptions:
    rules = replace(get_task(cfg.task).rules, max_subquestions=cfg.max_subquestions)
    return MethodOptions(rules=rules, max_turns=cfg.max_turns, structured_decompositions=cfg.structured_decompositions)


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


def check_vllm_settings(models: dict[str, object]) -> None:
    """Every vllm model's folder exists and its max_model_len and KV cache fit the model (ConfigError)."""
    for role, model in models.items():
        if isinstance(model, VLLMModel):
            check_settings(model, role)


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
    `api_key_env` is set, no other driver holds the output's lease, the output holds no other run,
    the task data reads. Then, under the lease, run.json gets this attempt (`finished: null` until
    it ends: an attempt killed midway stays so) and every row is written as soon as it is done.
    """
    check_output(cfg.output)
    check_api_keys({role: getattr(cfg, role) for role in ("decomposer", "solver")})
    check_vllm_settings({role: getattr(cfg, role) for role in ("decomposer", "solver")})
    store = RunStore(cfg.output)
    lease = Lease(cfg.output)
    lease.refuse_if_held()
    load_meta(store, cfg)  # a run record of another run, or a damaged one that cannot be rebuilt: refused here
    rows = input_rows(cfg)
    parts = store.part_names()
    todo = rows_to_run(rows, store.read_rows())
    if todo and not uses_batch_api(cfg):  # a batch run is driven from here: no Ray
        init_ray(cfg.ray.address, cfg.ray.num_cpus)  # before anything is written: an unreachable cluster leaves the output as it was
    with lease:
        meta, warning = load_meta(store, cfg)  # again: what a driver before this one wrote last
        if store.part_names() != parts:
            todo = rows_to_run(rows, store.read_rows())
            if todo and not uses_batch_api(cfg):
                init_ray(cfg.ray.address, cfg.ray.num_cpus)
        if warning:
            console.say(f"[generate] warning: {warning} (copy kept as {store.keep_damaged_meta()})", err=True)
        console.say(f"[generate] {cfg.strategy} on {cfg.task.name}/{cfg.task.split}: {len(rows)} rows, "
                    f"{len(rows) - len(todo)} done earlier, {len(todo)} to run -> {cfg.output}")
        meta["config"] = cfg.model_dump(mode="json")  # holds env var NAMES only, never keys
        attempt = {"started": now(), "finished": None, "rows": 0, "errors": 0, "elapsed_s": 0.0, "run_rows": len(rows)}
        meta["attempts"].append(attempt)
        lease.check()
        store.write_meta(meta)
        if todo and not uses_batch_api(cfg):
            attempt["dtype"] = local_model_dtypes(cfg)
        progress = Progress("generate", len(todo), cfg.progress_interval_s)
        try:
            spend = _run(cfg, todo, store, lease, progress, meta) if todo else {}
        finally:
            progress.close()
        merged = store.compact()  # rows written as they finished: many small parts
        if merged:
            console.say(f"[generate] merged {merged} parts of {cfg.output}/rows into one")
        attempt.update(finished=now(), rows=progress.done, errors=progress.errors,
                       elapsed_s=round(progress.elapsed_s, 3), **spend)
        lease.check()
        store.write_meta(meta)
    console.say(f"[generate] finished: {progress.done} rows run ({progress.errors} failed), {len(rows) - len(todo)} done "
                f"earlier, {len(rows)} in the run, {progress.elapsed_s:.1f}s -> {cfg.output}")
    cost_controls.check_budget(cfg, attempt)  # BudgetReached when budget_usd stopped rows
    return attempt


def local_model_dtypes(cfg: GenerateConfig) -> dict[str, str]:
    """The dtype each local (hf) model of the run loads in (`auto` resolved), found by a Ray task with the
    model's GPUs, so on the kind of worker its actors run on."""
    models = {role: getattr(cfg, role) for role in STRATEGIES[cfg.strategy].roles}
    found = {role: _dtype_on_a_worker.options(num_gpus=m.num_gpus or None).remote(m.dtype, m.device)
             for role, m in models.items() if isinstance(m, HFModel)}
    return {role: ray.get(ref) for role, ref in found.items()}


@ray.remote(num_cpus=0)
def _dtype_on_a_worker(requested: str, device: str) -> str:
    return resolve_dtype(requested, device, device_caps())


def _run(cfg: GenerateConfig, todo: list[dict], store: RunStore, lease: Lease, progress: Progress, meta: dict) -> dict:
    """Run the pipeline over `todo`, writing rows as the MethodStage actors send them and as batches come out;
    returns what the attempt spent (and the budget's summary). A batch-mode run goes by rounds (batch_rounds.py)."""
    from ray.util.queue import Queue

    spent_before = cost_controls.run_spend(store.read_rows())
    if uses_batch_api(cfg):
        writer = RowWriter(store, lease, progress, None, None)  # the rounds score their rows
        budget = run_rounds(cfg, todo, writer, meta, lambda: (lease.check(), store.write_meta(meta)),
                            method_options(cfg), spent_before)
        writer.close()
        return cost_controls.spend_summary(store, spent_before, {"budget": budget})
    controls = cost_controls.start(cfg, spent_before)  # shared rate limits, the budget's ledger
    has_models = any(not isinstance(getattr(cfg, role), ReferenceModel) for role in STRATEGIES[cfg.strategy].roles)
    sink = Queue(actor_options={"num_cpus": 0}) if has_models else None
    writer = RowWriter(store, lease, progress, scorer(cfg.task) if cfg.strategy != "decompose" else None, sink)
    try:
        for batch in build_dataset(cfg, todo, sink, controls).iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.batch_done(batch)
    finally:
        writer.close()  # what the actors finished is written even when the pipeline failed
        if sink is not None:
            ray.kill(sink.actor)
        seen = cost_controls.stop(controls)
    return cost_controls.spend_summary(store, spent_before, seen)
