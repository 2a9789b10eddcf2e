"""What every benchmark result carries: the machine it ran on and when; where results are written."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib.metadata import version
from pathlib import Path

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
