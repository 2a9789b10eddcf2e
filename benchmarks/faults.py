"""Work wasted under faults (issue 12): three measurements against the stand-in server, no GPU, no network.

    python -m benchmarks.faults retries   # requests per prompt under a fault mix (engine level, 800 prompts)
    python -m benchmarks.faults kill      # share of the requests made before a driver is killed that are made again
    python -m benchmarks.faults down      # seconds to failure with the upstream down (one request; a generate run)

Standalone (not part of `benchmarks.run`): it measures the resilience of the code it runs, so it is
run once on the code before a change and once after (PYTHONPATH pointing at each checkout), and
prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.testing.stub_server import GARBAGE, StubServer

MIX = {"429": 0.20, "500": 0.05}  # the mix
MIX_GARBAGE = {**MIX, GARBAGE: 0.05}  # plus 200 replies without choices


def _print(result: dict) -> None:
    print(json.dumps(result), flush=True)


def retries(prompts: int = 800, seed: int = 0) -> None:
    """Each request fails with the mix's probabilities (independently, seeded): requests per prompt, failed prompts."""
    for name, mix in (("429 20% / 500 5%", MIX), ("429 20% / 500 5% / garbage 5%", MIX_GARBAGE)):
        rng = random.Random(seed)

        def fail(index: int, messages: list[dict]):
            draw = rng.random()
            for outcome, p in mix.items():
                if draw < p:
                    return int(outcome) if outcome.isdigit() else outcome
                draw -= p
            return None

        with StubServer(fail=fail) as server:
            engine = OpenAIEngine(OpenAIModel(engine="openai", model="stub-teacher", base_url=server.base_url,
                                              api_key_env=None, max_in_flight=64, max_retries=5))

            async def go():
                try:
                    return await engine.agenerate([[{"role": "user", "content": f"q {i}"}] for i in range(prompts)],
                                                  SamplingParams(max_tokens=8))
                finally:
                    await engine.aclose()

            start = time.monotonic()
            out = asyncio.run(go())
            _print({"measure": "retries", "mix": name, "prompts": prompts, "requests": len(server.requests),
                    "requests_per_prompt": round(len(server.requests) / prompts, 3),
                    "failed_prompts": sum(c.error is not None for c in out),
                    "seconds": round(time.monotonic() - start, 1)})


def _settled(server: StubServer, quiet_s: float = 3.0) -> int:
    count = -1
    while count != len(server.requests):
        count = len(server.requests)
        time.sleep(quiet_s)
    return count


def kill(rows: int = 128, at: float = 0.5, batch_size: int = 16, max_in_flight: int = 8, latency_s: float = 0.2) -> None:
    """two_stage over `rows` GSM8K questions (2 requests a row); the driver is SIGKILLed once the server has seen
    `at` of the requests, then the same config re-run: redone = before + after - 2 * rows."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    try:
        with StubServer(latency_s=latency_s) as server, tempfile.TemporaryDirectory() as tmp:
            teacher = {"engine": "openai", "model": "stub-teacher", "base_url": server.base_url, "api_key_env": None,
                       "batch_size": batch_size, "max_in_flight": max_in_flight, "max_retries": 0}
            cfg = {"task": {"name": "gsm8k", "split": "test", "limit": rows}, "strategy": "two_stage",
                   "output": f"{tmp}/run", "decomposer": teacher, "solver": teacher, "ray": {"address": address}}
            path = Path(tmp) / "cfg.yaml"
            path.write_text(yaml.safe_dump(cfg))
            command = [sys.executable, "-m", "dnc_ray.cli", "generate", "--config", str(path)]
            driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 300
            while len(server.requests) < at * 2 * rows and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_at_kill = len(server.requests)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            before = _settled(server)
            rerun = subprocess.run(command, capture_output=True, text=True)
            after = len(server.requests) - before
            redone = before + after - 2 * rows
            _print({"measure": "kill", "rows": rows, "requests_needed": 2 * rows, "batch_size": batch_size,
                    "max_in_flight": max_in_flight, "requests_at_kill": seen_at_kill, "requests_before": before,
                    "requests_after": after, "redone": redone, "redone_share_of_before": round(redone / before, 3),
                    "rerun_rc": rerun.returncode})
    finally:
        ray.shutdown()


def down(rows: int = 64) -> None:
    """Nothing listens at the endpoint: one request with the default settings, then a `dnc generate` direct run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    engine = OpenAIEngine(OpenAIModel(engine="openai", model="m", base_url=base_url, api_key_env=None))

    async def one():
        try:
            return await engine.agenerate([[{"role": "user", "content": "anyone?"}]], SamplingParams(max_tokens=8))
        finally:
            await engine.aclose()

    start = time.monotonic()
    [completion] = asyncio.run(one())
    _print({"measure": "down", "what": "one request, default settings", "seconds": round(time.monotonic() - start, 2),
            "error": completion.error[:60]})

    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    try:
        with tempfile.TemporaryDirectory() as tmp:
            solver = {"engine": "openai", "model": "m", "base_url": base_url, "api_key_env": None}
            cfg = {"task": {"name": "gsm8k", "split": "test", "limit": rows}, "strategy": "direct",
                   "output": f"{tmp}/run", "solver": solver, "ray": {"address": address}}
            path = Path(tmp) / "cfg.yaml"
            path.write_text(yaml.safe_dump(cfg))
            command = [sys.executable, "-m", "dnc_ray.cli", "generate", "--config", str(path)]
            subprocess.run(command, capture_output=True)  # warm-up: the first driver on a fresh Ray starts its workers
            (Path(tmp) / "run").rename(Path(tmp) / "warm")
            start = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True)
            elapsed = time.monotonic() - start
            line = next((ln for ln in result.stdout.splitlines() if "elapsed" in ln or "finished" in ln), "")
            _print({"measure": "down", "what": f"dnc generate direct, {rows} rows, default settings",
                    "seconds": round(elapsed, 1), "rc": result.returncode, "last_progress": line[-120:]})
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=["retries", "kill", "down"])
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    {"retries": retries, "kill": kill, "down": down}[args.measure]()


if __name__ == "__main__":
    main()
