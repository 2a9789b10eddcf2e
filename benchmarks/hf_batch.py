"""Local batched generation: the `hf` engine's tokens/s at batch 1, 8 and 32 against one-by-one generate."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.report import bar_plot, table
from dnc_ray.config import HFModel, TaskConfig
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.hf import HFEngine
from dnc_ray.method.prompts import decompose_messages
from dnc_ray.tasks import TASKS, load_rows

SIZES = {"tiny": {"model": "tiny-random-smollm2", "prompts": 8, "max_tokens": 8, "batches": [1, 8]},
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


def engine_tokens_per_s(engine: HFEngine, chats: list, max_tokens: int, batch_size: int) -> float:
    engine.batch_size = batch_size
    started = time.perf_counter()
    completions = engine.generate(chats, SamplingParams(max_tokens=max_tokens))
    return sum(c.completion_tokens for c in completions) / (time.perf_counter() - started)


def run(size: str) -> dict:
    p = SIZES[size]
    rows = load_rows(TaskConfig(name="gsm8k", split="test", limit=p["prompts"]))
    # raw chats (the engine's batch is what is measured): the method's own decomposition prompt
    chats = [decompose_messages(r["question"], None, TASKS["gsm8k"].rules.max_subquestions) for r in rows]
    engine = HFEngine(HFModel(engine="hf", model=p["model"]))
    engine.generate(chats[:2], SamplingParams(max_tokens=4))  # warm-up
    baseline = one_by_one_tokens_per_s(engine, chats, p["max_tokens"])
    batched = {b: engine_tokens_per_s(engine, chats, p["max_tokens"], b) for b in p["batches"]}
    return {
        "params": p,
        "tokens_per_s": {"one_by_one_generate": round(baseline, 1),
                         **{f"engine_batch_{b}": round(t, 1) for b, t in batched.items()}},
        "speedup_vs_one_by_one": {f"batch_{b}": round(t / baseline, 2) for b, t in batched.items()},
    }


def render(result: dict, folder: Path) -> str:
    speedups = {f"engine_{k}": v for k, v in result["speedup_vs_one_by_one"].items()}
    rows = [{"what": name, "tokens/s": rate, "x one-by-one": speedups.get(name, 1.0 if name.startswith("one") else None)}
            for name, rate in result["tokens_per_s"].items()]
    return "\n\n".join([
        table(rows, ["what", "tokens/s", "x one-by-one"]),
        "Same prompts, same greedy decoding, same process; the engine pads on the left and runs one "
        "`generate` per batch.",
        bar_plot(folder, "hf_batch", result["tokens_per_s"], "generated tokens / s"),
    ])
