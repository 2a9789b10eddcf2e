"""Training: tokens/s and peak memory of `dnc train` (Ray Train + DeepSpeed) per ZeRO stage, 1 worker against 2;
two switches, each against its baseline in the same run: padding-free packing (tokens/s, share of padding) and
gradient checkpointing (peak memory, tokens/s); and the dtype: fp32 against bf16 mixed precision (fp32 master
weights), the same rows and steps, tokens/s and the loss at every step.

The training set is the S_D-T set of GSM8K test's reference (socratic) decompositions (no model call). Each run takes
the same number of optimizer steps per worker; tokens/s is the steady rate (every real token all workers
saw after the first step, over the time it took; padding is not counted), peak memory is rank 0's (resident
memory on CPU). At full size the switches run at a larger micro-batch than the ZeRO runs, where padding and
activations weigh more; their baseline is the same run with both switches off (at the tiny size, the ZeRO run).
The ZeRO and switch runs train in the default dtype (`auto`: bf16 on a CPU with AVX512-BF16/AMX, else fp32); the
dtype runs name theirs (run first), and at full size take more steps (12: 48 of the 64 rows) for a loss curve; at
the tiny size the ZeRO run is the dtype run of the dtype `auto` resolves to.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.report import plt, save_figure, table
from dnc_ray.config import GenerateConfig, TrainConfig
from dnc_ray.distill import build_training_set
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.stages.generate import run_generate
from dnc_ray.train.recipe import run_train

SIZES = {
    # The smoke size: every code path once, on the cheapest run (one worker, ZeRO-0: a Ray Train run's start-up is
    # most of its time here; 2-worker ZeRO-3 runs are the training tests' and the full size's).
    "tiny": {"model": "tiny-random-smollm2", "rows": 16, "steps": 3, "runs": [(0, 1)],
             "switches": {"zero_stage": 0, "workers": 1, "per_worker_batch_size": 2},
             "dtypes": {"zero_stage": 0, "workers": 1, "per_worker_batch_size": 2, "steps": 3}},
    # Full size cut to about 20 minutes on 2 shared cores (was 6 steps, switches at 8 rows per micro-batch): 4 steps,
    # switches at 4 rows per micro-batch; the dtype runs take 12 steps (48 of the 64 rows) for a loss curve.
    "full": {"model": "smollm2-135m-instruct", "rows": 64, "steps": 4,
             "runs": [(stage, workers) for stage in (0, 2, 3) for workers in (1, 2)],
             "switches": {"zero_stage": 2, "workers": 2, "per_worker_batch_size": 4},
             "dtypes": {"zero_stage": 2, "workers": 2, "per_worker_batch_size": 2, "steps": 12}},
}
DTYPES = ("float32", "bfloat16")
BATCH_PER_WORKER, MAX_LENGTH = 2, 256
SWITCHES = {"baseline": {}, "packing": {"packing": True}, "gradient_checkpointing": {"gradient_checkpointing": True}}


def training_set(folder: str, rows: int) -> str:
    decompositions = f"{folder}/reference"
    run_generate(GenerateConfig(task={"name": "gsm8k", "split": "test", "limit": rows}, strategy="decompose",
                                output=decompositions, decomposer={"engine": "reference"}, progress_interval_s=60))
    build_training_set([decompositions], "sd-t", f"{folder}/sd-t")
    return f"{folder}/sd-t"


def steady_rate(steps: list[dict]) -> float:
    """Tokens per second after the first step (its warm-up is not throughput)."""
    first, last = steps[0], steps[-1]
    return (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (last["train_runtime"] - first["train_runtime"])


def train_once(train_set: str, output: str, model: str, steps: int, zero_stage: int, workers: int,
               per_worker_batch_size: int = BATCH_PER_WORKER, **switches) -> dict:
    cfg = TrainConfig(train_set=train_set, variant="sd-t", model=model, output=output, max_length=MAX_LENGTH,
                      max_steps=steps, per_worker_batch_size=per_worker_batch_size, lr=1e-4, num_workers=workers,
                      cpus_per_worker=1, checkpoint_every_steps=steps, log_every_steps=steps, tensorboard=False,
                      deepspeed={"zero_stage": zero_stage}, **switches)
    summary = run_train(cfg)
    metrics = [json.loads(line) for line in Path(output, "metrics.jsonl").read_text().splitlines()]
    return {"zero_stage": zero_stage, "workers": workers, "per_worker_batch_size": per_worker_batch_size,
            "packing": cfg.packing, "gradient_checkpointing": cfg.gradient_checkpointing, "dtype": summary["dtype"],
            "steps": len(metrics), "tokens_per_s": round(steady_rate(metrics), 1),
            "peak_memory_gib": metrics[-1]["peak_memory_gib"], "padding_share": metrics[-1]["padding_share"],
            "final_loss": metrics[-1]["loss"], "losses": [round(m["loss"], 4) for m in metrics]}


def dtype_runs(train_set: str, folder: str, model: str, d: dict) -> dict[str, dict]:
    """fp32 and bf16 at the same settings, rows and steps (run first: their figures are printed as they come)."""
    found = {}
    for dtype in DTYPES:
        found[dtype] = train_once(train_set, f"{folder}/{dtype}", model, d["steps"], d["zero_stage"], d["workers"],
                                  d["per_worker_batch_size"], dtype=dtype)
        print(f"[bench] training {dtype}: {found[dtype]['tokens_per_s']} tokens/s, loss per step {found[dtype]['losses']}",
              flush=True)
    return found


def zero_run(train_set: str, folder: str, p: dict, stage: int, workers: int, dtyped: dict[str, dict]) -> dict:
    """A ZeRO run in the default dtype; the dtype run of the dtype auto resolves to here, when its settings match."""
    d, default = p["dtypes"], resolve_dtype("auto", "cpu", device_caps())
    if (stage, workers, BATCH_PER_WORKER, p["steps"]) == (d["zero_stage"], d["workers"], d["per_worker_batch_size"], d["steps"]):
        return dtyped[default]
    return train_once(train_set, f"{folder}/zero{stage}-w{workers}", p["model"], p["steps"], stage, workers)


def run(size: str) -> dict:
    p = SIZES[size]
    init_ray(num_cpus=4)
    with tempfile.TemporaryDirectory(prefix="dnc-bench-train-") as folder:
        train_set = training_set(folder, p["rows"])
        dtyped = dtype_runs(train_set, folder, p["model"], p["dtypes"])
        runs = [zero_run(train_set, folder, p, stage, workers, dtyped) for stage, workers in p["runs"]]
        s = p["switches"]
        switched = {}
        for name, settings in SWITCHES.items():
            same = [r for r in runs if (r["zero_stage"], r["workers"], r["per_worker_batch_size"]) ==
                    (s["zero_stage"], s["workers"], s["per_worker_batch_size"])]
            if name == "baseline" and same:  # a ZeRO run with these settings is the baseline already
                switched[name] = same[0]
                continue
            switched[name] = train_once(train_set, f"{folder}/{name}", p["model"], p["steps"], s["zero_stage"],
                                        s["workers"], s["per_worker_batch_size"], **settings)
    by_name = {f"zero{r['zero_stage']}_{r['workers']}w": r for r in runs}
    base = switched["baseline"]
    fp32, bf16 = dtyped["float32"], dtyped["bfloat16"]
    differences = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)]
    result = {
        "params": {"model": p["model"], "rows": p["rows"], "steps": p["steps"], "per_worker_batch_size": BATCH_PER_WORKER,
                   "max_length": MAX_LENGTH, "cpus_per_worker": 1, "lr": 1e-4, "dtype": "auto", "switches": s,
                   "dtypes": p["dtypes"]},
        "tokens_per_s": {name: r["tokens_per_s"] for name, r in by_name.items()},
        "peak_memory_gib": {name: r["peak_memory_gib"] for name, r in by_name.items()},
        "runs": runs,
        "switch_runs": switched,
        "packing": {
            "tokens_per_s": {"off": base["tokens_per_s"], "on": switched["packing"]["tokens_per_s"]},
            "padding_share": {"off": base["padding_share"], "on": switched["packing"]["padding_share"]},
            "speedup": round(switched["packing"]["tokens_per_s"] / base["tokens_per_s"], 2),
        },
        "gradient_checkpointing": {
            "peak_memory_gib": {"off": base["peak_memory_gib"], "on": switched["gradient_checkpointing"]["peak_memory_gib"]},
            "tokens_per_s": {"off": base["tokens_per_s"], "on": switched["gradient_checkpointing"]["tokens_per_s"]},
            "memory_ratio": round(switched["gradient_checkpointing"]["peak_memory_gib"] / base["peak_memory_gib"], 3),
            "speed_ratio": round(switched["gradient_checkpointing"]["tokens_per_s"] / base["tokens_per_s"], 2),
        },
        "dtype_runs": dtyped,
        "dtype": {
            "default_resolves_to": runs[0]["dtype"],
            "tokens_per_s": {"float32": fp32["tokens_per_s"], "bfloat16": bf16["tokens_per_s"]},
            "bf16_speedup": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 2),
            "peak_memory_gib": {"float32": fp32["peak_memory_gib"], "bfloat16": bf16["peak_memory_gib"]},
            "final_loss": {"float32": fp32["final_loss"], "bfloat16": bf16["final_loss"]},
            "loss_difference": {"mean_abs": round(sum(differences) / len(differences), 4),
                                "max_abs": round(max(differences), 4),
                                "final": round(bf16["final_loss"] - fp32["final_loss"], 4)},
        },
    }
    result["speedup_2w_vs_1w"] = {
        f"zero{stage}": round(by_name[f"zero{stage}_2w"]["tokens_per_s"] / by_name[f"zero{stage}_1w"]["tokens_per_s"], 2)
        for stage in sorted({r["zero_stage"] for r in runs}) if f"zero{stage}_1w" in by_name and f"zero{stage}_2w" in by_name
    }
    return result


def render(result: dict, folder: Path) -> str:
    rows = [{"ZeRO stage": r["zero_stage"], "workers": r["workers"], "dtype": r.get("dtype", "float32"),
             "tokens/s (all workers)": r["tokens_per_s"],
             "peak memory GiB (rank 0)": r["peak_memory_gib"], "final loss": round(r["final_loss"], 3)}
            for r in result["runs"]]
    names = list(result["tokens_per_s"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    left.bar(names, [result["tokens_per_s"][n] for n in names], color="#4878a8")
    left.set_ylabel("tokens / s")
    right.bar(names, [result["peak_memory_gib"][n] for n in names], color="#a85848")
    right.set_ylabel("peak memory, GiB (rank 0)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    speedups = ", ".join(f"{stage}: {x}x" for stage, x in result["speedup_2w_vs_1w"].items()) or "-"
    sections = [
        table(rows, list(rows[0])),
        f"2 workers against 1 (same ZeRO stage, {result['params']['cpus_per_worker']} CPU each): {speedups}. "
        "Tokens/s counts every worker's tokens after the first step; memory is the process's peak resident "
        "memory on CPU (torch's peak allocation on GPU).",
        save_figure(fig, folder, "training"),
    ]
    if "switch_runs" in result:  # results written before the switches were measured have none
        s, pk, gc = result["params"]["switches"], result["packing"], result["gradient_checkpointing"]
        switch_rows = [{"run": name, "dtype": r.get("dtype", "float32"), "tokens/s (all workers)": r["tokens_per_s"], "padding share": r["padding_share"],
                        "peak memory GiB (rank 0)": r["peak_memory_gib"], "final loss": round(r["final_loss"], 3)}
                       for name, r in result["switch_runs"].items()]
        sections += [
            f"Switches, each against the baseline run (ZeRO-{s['zero_stage']}, {s['workers']} workers, "
            f"{s['per_worker_batch_size']} rows per micro-batch, both switches off):",
            table(switch_rows, list(switch_rows[0])),
            f"Packing: {pk['speedup']}x the tokens/s, padding {pk['padding_share']['off']:.1%} of the batch tokens "
            f"without, {pk['padding_share']['on']:.1%} with. Gradient checkpointing: peak memory "
            f"{gc['peak_memory_gib']['on']} GiB against {gc['peak_memory_gib']['off']} ({gc['memory_ratio']}x), at "
            f"{gc['speed_ratio']}x the tokens/s.",
        ]
    if "dtype_runs" in result:  # results written before the dtype was measured have none
        sections += render_dtype(result, folder)
    return "\n\n".join(sections)


def render_dtype(result: dict, folder: Path) -> list[str]:
    d, x, runs = result["params"]["dtypes"], result["dtype"], result["dtype_runs"]
    rows = [{"dtype": name, "tokens/s (all workers)": r["tokens_per_s"], "peak memory GiB (rank 0)": r["peak_memory_gib"],
             "first loss": round(r["losses"][0], 3), "final loss": round(r["final_loss"], 3)} for name, r in runs.items()]
    diff = x["loss_difference"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for name, r in runs.items():
        left.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".", label=name)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend()
    right.bar(list(runs), [r["tokens_per_s"] for r in runs.values()], color=["#4878a8", "#58a848"])
    right.set_ylabel("tokens / s")
    return [
        f"dtype: fp32 against bf16 mixed precision (DeepSpeed's bf16: bf16 weights and activations, fp32 master "
        f"weights and optimizer state), ZeRO-{d['zero_stage']}, {d['workers']} workers, {d['per_worker_batch_size']} "
        f"rows per micro-batch, the same rows and {d['steps']} steps:",
        table(rows, list(rows[0])),
        f"bf16: {x['bf16_speedup']}x the tokens/s of fp32; training loss per step differs by {diff['mean_abs']} on "
        f"average (at most {diff['max_abs']}; final loss bf16 - fp32: {diff['final']:+}). `dtype: auto` resolved to "
        f"{x['default_resolves_to']} here (the ZeRO and switch runs above).",
        save_figure(fig, folder, "training_dtype"),
    ]
