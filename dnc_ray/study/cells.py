"""Cells: outputs keyed by what they were made from, built side by side on Ray when resources allow.

A cell is one output folder made by one command from declared inputs: a teacher or evaluation run
(`generate`), a training set (`distill`), a student (`train`). Its key is a hash of

    its own settings (the model configs, task, sampling settings, training config: what changes the output)
    + for each input cell: that cell's key and digest

A generation run can change under an unchanged key (a re-submit retries its failed rows), so its
digest is a hash of its rows' content; a training set or a student is fully determined by its key
(digest = key). The folder is `<root>/cells/<name>-<key[:12]>/` with `cell.json` (key, settings,
inputs, summary, seconds) written last; a cell whose cell.json holds a complete result is reused.
A changed input changes the keys of exactly the cells downstream of it, so only those are redone
(the build systems DVC and Bazel work this way); an unchanged one is never rebuilt.

Independent cells run at once, each as a Ray task (0 CPUs itself) whose work reserves what its
config names (Ray Data actors, Ray Train workers); a cell starts when its inputs are done and the
resources its config asks for are free in the cluster (or nothing else runs), so 2 CPUs still
complete the study, one or two cells at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from dnc_ray.infra import console, storage

RUN_CONTENT = ("id", "sample", "decomposition", "subquestions", "solution", "prediction", "correct", "error")


def fingerprint(value) -> str:
    """sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def run_digest(uri: str) -> str:
    """A generation run's content: every row's text, prediction, correctness and error (not its timings)."""
    from dnc_ray.stages.store import RunStore

    return fingerprint([{k: row[k] for k in RUN_CONTENT} for row in RunStore(uri).read_rows()])


def set_digest(uri: str) -> str:
    """A training set's content (prompt and target of every row)."""
    table = pq.read_table(storage.open_input(storage.join(uri, "train.parquet")))
    return fingerprint(table.select(["id", "prompt", "target"]).to_pylist())


@dataclass
class Job:
    """What a cell runs, once its inputs are done: the settings its key is made of, the payload its builder
    takes (given the cell's folder), and the logical resources its config reserves."""

    settings: dict
    payload: Callable[[str], dict]
    demand: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    name: str  # "gsm8k/eval/sdr-teacher": <task>/<what>
    kind: str  # generate | distill | train
    inputs: tuple[str, ...]
    make: Callable[[dict[str, "Built"]], Job]
    meta: dict = field(default_factory=dict, compare=False)  # for the report: row, task, variant, ...


@dataclass
class Built:
    """A finished (or failed, or skipped) cell."""

    name: str
    kind: str
    key: str = ""
    folder: str = ""
    digest: str = ""
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False
    planned: bool = False  # dry run: it would be built (its key is "" when an input would be built too)
    error: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def cell_key(kind: str, settings: dict, inputs: dict[str, Built]) -> str:
    return fingerprint({"kind": kind, "settings": settings,
                        "inputs": {name: {"key": b.key, "digest": b.digest} for name, b in sorted(inputs.items())}})


def folder_name(name: str, key: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.@-]+', '-', name)}-{key[:12]}"


def read_record(folder: str) -> dict | None:
    path = storage.join(folder, "cell.json")
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except ValueError:
        return None  # a torn write cannot happen (atomic), but a hand-edited file is rebuilt, never trusted


def write_record(folder: str, record: dict) -> None:
    storage.write_text(storage.join(folder, "cell.json"), json.dumps(record, indent=2, default=str))


def complete(record: dict | None, key: str) -> bool:
    """Reusable: built under this key, with no failed row left to retry."""
    return bool(record) and record.get("key") == key and record.get("complete") is True


# ---------------------------------------------------------------- builders (run inside a Ray task)


def build_generate(payload: dict) -> tuple[dict, str]:
    from dnc_ray.config import GenerateConfig
    from dnc_ray.evaluate import evaluate_run
    from dnc_ray.stages.generate import run_generate

    cfg = GenerateConfig.model_validate(payload["config"])
    attempt = run_generate(cfg)
    report = evaluate_run(cfg.output)
    return {"attempt": attempt, "report": report}, run_digest(cfg.output)


def build_distill(payload: dict) -> tuple[dict, str]:
    from dnc_ray.distill import build_training_set, yield_table

    report = build_training_set(payload["runs"], payload["variant"], payload["output"])
    console.say(yield_table(report))
    return {"yield": report}, set_digest(payload["output"])


def build_train(payload: dict) -> tuple[dict, str]:
    from dnc_ray.config import TrainConfig
    from dnc_ray.train.recipe import run_train

    cfg = TrainConfig.model_validate(payload["config"])
    return {"train": run_train(cfg)}, ""


BUILDERS = {"generate": build_generate, "distill": build_distill, "train": build_train}


def _build_in_task(kind: str, name: str, payload: dict) -> dict:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # many cells at once: one progress line each, no bars
    ctx.enable_operator_progress_bars = False
    started = time.monotonic()
    try:
        with console.scope(name):  # many cells at once: each line names its cell
            summary, digest = BUILDERS[kind](payload)
    except Exception as e:  # reported per cell by the driver; the other cells go on
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": round(time.monotonic() - started, 2)}
    return {"summary": summary, "digest": digest, "seconds": round(time.monotonic() - started, 2)}


# ---------------------------------------------------------------- the scheduler (the driver)


# Rough relative cost of a cell of each kind, for choosing what to start first when not all fit.
WEIGHT = {"train": 4.0, "generate": 1.0, "distill": 0.1}


def _heights(cells: list[Cell]) -> dict[str, float]:
    """Each cell's cost plus that of the costliest chain of cells downstream of it (the critical path)."""
    downstream: dict[str, list[str]] = {c.name: [] for c in cells}
    for c in cells:
        for i in c.inputs:
            downstream[i].append(c.name)
    heights: dict[str, float] = {}
    for c in reversed(cells):  # inputs come before a cell: its downstream cells are done first
        heights[c.name] = WEIGHT.get(c.kind, 1.0) + max((heights[d] for d in downstream[c.name]), default=0.0)
    return heights


def _fits(demand: dict[str, float], running: list[dict[str, float]], capacity: dict[str, float]) -> bool:
    if not running:
        return True  # never wait for nothing: a cell bigger than the cluster still runs (and may scale it up)
    for resource, amount in demand.items():
        if amount <= 0:
            continue
        used = sum(d.get(resource, 0) for d in running)
        if capacity.get(resource, 0) <= 0:
            if used > 0:  # a resource the cluster does not show yet (autoscaling): one such cell at a time
                return False
        elif used + amount > capacity[resource] + 1e-9:
            return False
    return True


def run_cells(
    cells: list[Cell],
    root: str,
    *,
    assess: Callable[[Cell, dict], tuple[bool, str | None]] = lambda cell, summary: (True, None),
    max_parallel: int | None = None,
    log: Callable[[str], None] = print,
    dry_run: bool = False,
) -> dict[str, Built]:
    """Build every cell that is not complete under its current key, inputs first, independent ones at once.

    `assess(cell, summary)` -> (complete, error): whether a built cell is complete (e.g. a generation run
    without failed rows; an incomplete one is run again, resumed, at the next submission) and whether its
    result is unusable downstream (e.g. a teacher run with more failed rows than allowed).
    A cell that fails makes the cells downstream of it skipped; the others go on.
    `dry_run`: build nothing; say which cells a submission would reuse and which it would build (a cell
    downstream of one to build is built too: its key includes that cell's new key).
    """
    if dry_run:
        return _plan(cells, root)
    import ray

    remote = ray.remote(num_cpus=0, max_retries=0)(_build_in_task)
    names = {c.name for c in cells}
    for cell in cells:
        missing = [i for i in cell.inputs if i not in names]
        if missing:
            raise ValueError(f"cell {cell.name}: unknown inputs {missing}")
    results: dict[str, Built] = {}
    heights = _heights(cells)
    pending = sorted(cells, key=lambda c: -heights[c.name])  # the longest chain first (stable)
    running: dict = {}  # ObjectRef -> (cell, key, folder, inputs, settings, demand, started)
    prepared: dict = {}  # cell name -> (job, key, folder, its cell.json or None)

    def fail_unbuilt(cell: Cell, error: str, line: str) -> None:
        """A cell that will not run: its error recorded, the reason logged, taken off the pending list."""
        results[cell.name] = Built(cell.name, cell.kind, error=error, meta=cell.meta)
        log(line)
        pending.remove(cell)

    while pending or running:
        capacity = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        progressed = True
        while progressed:
            progressed = False
            for cell in list(pending):
                if any(i not in results for i in cell.inputs):
                    continue
                inputs = {i: results[i] for i in cell.inputs}
                failed = [i for i, b in inputs.items() if not b.ok]
                if failed:
                    fail_unbuilt(cell, f"skipped: input {failed[0]} failed", f"[study] skip  {cell.name}: input "
                                 f"{failed[0]} failed")
                    progressed = True
                    continue
                if cell.name not in prepared:  # once: its inputs are done, so its key is known
                    try:
                        job = cell.make(inputs)
                    except Exception as e:  # e.g. a config its inputs make invalid: this cell fails, not the study
                        error = f"{type(e).__name__}: {e}"
                        fail_unbuilt(cell, error, f"[study] FAILED {cell.name}: {error}")
                        progressed = True
                        continue
                    key = cell_key(cell.kind, job.settings, inputs)
                    folder = storage.join(root, "cells", folder_name(cell.name, key))
                    prepared[cell.name] = (job, key, folder, read_record(folder))
                job, key, folder, record = prepared[cell.name]
                if complete(record, key):
                    results[cell.name] = Built(cell.name, cell.kind, key, folder, record["digest"], record["summary"],
                                               record["seconds"], reused=True, meta=cell.meta)
                    log(f"[study] reuse {cell.name} ({key[:12]})")
                    pending.remove(cell)
                    progressed = True
                    continue
                if len(running) >= (max_parallel or max(1, int(capacity.get("CPU", 1)))):
                    continue  # each cell has a driver process of its own: at most one per CPU by default
                if not _fits(job.demand, [r[5] for r in running.values()], capacity):
                    continue
                why = "resume" if record and record.get("key") == key else "build"
                log(f"[study] {why} {cell.name} ({key[:12]}) -> {folder}")
                ref = remote.remote(cell.kind, cell.name, job.payload(folder))
                running[ref] = (cell, key, folder, inputs, job.settings, job.demand, time.monotonic())
                pending.remove(cell)
                progressed = True
        if not running:
            if pending:  # cannot happen: a cell whose inputs are done always fits when nothing runs
                raise RuntimeError(f"study scheduler stalled on {[c.name for c in pending]}")
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        cell, key, folder, inputs, settings, demand, started = running.pop(ready[0])
        wall = round(time.monotonic() - started, 2)
        try:
            out = ray.get(ready[0])
        except Exception as e:  # the task's worker died (OOM, node lost)
            out = {"error": f"{type(e).__name__}: {e}", "seconds": wall}
        if "error" in out:
            results[cell.name] = Built(cell.name, cell.kind, key, folder, error=out["error"], seconds=out["seconds"],
                                       meta=cell.meta)
            log(f"[study] FAILED {cell.name} after {out['seconds']:.1f}s: {out['error']}\n{out.get('traceback', '')}")
            continue
        digest = out["digest"] or key
        done, unusable = assess(cell, out["summary"])
        write_record(folder, {
            "name": cell.name, "kind": cell.kind, "key": key, "complete": done, "digest": digest,
            "settings": settings, "inputs": {i: {"key": b.key, "digest": b.digest, "folder": b.folder}
                                             for i, b in inputs.items()},
            "meta": cell.meta, "summary": out["summary"], "seconds": out["seconds"],
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        })
        results[cell.name] = Built(cell.name, cell.kind, key, folder, digest, out["summary"], out["seconds"],
                                   error=unusable, meta=cell.meta)
        log(f"[study] done  {cell.name} in {out['seconds']:.1f}s (wall {wall:.1f}s)"
            + (f"; unusable downstream: {unusable}" if unusable else ""))
    return {c.name: results[c.name] for c in cells}


def _plan(cells: list[Cell], root: str) -> dict[str, Built]:
    results: dict[str, Built] = {}
    for cell in cells:  # in order: a cell's inputs come before it
        inputs = {i: results[i] for i in cell.inputs}
        if any(b.planned for b in inputs.values()):
            results[cell.name] = Built(cell.name, cell.kind, planned=True, meta=cell.meta)
            continue
        job = cell.make(inputs)
        key = cell_key(cell.kind, job.settings, inputs)
        folder = storage.join(root, "cells", folder_name(cell.name, key))
        record = read_record(folder)
        if complete(record, key):
            results[cell.name] = Built(cell.name, cell.kind, key, folder, record["digest"], record["summary"],
                                       record["seconds"], reused=True, meta=cell.meta)
        else:
            results[cell.name] = Built(cell.name, cell.kind, key, folder, planned=True, meta=cell.meta)
    return results
