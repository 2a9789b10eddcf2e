"""Each benchmark runs at its tiny size and writes a well-formed result and README section (no
thresholds: benchmarks measure, tests check that what they write is whole and consistent)."""

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


def check_teacher_http(result: dict) -> None:
    rates, p, seconds = result["requests_per_s"], result["params"], result["seconds"]
    assert result["errors"] == 0
    assert all(rates[k] > 0 for k in ("sequential_openai_loop", "ray_data_two_stage", "ideal"))
    assert rates["ideal"] == p["in_flight"] / p["latency_s"]
    assert rates["ray_data_two_stage"] == pytest.approx(2 * p["rows"] / seconds["run"])
    extra_s = seconds["run"] - seconds["short_run"]  # at the tiny size start-up noise may outweigh the extra rows
    if extra_s > 0:
        assert rates["ray_data_two_stage_steady"] == pytest.approx(2 * (p["rows"] - p["short_rows"]) / extra_s)
    else:
        assert rates["ray_data_two_stage_steady"] is None and result["steady_share_of_ideal"] is None
    assert result["speedup_vs_sequential"] == pytest.approx(rates["ray_data_two_stage"] / rates["sequential_openai_loop"], abs=0.05)
    assert 0 < result["cpu_busy_share_during_run"] <= 1
    # self_ask in the same run: every row takes its follow-ups' requests, against the same ideal
    assert result["self_ask_errors"] == 0
    assert p["self_ask_requests_per_row"] == 2 * p["self_ask_follow_ups"] + 1
    requests = result["requests"]
    assert requests["self_ask_run"] == p["self_ask_requests_per_row"] * p["self_ask_rows"]
    assert requests["self_ask_short_run"] == p["self_ask_requests_per_row"] * p["self_ask_short_rows"]
    assert rates["ray_data_self_ask"] > 0
    assert rates["ray_data_self_ask"] == pytest.approx(requests["self_ask_run"] / seconds["self_ask_run"])
    assert result["self_ask_share_of_ideal"] == pytest.approx(rates["ray_data_self_ask"] / rates["ideal"], abs=0.001)
    extra_s = seconds["self_ask_run"] - seconds["self_ask_short_run"]
    if extra_s > 0:
        steady = (requests["self_ask_run"] - requests["self_ask_short_run"]) / extra_s
        assert rates["ray_data_self_ask_steady"] == pytest.approx(steady) and rates["ray_data_self_ask_steady"] > 0
    else:
        assert rates["ray_data_self_ask_steady"] is None and result["self_ask_steady_share_of_ideal"] is None
    assert 0 < result["self_ask_bound_share_of_ideal"] < 1 and 0 < result["cpu_busy_share_during_self_ask_run"] <= 1


def check_hf_batch(result: dict) -> None:
    rates = result["tokens_per_s"]
    batches = result["params"]["batches"]
    assert set(rates) == {"one_by_one_generate"} | {f"{d}_batch_{b}" for d in ("float32", "bfloat16") for b in batches}
    assert all(v > 0 for v in rates.values())
    for b in batches:  # both dtypes measured in the same run
        assert result["bf16_vs_fp32"][f"batch_{b}"] == pytest.approx(
            rates[f"bfloat16_batch_{b}"] / rates[f"float32_batch_{b}"], abs=0.02)


def check_serving(result: dict) -> None:
    for mode in ("batch_on", "batch_off"):
        points = result["load"][mode]
        assert list(points) == ["1", "4"]  # the tiny size's concurrency levels
        for point in points.values():
            assert point["requests"] > 0 and point["requests_per_s"] > 0
            assert point["p50_s"] <= point["p95_s"] <= point["p99_s"]
    streamed = result["load"]["batch_on_streamed"]
    assert list(streamed) == ["1", "4"]
    for point in streamed.values():  # the first token comes before the end of the answer
        assert point["requests"] > 0 and 0 < point["ttft_p50_s"] <= point["ttft_p99_s"]
        assert point["ttft_p50_s"] <= point["p99_s"]
    for clients, o in result["overhead"].items():
        direct, graph = o["direct_engines"], o["served_graph"]
        assert direct["requests"] > 0 and graph["requests"] > 0
        # every request waits for two upstream calls of the stand-in's latency, through either path
        assert min(direct["p50_s"], graph["p50_s"]) >= 2 * result["params"]["upstream_latency_s"]
        assert o["added_p50_s"] == pytest.approx(graph["p50_s"] - direct["p50_s"], abs=0.002)


def check_training(result: dict) -> None:
    [run] = result["runs"]  # the tiny size: ZeRO-3 on 2 workers
    assert (run["zero_stage"], run["workers"]) == (3, 2)
    assert run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0.1
    assert result["tokens_per_s"] == {"zero3_2w": run["tokens_per_s"]} and result["speedup_2w_vs_1w"] == {}
    # the switches, each against the baseline run (the same settings, both off)
    switched = result["switch_runs"]
    assert list(switched) == ["baseline", "packing", "gradient_checkpointing"]
    assert [(r["packing"], r["gradient_checkpointing"]) for r in switched.values()] == [(False, False), (True, False), (False, True)]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0.1 for r in switched.values())
    assert switched["packing"]["padding_share"] == 0 < switched["baseline"]["padding_share"]  # decompositions differ in length
    packing, checkpointing = result["packing"], result["gradient_checkpointing"]
    assert packing["speedup"] == pytest.approx(switched["packing"]["tokens_per_s"] / switched["baseline"]["tokens_per_s"], abs=0.01)
    assert checkpointing["memory_ratio"] == pytest.approx(
        switched["gradient_checkpointing"]["peak_memory_gib"] / switched["baseline"]["peak_memory_gib"], abs=0.001)


def check_cost(result: dict) -> None:
    m = result["per_1000_questions"]
    assert list(m) == ["direct", "teacher/teacher", "student/teacher", "teacher/student-solver"]
    assert all(s["errors"] == 0 and s["solve_tokens"] > 0 and s["gsm8k_em"] is not None for s in m.values())
    assert m["direct"]["decompose_tokens"] == 0 and m["direct"]["decompose_usd"] == 0
    assert all(m[name]["decompose_tokens"] > 0 for name in list(m)[1:])
    # cost.yaml prices the student at 13/175 of the teacher: same tiny model, so same tokens, cheaper
    assert m["student/teacher"]["decompose_usd"] < m["teacher/teacher"]["decompose_usd"]
    assert result["paper_per_1000_questions"]["teacher/teacher"]["decompose_usd"] == pytest.approx(0.0986, abs=1e-4)


def check_rate_limits(result: dict) -> None:
    p, limits = result["params"], result["rate_limits"]
    assert list(limits) == ["off", "shared"]  # the tiny size's ways
    for m in limits.values():
        assert 0 < m["max_in_60s"] <= m["accepted"]
        assert 0 <= m["refused_share"] < 1 and m["share_of_limit"] > 0
    assert limits["shared"]["accepted"] == p["rows"] and limits["shared"]["rows_failed"] == 0  # no row lost to a 429
    online, batch = result["cost"]["online"], result["cost"]["batch"]
    assert online["tokens_per_question"] == batch["tokens_per_question"] and batch["rounds"] == 2  # two_stage
    assert result["batch_cost_share"] == pytest.approx(0.5, abs=0.01)  # the default batch price
    b = result["budget"]
    assert b["stopped"] and b["spent_usd"] <= b["budget_usd"] and b["rows_done_at_stop"] < b["rows"]
    assert b["rows_done_after_resume"] == b["rows"] and b["requests_redone"] == 0


CHECKS = {"teacher_http": check_teacher_http, "hf_batch": check_hf_batch, "serving": check_serving,
          "training": check_training, "cost": check_cost, "rate_limits": check_rate_limits}


@pytest.fixture(scope="module")
def smoke_readme() -> str:
    """All six benchmarks at the tiny size in one run (one interpreter, each its own local Ray)."""
    for old in SMOKE.glob("*"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--size", "tiny"], cwd=ROOT, check=True, timeout=1500, env=ENV)
    return (SMOKE / "README.md").read_text()


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("name", list(CHECKS))
def test_benchmark_smoke(smoke_readme, name):
    result = json.loads((SMOKE / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["size"] == "tiny"
    assert result["machine"]["cpu_cores"] > 0 and "ray" in result["machine"]["versions"]
    CHECKS[name](result)
    assert f"## {name}" in smoke_readme and (SMOKE / f"{name}.png").stat().st_size > 1000
