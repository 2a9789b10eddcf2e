"""Local batched generation: the `hf` engine's tokens/s at batch 1, 8 and 32, in fp32 and in bf16, against
one-by-one fp32 generate; and how many greedy outputs bf16 leaves unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.report import bar_plot, table
from dnc_ray.llm.configs import HFModel
from dnc_ray.llm.dtype import device_caps
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.hf import HFEngine
from dnc_ray.method.prompts import decompose_messages
from dnc_ray.tasks import TASKS, TaskConfig, load_rows

DTYPES = ("float32", "bfloat16")
SIZES = {"tiny": {"model": "tiny-random-smollm2", "prompts": 4, "max_tokens": 8, "batches": [1, 4]},
         "full": {"model": "smollm2-135m-instruct", "prompts": 32, "max_tokens": 64, "batches": [1, 8, 32]}}


def one_by_one_tokens_per_s(engine: HFEngine, chats: list, max_tokens: int) -> float:
    """The baseline: a plain `model.generate` per prompt, no padding, no batching."""
    tokens, started = 0, time.perf_counter()
    for chat in chats:
        inputs = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        with torch.inference_mode():
            out = engine.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens / (time.perf_counter() - started)


def engine_tokens_per_s(engine: HFEngine, chats: list, max_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    engine.batch_size = batch_size
    started = time.perf_counter()
    completions = engine.generate(chats, SamplingParams(max_tokens=max_tokens))
    return sum(c.completion_tokens for c in completions) / (time.perf_counter() - started), [c.text for c in completions]


def run(size: str) -> dict:
    p = SIZES[size]
    rows = load_rows(TaskConfig(name="gsm8k", split="test", limit=p["prompts"]))
    # raw chats (the engine's batch is what is measured): the method's own decomposition prompt
    chats = [decompose_messages(r["question"], None, TASKS["gsm8k"].rules.max_subquestions) for r in rows]
    rates, texts, baseline = {}, {}, None
    for dtype in DTYPES:
        engine = HFEngine(HFModel(engine="hf", model=p["model"], dtype=dtype))
        engine.generate(chats[:2], SamplingParams(max_tokens=4))  # warm-up
        if baseline is None:
            baseline = one_by_one_tokens_per_s(engine, chats, p["max_tokens"])
        for b in p["batches"]:
            rates[f"{dtype}_batch_{b}"], texts[dtype] = engine_tokens_per_s(engine, chats, p["max_tokens"], b)
    top = max(p["batches"])
    return {
        "params": p | {"dtypes": list(DTYPES), "native_bf16": device_caps().cpu_bf16},
        "tokens_per_s": {"one_by_one_generate": round(baseline, 1), **{k: round(v, 1) for k, v in rates.items()}},
        "speedup_vs_one_by_one": {k: round(v / baseline, 2) for k, v in rates.items()},
        "bf16_vs_fp32": {f"batch_{b}": round(rates[f"bfloat16_batch_{b}"] / rates[f"float32_batch_{b}"], 2)
                         for b in p["batches"]},
        "bf16_same_greedy_outputs": f"{sum(a == b for a, b in zip(texts['float32'], texts['bfloat16'], strict=True))}/{len(chats)}"
                                    f" (batch {top})",
    }


def render(result: dict, folder: Path) -> str:
    speedups = result["speedup_vs_one_by_one"]
    rows = [{"what": name, "tokens/s": rate, "x one-by-one fp32": speedups.get(name, 1.0)}
            for name, rate in result["tokens_per_s"].items()]
    ratios = ", ".join(f"{b.replace('_', ' ')} {r}x" for b, r in result["bf16_vs_fp32"].items())
    return "\n\n".join([
        table(rows, ["what", "tokens/s", "x one-by-one fp32"]),
        "Same prompts, same greedy decoding, same process; the engine pads on the left and runs one "
        f"`generate` per batch. bf16 against fp32 (native bf16 on this CPU: {result['params']['native_bf16']}): "
        f"{ratios}; greedy outputs unchanged by bf16: {result['bf16_same_greedy_outputs']} (the others part "
        "after near-ties, as bf16 outputs do on GPUs too). `dtype: auto` picks bf16 where it is native.",
        bar_plot(folder, "hf_batch", result["tokens_per_s"], "generated tokens / s"),
    ])
