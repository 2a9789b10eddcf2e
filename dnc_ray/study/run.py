"""`dnc study`: the paper's study as one job of cells (dnc_ray/study/plan.py), then the report."""

from __future__ import annotations

import time

from dnc_ray.config import failed_rows_allowed
from dnc_ray.infra import console, storage
from dnc_ray.infra.cluster import init_ray
from dnc_ray.infra.errors import RowsFailed
from dnc_ray.infra.lease import Lease
from dnc_ray.stages.generate import check_api_keys, check_output
from dnc_ray.study.cells import run_cells
from dnc_ray.study.config import StudyConfig
from dnc_ray.study.plan import StudyPlan
from dnc_ray.study.report import PLOT, write_report

REPORT_FILES = ("report.md", "report.json", PLOT)


class StudyFailed(RuntimeError):
    """Cells failed (an exception in the cell, not failed rows); the report names them."""


def plan_study(cfg: StudyConfig) -> dict[str, str]:
    """What a submission would do, building nothing: cell name -> "reuse" or "build"."""
    cells = StudyPlan(cfg).cells()
    results = run_cells(cells, cfg.output.rstrip("/"), dry_run=True)
    plan = {name: "build" if b.planned else "reuse" for name, b in results.items()}
    for name, what in plan.items():
        console.say(f"[study] {what:5} {name}")
    console.say(f"[study] {sum(w == 'build' for w in plan.values())} cells to build, "
                f"{sum(w == 'reuse' for w in plan.values())} to reuse")
    return plan


def run_study(cfg: StudyConfig) -> dict:
    """Build every cell not yet built under its current key, then write the report; returns report.json's data.

    Raises StudyFailed when a cell failed (the cells downstream of it are skipped, the others are built and
    the report is written first), RowsFailed when generation cells have more failed rows than allowed."""
    out = cfg.output.rstrip("/")
    check_output(out)
    models = {}
    for task in cfg.tasks:
        teacher = cfg.teacher_of(task)
        models |= {f"{task.key} teacher decomposer": teacher.decomposer, f"{task.key} teacher solver": teacher.solver}
    check_api_keys(models)
    with Lease(out):  # one study driver per output (each generation cell also holds its own folder's lease)
        return _run_study(cfg, out)


def _run_study(cfg: StudyConfig, out: str) -> dict:
    for name in REPORT_FILES:  # never leave an old report beside a study that did not finish
        storage.delete(storage.join(out, name))
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    plan = StudyPlan(cfg)
    cells = plan.cells()
    console.say(f"[study] {len(cells)} cells over {', '.join(t.key for t in cfg.tasks)} -> {out}/cells")
    started = time.monotonic()
    results = run_cells(cells, out, assess=plan.assess, max_parallel=cfg.max_parallel_cells,
                        log=console.say)
    data = write_report(cfg, plan, results, time.monotonic() - started)
    built = [b for b in results.values() if not b.reused and b.ok]
    console.say(f"[study] {len(built)} cells built, {sum(b.reused for b in results.values())} reused, "
                f"{sum(not b.ok for b in results.values())} failed or skipped; wall {data['wall_s']:.0f}s")
    failed = [b for b in results.values() if b.error and not b.summary and not b.error.startswith("skipped")]
    if failed:
        raise StudyFailed("; ".join(f"{b.name}: {b.error}" for b in failed))
    too_many = [b for b in results.values() if b.kind == "generate" and b.summary and
                b.summary["report"]["errors"] > failed_rows_allowed(cfg.max_failed_rows, b.summary["report"]["rows"])]
    if too_many:
        raise RowsFailed("; ".join(f"{b.name}: {b.summary['report']['errors']} of {b.summary['report']['rows']} rows "
                                   "failed" for b in too_many) + f" (max_failed_rows {cfg.max_failed_rows}); "
                         "submit the study again to retry them")
    return data
