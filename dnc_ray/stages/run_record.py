"""A run's record (run.json): its identity (what makes two configs the same run, resumable into one output) and its
attempts; a damaged or missing record rebuilt from the config when the stored rows match it."""

from __future__ import annotations

import datetime as dt

from dnc_ray.config import GenerateConfig
from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.configs import ReferenceModel
from dnc_ray.method import STRATEGIES
from dnc_ray.stages.reference import REFERENCE
from dnc_ray.stages.store import DamagedRunRecord, RunStore
from dnc_ray.tasks import get_task

# What makes two configs the same run (resumable into one output); the rest are runtime knobs.
_MODEL_IDENTITY = {"engine", "model", "base_url", "temperature", "max_tokens"}


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
        **({"structured_decompositions": True} if cfg.structured_decompositions else {}),  # absent: as before
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_meta(store: RunStore, cfg: GenerateConfig) -> tuple[dict, str | None]:
    """The output's run record (a new one when there is none) and, when it had to be rebuilt, a warning.

    A run.json that is damaged (or missing beside rows) is rebuilt from `cfg` when the rows there
    match it: their task, split, sample numbers and model names (what rows can tell; temperature,
    max_tokens and base_url cannot be checked). Its attempts are replaced by one `recovered` entry
    counting the rows found. Another run's record, or rows that do not match, are refused.
    """
    fresh = {"identity": run_identity(cfg), "attempts": []}
    try:
        meta = store.read_meta() if store.exists() else None
    except DamagedRunRecord as e:
        damage = str(e)
    else:
        if meta is None and not store.has_rows():
            return fresh, None
        if meta is not None:
            if meta["identity"] != run_identity(cfg):
                raise ConfigError(
                    f"output {cfg.output} holds a different run (task, strategy or models differ): "
                    "choose a new output, or delete that folder"
                )
            return meta, None
        damage = f"{cfg.output}/run.json: missing, but rows/ holds rows"
    stored = store.read_rows()
    mismatch = _rows_mismatch(stored, cfg)
    if mismatch:
        raise ConfigError(f"{damage}; it cannot be rebuilt from this config: {mismatch}")
    failed = sum(r["error"] is not None for r in stored)
    fresh["attempts"].append({"recovered": now(), "finished": None, "rows": len(stored), "errors": failed,
                              "elapsed_s": 0.0, "run_rows": len(stored)})
    warning = (f"{damage}; rebuilt from this config (identity and config) and the {len(stored)} rows in rows/ "
               f"({failed} failed or unfinished, to be retried); the earlier attempts' history (times, counts) is lost")
    return fresh, warning


def _rows_mismatch(stored: list[dict], cfg: GenerateConfig) -> str | None:
    """Why the stored rows cannot be this config's run, or None."""
    roles = STRATEGIES[cfg.strategy].roles
    names = {role: getattr(cfg, role) for role in ("decomposer", "solver")}
    expected = {role: (REFERENCE if isinstance(m, ReferenceModel) else m.model) if m is not None else None
                for role, m in names.items()}
    for row in stored:
        where = f"row {row['id']} sample {row['sample']}"
        if row["task"] != get_task(cfg.task).name or row["split"] != cfg.task.split:
            return f"{where} is of {row['task']}/{row['split']}, the config runs {cfg.task.name}/{cfg.task.split}"
        if row["sample"] >= cfg.num_samples:
            return f"{where}: the config samples {cfg.num_samples} per question"
        for role in ("decomposer", "solver"):
            if cfg.strategy == "solve" and role == "decomposer":
                continue  # the decompositions come from another run
            if row[role] is not None and (role not in roles or row[role] != expected[role]):
                return f"{where} has {role} {row[role]}, the config {expected[role] if role in roles else 'none'}"
    return None
