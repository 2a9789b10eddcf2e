"""Teacher generation over HTTP: a Ray Data two_stage run against a sequential `openai` loop and the ideal.

A local OpenAI-compatible server with a fixed per-request latency and ample capacity stands in
for a hosted API (dnc_ray.llm.stub_server, in its own process). Every figure is measured in one run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import openai

from dnc_ray.config import GenerateConfig, TaskConfig
from dnc_ray.prompts import decompose_messages, solve_messages
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.runtime import init_ray
from dnc_ray.tasks import load_rows

LATENCY_S = 0.2
SIZES = {"tiny": {"rows": 64, "sequential_rows": 4, "in_flight": 16},
         "full": {"rows": 2048, "sequential_rows": 25, "in_flight": 64}}


def start_stub(latency_s: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dnc_ray.llm.stub_server", "--port", str(port),
                               "--latency-s", str(latency_s)], stdout=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    for _ in range(100):
        try:
            client.models.list()
            return server, base_url
        except openai.APIConnectionError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("stub server did not start")


def sequential_rows_per_s(base_url: str, rows: list[dict]) -> float:
    """How the paper's research code calls the API: one request after another, two per row."""
    client = openai.OpenAI(base_url=base_url, api_key="none")
    started = time.perf_counter()
    for row in rows:
        for messages in (decompose_messages(row["question"], None), solve_messages(row["question"], None, [])):
            client.chat.completions.create(model="stub-teacher", messages=messages, max_tokens=128)
    return len(rows) / (time.perf_counter() - started)


def ray_rows_per_s(base_url: str, n_rows: int, in_flight: int) -> tuple[float, int]:
    teacher = {"engine": "openai", "model": "stub-teacher", "base_url": base_url, "api_key_env": None,
               "max_in_flight": in_flight, "batch_size": 4 * in_flight, "max_tokens": 128}
    with tempfile.TemporaryDirectory() as out:
        cfg = GenerateConfig.model_validate({
            "task": {"name": "gsm8k", "split": "train", "limit": n_rows}, "strategy": "two_stage",
            "output": out, "decomposer": teacher, "solver": teacher, "progress_interval_s": 30})
        init_ray(cfg.ray)
        started = time.perf_counter()
        attempt = run_generate(cfg)
        return n_rows / (time.perf_counter() - started), attempt["errors"]


def run(size: str) -> dict:
    p = SIZES[size]
    server, base_url = start_stub(LATENCY_S)
    try:
        rows = load_rows(TaskConfig(name="gsm8k", split="train", limit=p["sequential_rows"]))
        sequential = sequential_rows_per_s(base_url, rows)
        ray_rate, errors = ray_rows_per_s(base_url, p["rows"], p["in_flight"])
    finally:
        server.kill()
    ideal = p["in_flight"] / LATENCY_S  # both stages keep `in_flight` requests busy, overlapped
    return {
        "params": {"latency_s": LATENCY_S, **p, "requests_per_row": 2, "actors_per_stage": 1},
        "rows_per_s": {"sequential_openai_loop": round(sequential, 2), "ray_data_two_stage": round(ray_rate, 2),
                       "ideal": ideal},
        "speedup_vs_sequential": round(ray_rate / sequential, 1),
        "share_of_ideal": round(ray_rate / ideal, 3),
        "errors": errors,
    }
