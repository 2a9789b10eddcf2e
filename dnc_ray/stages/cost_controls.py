"""The cost controls of a `dnc generate` run on Ray Data: shared rate limits and the budget.

The driver starts them (`start`) before the dataset and hands them (`Controls`, picklable) to every
MethodStage actor, which builds its models through `Controls.models`:

- one LimiterActor per endpoint (`OpenAIModel.limit_key`: base_url and model) among the run's online
  `openai` models, whatever their limits: the decomposer and the solver on the same endpoint share it, and
  every actor's engine waits its turn there; a 429 pauses it for all;
- one LedgerActor when `budget_usd` is set, holding what the run's rows have cost so far (earlier attempts
  included): every model call reserves its worst case there first (llm/budget.py).

`stop` reads the ledger's summary and ends the actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dnc_ray.config import GenerateConfig
from dnc_ray.infra.errors import BudgetReached
from dnc_ray.llm import Engine, make_engine
from dnc_ray.llm.budget import BudgetedModel, shared_ledger
from dnc_ray.llm.chat_model import ChatModel
from dnc_ray.llm.configs import HFModel, OpenAIModel, VLLMModel
from dnc_ray.llm.rate_limit import Limiter, shared_limiter
from dnc_ray.method import STRATEGIES
from dnc_ray.stages.store import RunStore


def run_spend(rows: list[dict]) -> float:
    """What a run's rows cost so far (the cost columns of every stage)."""
    return sum((stage or {}).get("cost_usd") or 0.0 for row in rows for stage in (row.get("usage") or {}).values())


@dataclass
class SplitLimit:
    """The alternative to a shared limiter that benchmarks/rate_limits.py measures: each actor holds its
    1/`actors` share of the limits in its own Limiter (no actor calls, no shared pause)."""

    requests_per_minute: float | None
    tokens_per_minute: float | None
    actors: int

    def local(self) -> Limiter:
        share = lambda limit: None if limit is None else limit / self.actors  # noqa: E731
        return Limiter(share(self.requests_per_minute), share(self.tokens_per_minute))


@dataclass
class Controls:
    limiters: dict[str, object] = field(default_factory=dict)  # role -> SharedLimiter (or SplitLimit)
    endpoints: dict[tuple[str, str], object] = field(default_factory=dict)  # limit_key -> the same
    ledger: object | None = None  # SharedLedger
    actors: list = field(default_factory=list)  # the Ray actors started, ended by stop()

    def __getstate__(self) -> dict:
        return {"limiters": self.limiters, "endpoints": {}, "ledger": self.ledger, "actors": []}

    def models(self, cfgs: dict[str, HFModel | OpenAIModel]) -> dict[str, object]:
        """The method's models for these configs, their engines on the shared limiters, their calls budgeted."""
        built, local = {}, {}
        for role, engine in make_engines(cfgs).items():
            cfg = cfgs[role]
            spec = self.limiters.get(role)
            if spec is not None:
                if id(spec) not in local:  # the roles of one endpoint share one limiter in this actor too
                    local[id(spec)] = spec.local() if isinstance(spec, SplitLimit) else spec
                engine.limiter = local[id(spec)]
            model = ChatModel(cfg, engine)
            if self.ledger is not None:
                model = BudgetedModel(model, self.ledger, in_flight(cfg))
            built[role] = model
        return built


def make_engines(cfgs: dict[str, HFModel | OpenAIModel | VLLMModel]) -> dict[str, Engine]:
    """An engine per role; the roles of one vllm model (settings other than sampling alike) share one engine, so
    its model loads once and its continuous batching takes both roles' calls."""
    engines, shared = {}, {}
    for role, cfg in cfgs.items():
        key = engine_key(cfg)
        engines[role] = shared[key] = shared.get(key) or make_engine(cfg)
    return engines


def engine_key(cfg: HFModel | OpenAIModel | VLLMModel) -> str:
    """Models with the same key run on one engine in an actor: vllm models alike but for sampling settings."""
    if isinstance(cfg, VLLMModel):
        return cfg.model_dump_json(exclude={"temperature", "max_tokens", "price"})
    return str(id(cfg))


def in_flight(cfg: HFModel | OpenAIModel) -> int:
    """The calls a model sends at once (what holds a budget reservation)."""
    return cfg.max_in_flight if isinstance(cfg, OpenAIModel) else cfg.batch_size


def chat_models(cfgs: dict[str, HFModel | OpenAIModel], controls: Controls | None) -> dict[str, object]:
    if controls is None:
        return {role: ChatModel(cfgs[role], engine) for role, engine in make_engines(cfgs).items()}
    return controls.models(cfgs)


def start(cfg: GenerateConfig, spent_before_usd: float, split_limits: bool = False) -> Controls:
    """The run's limiter actors (one per endpoint of its online openai models) and, with budget_usd, its ledger."""
    controls = Controls()
    by_key: dict[tuple[str, str], object] = {}
    for role in STRATEGIES[cfg.strategy].roles:
        model = getattr(cfg, role)
        if not isinstance(model, OpenAIModel) or model.mode != "online":
            continue
        if model.limit_key not in by_key:
            rpm, tpm = _limits(cfg, model.limit_key)
            if split_limits:
                by_key[model.limit_key] = SplitLimit(rpm, tpm, max(m.actors for m in _models(cfg)))
            else:
                by_key[model.limit_key] = shared_limiter(rpm, tpm)
                controls.actors.append(by_key[model.limit_key].actor)
        controls.limiters[role] = by_key[model.limit_key]
    controls.endpoints = by_key
    if cfg.budget_usd is not None:
        controls.ledger = shared_ledger(cfg.budget_usd, spent_before_usd)
        controls.actors.append(controls.ledger.actor)
    return controls


def stop(controls: Controls) -> dict:
    """What the controls saw (the ledger's summary, each shared limiter's counts); their actors are ended."""
    import ray

    seen = {"budget": ray.get(controls.ledger.actor.summary.remote()) if controls.ledger is not None else None}
    limits = {f"{url} {model}": ray.get(limiter.actor.stats.remote())
              for (url, model), limiter in controls.endpoints.items() if not isinstance(limiter, SplitLimit)}
    if limits:
        seen["rate_limits"] = limits  # per endpoint: requests granted, 429 pauses, seconds paused and waited
    for actor in controls.actors:
        ray.kill(actor)
    return seen


def _models(cfg: GenerateConfig) -> list[HFModel | OpenAIModel]:
    return [m for role in STRATEGIES[cfg.strategy].roles if isinstance(m := getattr(cfg, role), (HFModel, OpenAIModel))]


def _limits(cfg: GenerateConfig, key: tuple[str, str]) -> tuple[int | None, int | None]:
    """The limits any model on this endpoint states (the config refuses two that disagree)."""
    models = [m for m in _models(cfg) if isinstance(m, OpenAIModel) and m.mode == "online" and m.limit_key == key]
    rpm = next((m.requests_per_minute for m in models if m.requests_per_minute), None)
    tpm = next((m.tokens_per_minute for m in models if m.tokens_per_minute), None)
    return rpm, tpm


def spend_summary(store, spent_before_usd: float, seen: dict) -> dict:
    """What an attempt records: its spend and the run's (from the rows' cost columns), the rows done, the
    budget, the shared rate limiters' counts."""
    rows = store.read_rows()
    total = run_spend(rows)
    summary = {"spent_usd": round(total - spent_before_usd, 6), "run_spent_usd": round(total, 6),
               "run_rows_done": sum(r["error"] is None for r in rows)}
    if "rate_limits" in seen:
        summary["rate_limits"] = seen["rate_limits"]
    budget = seen.get("budget")
    if budget is not None:
        summary["budget"] = {k: budget[k] for k in ("budget_usd", "stopped", "requests_started", "requests_refused")}
    return summary


def check_budget(cfg: GenerateConfig, attempt: dict) -> None:
    """BudgetReached when budget_usd stopped this attempt (its summary in the message)."""
    budget = attempt.get("budget")
    if budget and budget["stopped"]:
        raise BudgetReached(
            f"{cfg.output}: budget_usd {budget['budget_usd']:g} reached: the run has spent ${attempt['run_spent_usd']:.4f} "
            f"(${attempt['spent_usd']:.4f} in this attempt); {attempt['run_rows_done']} of {attempt['run_rows']} rows "
            f"done; {budget['requests_refused']} requests were not started, and their rows are written as unfinished: "
            "run again with a higher budget_usd to finish them")


def within_budget(gen: GenerateConfig, budget_usd: float | None, outputs: list[str]) -> GenerateConfig:
    """A pipeline's run with the pipeline's budget less what its other runs (`outputs`) have spent."""
    if budget_usd is None:
        return gen
    others = sum(run_spend(RunStore(o).read_rows()) for o in outputs if o != gen.output and RunStore(o).has_rows())
    return gen.model_copy(update={"budget_usd": budget_usd - others})
