"""Each benchmark runs at its tiny size and writes a well-formed result and README section (no
thresholds: benchmarks measure, tests check that what they write is whole and consistent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.testing.stub_server import SELF_ASK_FOLLOW_UPS

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "benchmarks" / "results" / "smoke"
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the tests'


def check_teacher_http(result: dict) -> None:
    """Requests counted from the rows' usage against the stand-in's script; rates within what the stand-in's
    latency allows (one request in flight: at most 1/latency; `in_flight` of them: at most in_flight/latency);
    the plain client's requests, rate and ratios consistent with each other."""
    rates, p, requests = result["requests_per_s"], result["params"], result["requests"]
    assert result["errors"] == 0 and result["self_ask_errors"] == 0
    assert (requests["short_run"], requests["run"]) == (2 * p["short_rows"], 2 * p["rows"])  # decompose + solve
    per_row = 2 * SELF_ASK_FOLLOW_UPS + 1  # the decomposer's turns (follow-ups + the answer) and the solver's answers
    assert (requests["self_ask_short_run"], requests["self_ask_run"]) == (
        per_row * p["self_ask_short_rows"], per_row * p["self_ask_rows"])
    bound = 1.02 * p["in_flight"] / p["latency_s"]
    assert 0 < rates["sequential_openai_loop"] <= 1.02 / p["latency_s"]
    assert rates["sequential_openai_loop"] < rates["ray_data_two_stage"] <= bound  # concurrency pays even at this size
    assert 0 < rates["ray_data_self_ask"] <= bound
    plain, steady = rates["plain_async_client"], rates["ray_data_two_stage_steady"]
    assert requests["plain_async_client"] == 2 * p["rows"] and result["seconds"]["plain_async_client"] > 0
    assert plain == requests["plain_async_client"] / result["seconds"]["plain_async_client"] and 0 < plain <= bound
    assert result["plain_client_share_of_ideal"] == round(plain / rates["ideal"], 3)
    assert result["two_stage_vs_plain_client"] == round(rates["ray_data_two_stage"] / plain, 3)
    assert result["steady_two_stage_vs_plain_client"] == (None if steady is None else round(steady / plain, 3))
    assert 0 < result["cpu_busy_share_during_run"] <= 1 and 0 < result["cpu_busy_share_during_self_ask_run"] <= 1


def check_hf_batch(result: dict) -> None:
    rates, p = result["tokens_per_s"], result["params"]
    batches = p["batches"]
    assert set(rates) == {"one_by_one_generate"} | {f"{d}_batch_{b}" for d in ("float32", "bfloat16") for b in batches}
    assert all(v > 0 for v in rates.values())
    same, total = result["bf16_same_greedy_outputs"].split(" ")[0].split("/")
    assert int(total) == p["prompts"] and 0 <= int(same) <= int(total)


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
    assert list(result["overhead"]) == ["1", "4"]
    for o in result["overhead"].values():
        paths = direct, graph, bare = o["direct_engines"], o["served_graph"], o["bare_serve"]
        assert all(path["requests"] > 0 and path["requests_per_s"] > 0 for path in paths)
        assert bare["p50_s"] <= bare["p95_s"] <= bare["p99_s"]
        # every request waits for two upstream calls of the stand-in's latency (bare Serve: two sleeps of it), by every path
        assert min(path["p50_s"] for path in paths) >= 2 * result["params"]["upstream_latency_s"]
        assert o["added_p50_s"] == round(graph["p50_s"] - direct["p50_s"], 3)
        assert o["graph_p50_vs_bare_serve"] == round(graph["p50_s"] / bare["p50_s"], 2)
        assert o["graph_rps_vs_bare_serve"] == round(graph["requests_per_s"] / bare["requests_per_s"], 2)


def check_training(result: dict) -> None:
    [run] = result["runs"]  # the tiny size: ZeRO-0 on 1 worker
    assert (run["zero_stage"], run["workers"]) == (0, 1)
    assert run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0.1
    assert result["tokens_per_s"] == {"zero0_1w": run["tokens_per_s"]} and result["speedup_2w_vs_1w"] == {}
    # the switches, each against the baseline run (the same settings, both off)
    switched = result["switch_runs"]
    assert list(switched) == ["baseline", "packing", "gradient_checkpointing"]
    assert [(r["packing"], r["gradient_checkpointing"]) for r in switched.values()] == [(False, False), (True, False), (False, True)]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0.1 for r in switched.values())
    assert switched["packing"]["padding_share"] == 0 < switched["baseline"]["padding_share"]  # decompositions differ in length
    # the dtype axis: the ZeRO run in the default dtype (auto, as this machine resolves it) and one run in the other,
    # at the same settings and steps; their first steps see the same rows from the same weights
    dtyped = result["dtype_runs"]
    assert list(dtyped) == ["float32", "bfloat16"] and all(r["dtype"] == name for name, r in dtyped.items())
    assert run["dtype"] == resolve_dtype("auto", "cpu", device_caps()) and dtyped[run["dtype"]] == run
    assert all(len(r["losses"]) == r["steps"] == run["steps"] and r["tokens_per_s"] > 0 for r in dtyped.values())
    assert dtyped["bfloat16"]["losses"][0] == pytest.approx(dtyped["float32"]["losses"][0], rel=0.01)


def check_cost(result: dict) -> None:
    m = result["per_1000_questions"]
    assert list(m) == ["direct", "teacher/teacher", "student/teacher", "teacher/student-solver"]
    assert all(s["errors"] == 0 and s["solve_tokens"] > 0 and s["gsm8k_em"] is not None for s in m.values())
    assert m["direct"]["decompose_tokens"] == 0 and m["direct"]["decompose_usd"] == 0
    assert all(m[name]["decompose_tokens"] > 0 for name in list(m)[1:])
    # the same tiny greedy model decomposes in both set-ups: the same tokens, each priced at its role's price
    teacher, student = m["teacher/teacher"], m["student/teacher"]
    assert student["decompose_tokens"] == teacher["decompose_tokens"]
    prices = {role: result["params"][role]["price"] for role in ("teacher", "student_decomposer")}
    price_ratio = prices["student_decomposer"]["input_per_1k"] / prices["teacher"]["input_per_1k"]
    assert prices["student_decomposer"]["output_per_1k"] / prices["teacher"]["output_per_1k"] == pytest.approx(price_ratio, rel=0.01)
    assert student["decompose_usd"] / teacher["decompose_usd"] == pytest.approx(price_ratio, rel=0.05)


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


def check_vllm_engine(result: dict) -> None:
    p, rates, ttft = result["params"], result["tokens_per_s"], result["ttft_p50_s"]
    levels = [str(c) for c in p["levels"]]
    assert levels == ["1", "4"]  # the tiny size's concurrency levels
    for engine in ("hf", "vllm"):
        assert list(rates[engine]) == levels and all(v > 0 for v in rates[engine].values())
        assert list(ttft[engine]) == levels and all(v > 0 for v in ttft[engine].values())
        assert result["load_s"][engine] > 0
        served = result["served"][engine]
        assert served["requests"] > 0 and served["requests_per_s"] > 0 and served["p50_s"] > 0
    assert result["vllm_vs_hf"] == {c: round(rates["vllm"][c] / rates["hf"][c], 2) for c in levels}
    same, total = result["same_greedy_outputs"].split(" ")[0].split("/")
    assert int(total) == p["prompts_per_level"][levels[-1]] == max(p["levels"][-1], 4) and 0 <= int(same) <= int(total)
    parsed = result["decompositions_parsed_pct"]
    assert set(parsed) == {"free", "structured"}
    assert all(0 <= v["parsed_1_to_3"] and 0 <= v["none"] and v["parsed_1_to_3"] + v["none"] <= 100 for v in parsed.values())


CHECKS = {"teacher_http": check_teacher_http, "hf_batch": check_hf_batch, "serving": check_serving,
          "training": check_training, "cost": check_cost, "rate_limits": check_rate_limits,
          "vllm_engine": check_vllm_engine}


@pytest.fixture(scope="module")
def smoke_readme() -> str:
    """All seven benchmarks at the tiny size in one run (one interpreter, each its own local Ray)."""
    for old in SMOKE.glob("*"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--size", "tiny"], cwd=ROOT, check=True, timeout=1800, env=ENV)
    return (SMOKE / "README.md").read_text()


@pytest.mark.timeout(1900)
@pytest.mark.parametrize("name", list(CHECKS))
def test_benchmark_smoke(smoke_readme, name):
    result = json.loads((SMOKE / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["size"] == "tiny"
    assert result["machine"]["cpu_cores"] > 0 and "ray" in result["machine"]["versions"]
    CHECKS[name](result)
    # the README's section shows this result's plot, and the plot is an image with something drawn on it
    [section] = [part for part in smoke_readme.split("\n## ")[1:] if part.startswith(f"{name}\n")]
    assert f"![{name}]({name}.png)" in section
    image = matplotlib.image.imread(SMOKE / f"{name}.png")
    assert image.ndim == 3 and min(image.shape[:2]) >= 200 and len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10


def test_results_from_before_the_anchors_still_render(smoke_readme, tmp_path):
    """benchmarks/README.md is regenerated from every stored result: one measured before the plain client and bare
    Serve anchors existed renders, saying so, instead of failing the run that regenerates it."""
    from benchmarks.report import section

    teacher = json.loads((SMOKE / "teacher_http.json").read_text())
    for key in ("plain_client_share_of_ideal", "two_stage_vs_plain_client", "steady_two_stage_vs_plain_client"):
        del teacher[key]
    del teacher["requests_per_s"]["plain_async_client"]
    serving = json.loads((SMOKE / "serving.json").read_text())
    for o in serving["overhead"].values():
        for key in ("bare_serve", "graph_p50_vs_bare_serve", "graph_rps_vs_bare_serve"):
            del o[key]
    assert "plain asyncio client was not measured in this result" in section(teacher, tmp_path)
    assert "Bare Ray Serve was not measured in this result" in section(serving, tmp_path)
