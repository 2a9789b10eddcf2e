"""Each benchmark runs at its tiny size and writes a well-formed result (no thresholds: benchmarks measure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "benchmarks" / "results" / "smoke"
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the tests'


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["teacher_http", "hf_batch"])
def test_benchmark_smoke(name):
    (SMOKE / f"{name}.json").unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", name, "--size", "tiny"],
                   cwd=ROOT, check=True, timeout=540, env=ENV)
    result = json.loads((SMOKE / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["size"] == "tiny"
    assert result["machine"]["cpu_cores"] > 0 and "ray" in result["machine"]["versions"]
    rates = result.get("rows_per_s") or result.get("tokens_per_s")
    assert rates and all(v > 0 for v in rates.values())
    if name == "teacher_http":
        assert result["errors"] == 0
        assert result["speedup_vs_sequential"] == pytest.approx(
            result["rows_per_s"]["ray_data_two_stage"] / result["rows_per_s"]["sequential_openai_loop"], rel=0.01)

