"""Teacher generation over HTTP: a Ray Data two_stage run against a sequential `openai` loop and the ideal.

A local OpenAI-compatible server with a fixed per-request latency and ample capacity stands in
for a hosted API (dnc_ray.llm.stub_server, in its own process). Every figure is measured in one run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import openai
import psutil

from benchmarks.common import start_stub
from benchmarks.report import bar_plot, table
from dnc_ray.config import GenerateConfig, TaskConfig
from dnc_ray.infra.cluster import init_ray
from dnc_ray.prompts import decompose_messages, solve_messages
from dnc_ray.stages.generate import run_generate
from dnc_ray.tasks import load_rows

LATENCY_S = 0.2
# in_flight: requests in flight in all, split evenly over the two stages' actors (decompose, solve).
SIZES = {"tiny": {"rows": 192, "short_rows": 16, "sequential_rows": 4, "in_flight": 16},
         "full": {"rows": 4096, "short_rows": 512, "sequential_rows": 25, "in_flight": 64}}


def sequential_requests_per_s(base_url: str, rows: list[dict]) -> float:
    """How the paper's research code calls the API: one request after another, two per row."""
    client = openai.OpenAI(base_url=base_url, api_key="none")
    started = time.perf_counter()
    for row in rows:
        for messages in (decompose_messages(row["question"], None), solve_messages(row["question"], None, [])):
            client.chat.completions.create(model="stub-teacher", messages=messages, max_tokens=128)
    return 2 * len(rows) / (time.perf_counter() - started)


def ray_run(base_url: str, n_rows: int, in_flight_per_stage: int) -> tuple[float, int, float]:
    """Seconds of a two_stage run (Ray Data start-up included), its error count and the cores' busy share."""
    teacher = {"engine": "openai", "model": "stub-teacher", "base_url": base_url, "api_key_env": None,
               "max_in_flight": in_flight_per_stage, "batch_size": 4 * in_flight_per_stage, "max_tokens": 128}
    with tempfile.TemporaryDirectory() as out:
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": n_rows}, "strategy": "two_stage",
            "output": out, "decomposer": teacher, "solver": teacher, "progress_interval_s": 30})
        init_ray(cfg.ray)
        psutil.cpu_percent()  # starts the count: the next call gives the busy share since this one
        started = time.perf_counter()
        attempt = run_generate(cfg)
        return time.perf_counter() - started, attempt["errors"], psutil.cpu_percent() / 100


def run(size: str) -> dict:
    p = SIZES[size]
    server, base_url = start_stub(LATENCY_S)
    try:
        rows = load_rows(TaskConfig(name="gsm8k", split="train", limit=p["sequential_rows"]))
        sequential = sequential_requests_per_s(base_url, rows)
        # A short run first: the difference of the two is the steady rate, start-up and drain taken out.
        short_s, short_errors, _ = ray_run(base_url, p["short_rows"], p["in_flight"] // 2)
        long_s, errors, busy = ray_run(base_url, p["rows"], p["in_flight"] // 2)
    finally:
        server.kill()
    end_to_end = 2 * p["rows"] / long_s
    # None where start-up noise outweighs the extra rows (the long run no longer than the short one)
    steady = 2 * (p["rows"] - p["short_rows"]) / (long_s - short_s) if long_s > short_s else None
    ideal = p["in_flight"] / LATENCY_S  # every request slot busy all the time
    return {
        "params": {"latency_s": LATENCY_S, **p, "requests_per_row": 2, "actors_per_stage": 1},
        "requests_per_s": {"sequential_openai_loop": sequential, "ray_data_two_stage": end_to_end,
                           "ray_data_two_stage_steady": steady, "ideal": ideal},
        "seconds": {"short_run": short_s, "run": long_s},
        "speedup_vs_sequential": round(end_to_end / sequential, 1),
        "share_of_ideal": round(end_to_end / ideal, 3),
        "steady_speedup_vs_sequential": steady and round(steady / sequential, 1),
        "steady_share_of_ideal": steady and round(steady / ideal, 3),
        "cpu_busy_share_during_run": busy,
        "errors": errors + short_errors,
    }


def render(result: dict, folder: Path) -> str:
    rates = {name: rate for name, rate in result["requests_per_s"].items() if rate is not None}
    rows = [{"what": name, "requests/s": round(rate, 2), "rows/s": round(rate / 2, 2)} for name, rate in rates.items()]
    steady = (f"{result['steady_speedup_vs_sequential']}x the sequential loop and {result['steady_share_of_ideal']:.1%} "
              "of the ideal" if result["steady_share_of_ideal"] is not None else "not measurable at this size")
    return "\n\n".join([
        table(rows, ["what", "requests/s", "rows/s"]),
        f"Ratios (same run): end to end (Ray Data start-up included), {result['speedup_vs_sequential']}x the "
        f"sequential loop and {result['share_of_ideal']:.1%} of the ideal ({result['params']['in_flight']} requests in flight / "
        f"{result['params']['latency_s']} s); steady ({result['params']['rows']} rows less a "
        f"{result['params']['short_rows']}-row run, over the time difference: a few % of noise either way), "
        f"{steady}. The cores were {result['cpu_busy_share_during_run']:.0%} busy during "
        f"the Ray Data run (stand-in server, client and Ray on the same {result['machine']['cpu_cores']} cores); "
        f"errors: {result['errors']}.",
        bar_plot(folder, "teacher_http", rates, "requests / s"),
    ])
