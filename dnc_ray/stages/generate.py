"""`dnc generate`: a strategy over a task split as a Ray Data pipeline, written as resumable Parquet.

    rows -> [decompose] -> [solve | direct] -> [score] -> driver writes each finished batch

Each model stage is an actor pool (`ModelStage`, async `HTTPModelStage` for openai engines); rows whose
latest attempt succeeded are skipped.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import ray

from dnc_ray.config import STAGES_OF, ConfigError, GenerateConfig, OpenAIModel, ReferenceModel
from dnc_ray.infra.cluster import init_ray
from dnc_ray.infra.progress import Progress
from dnc_ray.infra.store import RunStore
from dnc_ray.stages.decompose import reference_decompose
from dnc_ray.stages.model_stage import HTTPModelStage, ModelStage
from dnc_ray.stages.rows import new_row, row_key, to_table
from dnc_ray.stages.score import score_batch
from dnc_ray.tasks import load_rows, scorer

# What makes two configs the same run (resumable into one output); the rest are runtime knobs.
_MODEL_IDENTITY = {"engine", "model", "base_url", "temperature", "max_tokens"}
HTTP_BATCHES_PER_ACTOR = 4  # batches an openai stage's actor holds at once (requests stay bounded by max_in_flight)


def run_identity(cfg: GenerateConfig) -> dict:
    def model(m):
        return None if m is None else m.model_dump(mode="json", include=_MODEL_IDENTITY)

    return {
        "task": cfg.task.model_dump(mode="json", exclude={"limit"}),
        "strategy": cfg.strategy,
        "num_samples": cfg.num_samples,
        "max_subquestions": cfg.max_subquestions,
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
    """The Ray Data pipeline for the strategy: one operator per stage, then scoring."""
    stages = STAGES_OF[cfg.strategy]
    first = cfg.decomposer if "decompose" in stages else cfg.solver
    block = getattr(first, "batch_size", 64)
    table = to_table(rows)
    ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, len(rows), block)])
    if "decompose" in stages:
        ds = _model_stage(ds, "decompose", cfg.decomposer, cfg.max_subquestions)
    if "solve" in stages:
        ds = _model_stage(ds, "direct" if cfg.strategy == "direct" else "solve", cfg.solver, cfg.max_subquestions)
        ds = ds.map_batches(score_batch, fn_kwargs={"scorer": scorer(cfg.task)}, batch_format="pyarrow", num_cpus=0)
    return ds


def _model_stage(ds: ray.data.Dataset, stage: str, model, max_subquestions: int) -> ray.data.Dataset:
    if isinstance(model, ReferenceModel):
        return ds.map_batches(reference_decompose, batch_format="pyarrow", num_cpus=0)
    if isinstance(model, OpenAIModel):  # async: several batches share one actor's requests in flight
        udf, calls = HTTPModelStage, HTTP_BATCHES_PER_ACTOR
    else:  # one model, one generate call at a time
        udf, calls = ModelStage, None
    return ds.map_batches(
        udf,
        fn_constructor_args=(stage, model, max_subquestions),
        batch_size=model.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=model.actors, max_concurrent_calls_per_actor=calls),
        num_cpus=model.num_cpus,
        num_gpus=getattr(model, "num_gpus", 0) or None,
    )


def run_generate(cfg: GenerateConfig) -> dict:
    """Run (or resume) the config's generation; returns this attempt's summary."""
    store = RunStore(cfg.output)
    meta = store.read_meta() if store.exists() else {"identity": run_identity(cfg), "attempts": []}
    if meta["identity"] != run_identity(cfg):
        raise ConfigError(
            f"output {cfg.output} holds a different run (task, strategy or models differ): "
            "choose a new output, or delete that folder"
        )
    rows = input_rows(cfg)
    done = store.done_keys()
    todo = [r for r in rows if row_key(r) not in done]
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
    }
    meta["attempts"].append(attempt)
    store.write_meta(meta)
    return attempt


def _errors(batch: pa.Table) -> int:
    return batch.num_rows - batch["error"].null_count
