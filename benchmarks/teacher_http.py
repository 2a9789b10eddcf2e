"""Teacher generation over HTTP: Ray Data runs of two_stage and self_ask against a sequential loop, a plain
asyncio client and the ideal.

A local OpenAI-compatible server with a fixed per-request latency and ample capacity stands in
for a hosted API (dnc_ray.testing.stub_server in its own process, its self-ask script on: every self_ask
row asks SELF_ASK_FOLLOW_UPS follow-ups). Every runtime here runs the method (`dnc_ray.method`): the
benchmark builds no prompt and reads no answer, but for the plain client (what a user could write instead of
`dnc generate`), which sends the method's prompts itself. Every figure is measured in one run, on one server.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import openai
import psutil

from benchmarks.common import start_stub
from benchmarks.report import bar_plot, table
from dnc_ray.config import GenerateConfig
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.chat_model import ChatModel
from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.prompts import decompose_messages, parse_subquestions, solve_messages
from dnc_ray.method.row import new_row
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from dnc_ray.tasks import TASKS, TaskConfig, load_rows
from dnc_ray.testing.stub_server import SELF_ASK_FOLLOW_UPS

LATENCY_S = 0.2
# Requests per row: two_stage decomposes and solves; self_ask's decomposer takes one turn per follow-up
# and one for the final answer, the solver answers each follow-up.
REQUESTS_PER_ROW = {"two_stage": 2, "self_ask": 2 * SELF_ASK_FOLLOW_UPS + 1}
# in_flight: requests in flight in all, split evenly over the two models (decomposer, solver) of the
# one MethodStage actor. The self_ask runs have about as many requests as the two_stage ones.
SIZES = {"tiny": {"rows": 96, "short_rows": 16, "self_ask_rows": 40, "self_ask_short_rows": 8,
                  "sequential_rows": 4, "in_flight": 16},
         "full": {"rows": 4096, "short_rows": 512, "self_ask_rows": 1640, "self_ask_short_rows": 205,
                  "sequential_rows": 25, "in_flight": 64}}
MAX_TOKENS = 128


def teacher(base_url: str, max_in_flight: int) -> dict:
    return {"engine": "openai", "model": "stub-teacher", "base_url": base_url, "api_key_env": None,
            "max_in_flight": max_in_flight, "batch_size": 4 * max_in_flight, "max_tokens": MAX_TOKENS}


def calls(row: dict) -> int:
    """The model requests a row took, from its usage columns."""
    return sum(used["calls"] for used in row["usage"].values() if used is not None)


def sequential_requests_per_s(base_url: str, rows: list[dict]) -> float:
    """How the paper's research code calls the API: one request after another. Here the method's
    two_stage, one row at a time, over one engine with one request in flight."""
    cfg = OpenAIModel.model_validate(teacher(base_url, 1))
    engine = OpenAIEngine(cfg)
    model = ChatModel(cfg, engine)
    models = {"decomposer": model, "solver": model}
    options = MethodOptions(rules=TASKS["gsm8k"].rules)

    async def row_after_row() -> float:
        requests, started = 0, time.perf_counter()
        for loaded in rows:
            row = await run_row(STRATEGIES["two_stage"], new_row(loaded), models, options)
            if row["error"] is not None:
                raise RuntimeError(f"sequential loop: {row['error']}")  # a failed row is not a measurement
            requests += calls(row)
        elapsed = time.perf_counter() - started
        await engine.aclose()
        return requests / elapsed

    return asyncio.run(row_after_row())


def plain_client_run(base_url: str, rows: list[dict], in_flight: int, warm_up_rows: int) -> dict:
    """What a user could write instead of `dnc generate`: asyncio and one `openai.AsyncOpenAI`, per row a
    decompose request (the method's prompt), then a solve request with the sub-questions it parsed, the model and
    max_tokens of the Ray runs. One `asyncio.Semaphore(in_flight)` over requests holds `in_flight` requests in
    flight in all, as the Ray runs do (theirs split over decomposer and solver). The stand-in answers in fixed
    time whatever the prompt. Its seconds and requests over `rows`, after an untimed run of `warm_up_rows`."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    slots = asyncio.Semaphore(in_flight)
    cap = TASKS["gsm8k"].rules.max_subquestions
    sent = 0

    async def complete(messages: list[dict]) -> str:
        nonlocal sent
        async with slots:
            reply = await client.chat.completions.create(model="stub-teacher", messages=messages,
                                                         max_tokens=MAX_TOKENS, temperature=0.0)
        sent += 1
        return reply.choices[0].message.content or ""

    async def two_stage(row: dict) -> None:
        decomposition = await complete(decompose_messages(row["question"], row["context"], cap))
        await complete(solve_messages(row["question"], row["context"], parse_subquestions(decomposition)))

    async def timed() -> dict:
        nonlocal sent
        await asyncio.gather(*(two_stage(row) for row in rows[:warm_up_rows]))
        sent, started = 0, time.perf_counter()
        await asyncio.gather(*(two_stage(row) for row in rows))  # a failed request raises: not a measurement
        seconds = time.perf_counter() - started
        await client.close()
        return {"seconds": seconds, "requests": sent}

    return asyncio.run(timed())


def ray_run(base_url: str, strategy: str, n_rows: int, in_flight_per_model: int) -> dict:
    """One Ray Data run of `strategy` (actor start-up included): its seconds, requests, errors and the cores' busy share."""
    model = teacher(base_url, in_flight_per_model)
    with tempfile.TemporaryDirectory() as out:
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": n_rows}, "strategy": strategy,
            "output": out, "decomposer": model, "solver": model, "progress_interval_s": 30})
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
        psutil.cpu_percent()  # starts the count: the next call gives the busy share since this one
        started = time.perf_counter()
        attempt = run_generate(cfg)
        seconds, busy = time.perf_counter() - started, psutil.cpu_percent() / 100
        requests = sum(calls(row) for row in RunStore(out).read_rows())
    return {"seconds": seconds, "requests": requests, "errors": attempt["errors"], "busy": busy}


def steady_rate(short: dict, long: dict) -> float | None:
    """Requests/s of the long run less the short one (start-up and drain taken out); None where start-up
    noise outweighs the extra rows (the long run no longer than the short one)."""
    extra_s = long["seconds"] - short["seconds"]
    return (long["requests"] - short["requests"]) / extra_s if extra_s > 0 else None


def share(rate: float | None, ideal: float) -> float | None:
    return None if rate is None else round(rate / ideal, 3)


def run(size: str) -> dict:
    p = SIZES[size]
    per_model = p["in_flight"] // 2
    server, base_url = start_stub(LATENCY_S, reply="self-ask")
    try:
        rows = load_rows(TaskConfig(name="gsm8k", split="train", limit=p["sequential_rows"]))
        sequential = sequential_requests_per_s(base_url, rows)
        plain = plain_client_run(base_url, load_rows(TaskConfig(name="gsm8k", split="train", limit=p["rows"])),
                                 p["in_flight"], p["short_rows"])
        # Untimed: the first Ray Data run of the process also starts Ray's worker processes (seconds of
        # cold start that would land on whichever run came first).
        warm_up = ray_run(base_url, "two_stage", p["short_rows"], per_model)
        # Per strategy a short run and a long one: the difference of the two is the steady rate.
        short = ray_run(base_url, "two_stage", p["short_rows"], per_model)
        long = ray_run(base_url, "two_stage", p["rows"], per_model)
        sa_short = ray_run(base_url, "self_ask", p["self_ask_short_rows"], per_model)
        sa_long = ray_run(base_url, "self_ask", p["self_ask_rows"], per_model)
    finally:
        server.kill()
    end_to_end, steady = long["requests"] / long["seconds"], steady_rate(short, long)
    plain_rate = plain["requests"] / plain["seconds"]
    sa_end_to_end, sa_steady = sa_long["requests"] / sa_long["seconds"], steady_rate(sa_short, sa_long)
    ideal = p["in_flight"] / LATENCY_S  # every request slot busy all the time
    # self_ask sends follow_ups + 1 requests to the decomposer and follow_ups to the solver, each model
    # holding half the slots: the decomposer's half caps the rate below the ideal
    decomposer_calls = SELF_ASK_FOLLOW_UPS + 1
    sa_bound = REQUESTS_PER_ROW["self_ask"] / (2 * decomposer_calls)
    return {
        "params": {"latency_s": LATENCY_S, **p, "requests_per_row": REQUESTS_PER_ROW["two_stage"],
                   "self_ask_follow_ups": SELF_ASK_FOLLOW_UPS, "self_ask_requests_per_row": REQUESTS_PER_ROW["self_ask"],
                   "method_actors": 1, "in_flight_per_model": per_model},
        "requests_per_s": {"sequential_openai_loop": sequential, "plain_async_client": plain_rate,
                           "ray_data_two_stage": end_to_end,
                           "ray_data_two_stage_steady": steady, "ray_data_self_ask": sa_end_to_end,
                           "ray_data_self_ask_steady": sa_steady, "ideal": ideal},
        "seconds": {"plain_async_client": plain["seconds"], "warm_up_run": warm_up["seconds"],
                    "short_run": short["seconds"], "run": long["seconds"],
                    "self_ask_short_run": sa_short["seconds"], "self_ask_run": sa_long["seconds"]},
        "requests": {"plain_async_client": plain["requests"], "short_run": short["requests"], "run": long["requests"],
                     "self_ask_short_run": sa_short["requests"], "self_ask_run": sa_long["requests"]},
        "speedup_vs_sequential": round(end_to_end / sequential, 1),
        "share_of_ideal": share(end_to_end, ideal),
        "steady_speedup_vs_sequential": steady and round(steady / sequential, 1),
        "steady_share_of_ideal": share(steady, ideal),
        "plain_client_share_of_ideal": share(plain_rate, ideal),
        "two_stage_vs_plain_client": round(end_to_end / plain_rate, 3),
        "steady_two_stage_vs_plain_client": steady and round(steady / plain_rate, 3),
        "self_ask_share_of_ideal": share(sa_end_to_end, ideal),
        "self_ask_steady_share_of_ideal": share(sa_steady, ideal),
        "self_ask_bound_share_of_ideal": round(sa_bound, 3),
        "cpu_busy_share_during_run": long["busy"],
        "cpu_busy_share_during_self_ask_run": sa_long["busy"],
        "errors": long["errors"] + short["errors"] + warm_up["errors"],
        "self_ask_errors": sa_long["errors"] + sa_short["errors"],
    }


def render(result: dict, folder: Path) -> str:
    p = result["params"]
    rates = {name: rate for name, rate in result["requests_per_s"].items() if rate is not None}
    per_row = {"sequential_openai_loop": p["requests_per_row"], "plain_async_client": p["requests_per_row"],
               "ray_data_two_stage": p["requests_per_row"],
               "ray_data_two_stage_steady": p["requests_per_row"], "ray_data_self_ask": p["self_ask_requests_per_row"],
               "ray_data_self_ask_steady": p["self_ask_requests_per_row"]}
    ideal = result["requests_per_s"]["ideal"]
    rows = [{"what": name, "requests/s": round(rate, 2),
             "rows/s": round(rate / per_row[name], 2) if name in per_row else None,
             "share of ideal": f"{rate / ideal:.1%}"} for name, rate in rates.items()]

    def steady(speedup: str | None, share_key: str) -> str:
        if result[share_key] is None:
            return "not measurable at this size"
        return (f"{result[speedup]}x the sequential loop and " if speedup else "") + f"{result[share_key]:.1%} of the ideal"

    return "\n\n".join([
        table(rows, ["what", "requests/s", "rows/s", "share of ideal"]),
        f"Ratios (same run, same stand-in server): **two_stage** ({p['requests_per_row']} requests per row) end to end "
        f"(the dataset's and its actor's start-up included; an untimed {p['short_rows']}-row run first started "
        f"Ray's workers), {result['speedup_vs_sequential']}x the sequential loop and "
        f"{result['share_of_ideal']:.1%} of the ideal ({p['in_flight']} requests in flight / {p['latency_s']} s); "
        f"steady (the {p['rows']}-row run less the {p['short_rows']}-row one, over the time difference: a few % of "
        f"noise either way), {steady('steady_speedup_vs_sequential', 'steady_share_of_ideal')}.",
        plain_client_sentence(result),
        f"**self_ask** ({p['self_ask_follow_ups']} follow-ups: {p['self_ask_requests_per_row']} requests per row, "
        f"{p['self_ask_follow_ups'] + 1} to the decomposer and {p['self_ask_follow_ups']} to the solver, each row's "
        f"requests one after another) end to end {result['self_ask_share_of_ideal']:.1%} of the same ideal; steady "
        f"(the {p['self_ask_rows']}-row run less the {p['self_ask_short_rows']}-row one) "
        f"{steady(None, 'self_ask_steady_share_of_ideal')}. With the slots split evenly over the two models "
        f"({p['in_flight_per_model']} each), the decomposer's share of the requests caps self_ask at "
        f"{result['self_ask_bound_share_of_ideal']:.1%} of the ideal.",
        f"The sequential loop runs the method's two_stage row after row over one engine with one request in "
        f"flight. The cores were {result['cpu_busy_share_during_run']:.0%} busy during the two_stage run and "
        f"{result['cpu_busy_share_during_self_ask_run']:.0%} during the self_ask run (stand-in server, client and "
        f"Ray on the same {result['machine']['cpu_cores']} cores); errors: two_stage {result['errors']}, "
        f"self_ask {result['self_ask_errors']}.",
        bar_plot(folder, "teacher_http", {_label(name): rate for name, rate in rates.items()}, "requests / s"),
    ])


def plain_client_sentence(result: dict) -> str:
    p = result["params"]
    if "two_stage_vs_plain_client" not in result:
        return "The plain asyncio client was not measured in this result (it predates that anchor)."
    return (f"Against the **plain asyncio client** (one `openai.AsyncOpenAI`, the method's prompts, per row a decompose "
            f"request then a solve request, {p['in_flight']} requests in flight under one semaphore, the same "
            f"{p['rows']} rows; {result['plain_client_share_of_ideal']:.1%} of the ideal): two_stage end to end "
            f"{result['two_stage_vs_plain_client']}x its requests/s, steady "
            f"{_ratio(result['steady_two_stage_vs_plain_client'])}.")


def _ratio(ratio: float | None) -> str:
    return "not measurable at this size" if ratio is None else f"{ratio}x"


def _label(name: str) -> str:
    """A short bar label: ray_data_self_ask_steady -> self_ask steady."""
    return name.removeprefix("ray_data_").removesuffix("_openai_loop").replace("_steady", " steady")
