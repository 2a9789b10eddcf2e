"""What every benchmark result carries (the machine, the date), where results go, and the stand-in API server."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import openai

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "ray", "transformers", "deepspeed", "openai")},
    }


def save(name: str, size: str, result: dict) -> Path:
    """Write results/<name>.json (tiny-size runs go to results/smoke/, never over real results)."""
    folder = RESULTS if size == "full" else RESULTS / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "size": size,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **result,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stub(latency_s: float, reply: str = "fixed") -> tuple[subprocess.Popen, str]:
    """The stand-in OpenAI-compatible server in its own process, once it answers.

    `reply`: "fixed" answers every prompt "The answer is: 42"; "self-ask" also follows the self-ask
    protocol (dnc_ray.testing.stub_server.self_ask_reply)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dnc_ray.testing.stub_server", "--port", str(port),
                               "--latency-s", str(latency_s), "--reply", reply], stdout=subprocess.DEVNULL)
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
