"""Teacher cost controls: a shared rate limit against a per-actor split and no limiter; Batch API cost.

Rate limits: the stand-in server (dnc_ray.testing.stub_server, in its own process) allows 600 requests a minute,
enforced per second as OpenAI may quantize it (a bucket of 1 s' worth, 10 requests, refilled
continuously; 429 with Retry-After past it). A Ray Data `direct` run with 4 MethodStage actors (2 at the tiny size), each up
to 64 requests in flight (200 ms per request: 1280 requests/s of capacity, 128x the limit), runs three
ways:

    off     no requests_per_minute: every actor sends at will; 429s are retried after their
            Retry-After, which pauses the whole stage (the shared pause is on in every mode)
    split   requests_per_minute: 600 split per actor: each holds 150/min in its own bucket
    shared  requests_per_minute: 600 in one LimiterActor the 4 actors wait on (what `dnc generate` does)

with 16 rows per Ray Data batch (many batches, spread over the actors), and split and shared again at the
`openai` engine's default batch_size of 256 rows (a few batches, which Ray Data may hand to one actor:
up to 4 at once each; full size only).

Per way: requests the server accepted per second, from the first request to the last, as a share of the
limit (10/s); the share of requests refused with 429; the most accepted in any 60 s (the stand-in counts
per minute); rows failed; seconds.

Batch API: the same two_stage rows online (Ray Data) and with `mode: batch` (rounds of Batch API jobs,
the stand-in's batches complete after 2 s), at the same list price: $ per 1,000 questions from the rows'
cost columns (batch: half the price, OpenAI's discount), tokens, batches and rounds.

Budget: the online two_stage run again, 2 actors x 8 requests in flight, with budget_usd half of what
the whole run cost above: the spend when it stopped against the budget, the rows done; then the same
config with a budget 10x higher: the rows done, and the requests made again (0: none redone).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.common import free_port
from benchmarks.report import bar_plot, table
from dnc_ray.config import GenerateConfig
from dnc_ray.infra.errors import BudgetReached
from dnc_ray.stages import cost_controls
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from dnc_ray.testing.stub_server import StubServer

LIMIT_RPM = 600
LATENCY_S = 0.2
ACTORS = 4
PRICE = {"input_per_1k": 0.0005, "output_per_1k": 0.0015}  # gpt-3.5-turbo's list price, $ per 1K tokens
# tiny: 2 actors (each actor's start-up is most of a tiny run's time; 2 x 64 in flight still far exceeds the limit)
SIZES = {"tiny": {"rows": 30, "batch_rows": 16, "ways": ("off", "shared"), "actors": 2},
         "full": {"rows": 900, "batch_rows": 256, "ways": ("off", "split", "shared", "split_256", "shared_256"),
                  "actors": ACTORS}}


def _model(base_url: str, **extra) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": base_url, "api_key_env": None,
            "max_tokens": 64, "price": PRICE, **extra}


@contextmanager
def limited_stand_in():
    """The stand-in with the limit, in its own process (in this one it would share the GIL with the driver,
    and its own delays would bunch the arrivals it counts); yields its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dnc_ray.testing.stub_server", "--port", str(port), "--latency-s",
                               str(LATENCY_S), "--requests-per-minute", str(LIMIT_RPM), "--rate-window-s", "1"],
                              stdout=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base_url}/models").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the stand-in did not start") from None
                time.sleep(0.1)
        yield base_url
    finally:
        server.kill()
        server.wait()


def limited_run(way: str, rows: int, actors: int = ACTORS) -> dict:
    """One Ray Data run of `direct` over `rows` questions against the 600/min stand-in."""
    with limited_stand_in() as base_url, tempfile.TemporaryDirectory() as out:
        limits = {} if way == "off" else {"requests_per_minute": LIMIT_RPM}
        batch_size = 256 if way.endswith("_256") else 16
        model = _model(base_url, actors=actors, max_in_flight=64, batch_size=batch_size, max_retries=8, **limits)
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": rows}, "strategy": "direct", "output": out,
            "solver": model, "progress_interval_s": 30})
        start = cost_controls.start
        if way.startswith("split"):  # the alternative measured: each actor its own 1/ACTORS of the limit
            cost_controls.start = functools.partial(start, split_limits=True)
        try:
            started = time.perf_counter()
            attempt = run_generate(cfg)
            seconds = time.perf_counter() - started
        finally:
            cost_controls.start = start
        arrivals = httpx.get(base_url.removesuffix("/v1") + "/stub/arrivals").json()["arrivals"]
    accepted = [t for t, ok, _ in arrivals if ok]
    refused = len(arrivals) - len(accepted)
    span = accepted[-1] - arrivals[0][0]
    return {
        "accepted": len(accepted), "refused_429": refused, "refused_share": round(refused / len(arrivals), 4),
        # n requests from the first to the last span n - 1 intervals
        "accepted_per_s": round((len(accepted) - 1) / span, 3),
        "share_of_limit": round((len(accepted) - 1) / span / (LIMIT_RPM / 60), 3),
        "max_in_60s": _most_in(accepted, 60.0), "span_s": round(span, 2), "seconds": round(seconds, 2),
        "rows_failed": attempt["errors"], "pauses": sum(v["pauses"] for v in attempt.get("rate_limits", {}).values()),
    }


def _most_in(times: list[float], window_s: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def cost_run(mode: str, rows: int) -> dict:
    """two_stage over `rows` questions online or in batch mode: $ and tokens per 1,000 questions."""
    with StubServer(batch_delay_s=2.0, latency_s=0.05) as server, tempfile.TemporaryDirectory() as out:
        extra = {"mode": "batch", "batch_api": {"poll_s": 0.5}} if mode == "batch" else {"max_in_flight": 64}
        model = _model(server.base_url, **extra)
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": rows}, "strategy": "two_stage", "output": out,
            "decomposer": model, "solver": model, "progress_interval_s": 30})
        started = time.perf_counter()
        attempt = run_generate(cfg)
        seconds = time.perf_counter() - started
        stored = RunStore(out).read_rows()
        batches = len(server.batch_api.batches)
        rounds = len({b["round"] for b in json.loads((Path(out) / "run.json").read_text()).get("batches", [])})
    usage = [u for r in stored for u in r["usage"].values() if u]
    cost = sum(u["cost_usd"] for u in usage)
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    return {"usd_per_1k_questions": round(cost / len(stored) * 1000, 4), "tokens_per_question": round(tokens / len(stored), 1),
            "rows_failed": attempt["errors"], "batches": batches, "rounds": rounds, "seconds": round(seconds, 2)}


def budget_run(rows: int, budget_usd: float) -> dict:
    """two_stage over `rows` questions stopped by `budget_usd`, then resumed with 10x the budget."""
    with StubServer(latency_s=0.05) as server, tempfile.TemporaryDirectory() as out:
        model = _model(server.base_url, actors=2, max_in_flight=8, batch_size=16)
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": rows}, "strategy": "two_stage", "output": out,
            "decomposer": model, "solver": model, "budget_usd": budget_usd, "progress_interval_s": 30})
        try:
            run_generate(cfg)
            stopped = False
        except BudgetReached:
            stopped = True
        stored = RunStore(out).read_rows()
        spent, done = cost_controls.run_spend(stored), sum(r["error"] is None for r in stored)
        refused = json.loads((Path(out) / "run.json").read_text())["attempts"][-1]["budget"]["requests_refused"]
        run_generate(cfg.model_copy(update={"budget_usd": 10 * budget_usd}))
        resumed = RunStore(out).read_rows()
        requests = len(server.requests)
    return {"budget_usd": round(budget_usd, 6), "stopped": stopped, "spent_usd": round(spent, 6),
            "spent_share_of_budget": round(spent / budget_usd, 3), "rows": rows, "rows_done_at_stop": done,
            "requests_refused": refused, "rows_done_after_resume": sum(r["error"] is None for r in resumed),
            "requests": requests, "requests_redone": requests - 2 * rows}


def run(size: str) -> dict:
    p = SIZES[size]
    limits = {way: limited_run(way, p["rows"], p["actors"]) for way in p["ways"]}
    costs = {mode: cost_run(mode, p["batch_rows"]) for mode in ("online", "batch")}
    full_cost = costs["online"]["usd_per_1k_questions"] * p["batch_rows"] / 1000
    budget = budget_run(p["batch_rows"], full_cost / 2)
    return {
        "params": {"limit_rpm": LIMIT_RPM, "stand_in_burst_s": 1.0, "latency_s": LATENCY_S, "actors": p["actors"],
                   "max_in_flight_per_actor": 64, "rows": p["rows"], "batch_rows": p["batch_rows"], "price": PRICE},
        "rate_limits": limits,
        "cost": costs,
        "batch_cost_share": round(costs["batch"]["usd_per_1k_questions"] / costs["online"]["usd_per_1k_questions"], 3),
        "budget": budget,
    }


def render(result: dict, folder: Path) -> str:
    p, limits, costs, b = result["params"], result["rate_limits"], result["cost"], result["budget"]
    rows = [{"limiter": way.replace("_256", ", batch_size 256"), "share of the limit": f"{m['share_of_limit']:.1%}", "429 share": f"{m['refused_share']:.2%}",
             "429s": m["refused_429"], "most in 60 s": m["max_in_60s"], "rows failed": m["rows_failed"],
             "stage pauses": m["pauses"], "seconds": m["seconds"]} for way, m in limits.items()]
    cost_rows = [{"mode": mode, "$ / 1k questions": m["usd_per_1k_questions"], "tokens / question": m["tokens_per_question"],
                  "batches": m["batches"], "rounds": m["rounds"], "rows failed": m["rows_failed"], "seconds": m["seconds"]}
                 for mode, m in costs.items()]
    return "\n\n".join([
        f"A `direct` run of {p['rows']} GSM8K questions with {p['actors']} actors x {p['max_in_flight_per_actor']} "
        f"requests in flight against a stand-in allowing {p['limit_rpm']} requests/min ({p['limit_rpm'] // 60}/s, "
        f"a bucket of {p['stand_in_burst_s']:g} s' worth), {p['latency_s']} s per request, 16 rows per Ray Data batch "
        "unless stated (256: the engine's default). Share of the limit: "
        "requests accepted per second from the first request to the last, over the limit; 429 share: refused "
        "over all requests the stand-in saw.",
        table(rows, ["limiter", "share of the limit", "429 share", "429s", "most in 60 s", "rows failed",
                     "stage pauses", "seconds"]),
        f"Batch API: two_stage over {p['batch_rows']} questions at ${p['price']['input_per_1k']}/"
        f"${p['price']['output_per_1k']} per 1K tokens; the batch price is half (OpenAI's discount); the "
        f"stand-in's batches complete after 2 s. Batch / online $ per question: {result['batch_cost_share']:.2f}.",
        table(cost_rows, ["mode", "$ / 1k questions", "tokens / question", "batches", "rounds", "rows failed", "seconds"]),
        f"Budget: the online two_stage run with budget_usd {b['budget_usd']:g} (half its cost above), 2 actors x 8 "
        f"requests in flight: it stopped having spent ${b['spent_usd']:.4f} ({b['spent_share_of_budget']:.1%} of the "
        f"budget) with {b['rows_done_at_stop']} of {b['rows']} rows done and {b['requests_refused']} requests not "
        f"started; the same config with 10x the budget finished {b['rows_done_after_resume']} of {b['rows']} rows, "
        f"{b['requests']} requests in all ({b['requests_redone']} made twice).",
        bar_plot(folder, "rate_limits", {way: m["share_of_limit"] * 100 for way, m in limits.items()},
                 "% of the limit achieved"),
    ])
