"""The `vllm` engine against the `hf` engine, side by side in one run: load time, generated tokens/s and
time to the first token at 1 to 128 concurrent requests, how many greedy outputs the two share, and the
served graph's /v1/solve (two_stage) on each engine at one load point."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

from ray import serve

from benchmarks.common import free_port
from benchmarks.report import bar_plot, table
from benchmarks.serving import closed_loop, deploy, http_sender, http_session
from dnc_ray.config import ServeAppConfig
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.configs import HFModel, VLLMModel
from dnc_ray.llm.engine import Messages, SamplingParams
from dnc_ray.llm.hf import HFEngine
from dnc_ray.method.prompts import decompose_messages, parse_subquestions, subquestions_schema
from dnc_ray.tasks import TASKS, TaskConfig, load_rows

ENGINES = ("hf", "vllm")
SIZES = {
    "tiny": {"model": "tiny-random-smollm2", "max_tokens": 8, "levels": [1, 4], "ttft_max_tokens": 8,
             "vllm": {"kv_cache_space_gb": 0.125, "max_model_len": 1024, "max_num_seqs": 8, "enforce_eager": True},
             "served_clients": 2, "served_seconds": 3, "parse_rows": 4, "parse_max_tokens": 16},
    "full": {"model": "smollm2-135m-instruct", "max_tokens": 64, "levels": [1, 8, 32, 128], "ttft_max_tokens": 8,
             "vllm": {"kv_cache_space_gb": 1, "max_model_len": 2048, "max_num_seqs": 128, "enforce_eager": False},
             "served_clients": 16, "served_seconds": 30, "parse_rows": 128, "parse_max_tokens": 128},
}
MIN_PROMPTS = 4  # even level 1 generates this many answers (one after another), not a single one


def prompts_at(level: int) -> int:
    return max(level, MIN_PROMPTS)


def vllm_model(p: dict, **extra) -> VLLMModel:
    return VLLMModel(engine="vllm", model=p["model"], **p["vllm"], **extra)


# ------------------------------------------------------------------ hf: static batches of `level` rows
def hf_tokens_per_s(engine: HFEngine, chats: list[Messages], params: SamplingParams, level: int) -> tuple[float, list]:
    engine.batch_size = level
    started = time.perf_counter()
    done = engine.generate(chats, params)
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - started), [c.text for c in done]


async def hf_first_tokens(engine: HFEngine, chats: list[Messages], params: SamplingParams) -> list[float]:
    """One streamed batch of the chats: seconds from its start to each row's first non-empty chunk (a row that
    never shows text: to its end)."""
    started, first = time.perf_counter(), [None] * len(chats)
    async for row, chunk in engine.astream_batch(chats, params, [threading.Event() for _ in chats]):
        if first[row] is None and (chunk.text or chunk.completion is not None):
            first[row] = time.perf_counter() - started
    return first


# ------------------------------------------------------------------ vllm: `level` requests in flight at once
async def vllm_tokens_per_s(engine, chats: list[Messages], params: SamplingParams, level: int) -> tuple[float, list]:
    gate = asyncio.Semaphore(level)

    async def one(chat: Messages):
        async with gate:
            return (await engine.agenerate([chat], params))[0]

    started = time.perf_counter()
    done = await asyncio.gather(*(one(chat) for chat in chats))
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - started), [c.text for c in done]


async def vllm_first_tokens(engine, chats: list[Messages], params: SamplingParams) -> list[float]:
    """The chats streamed at once: seconds from the start to each stream's first non-empty chunk (or its end)."""
    started = time.perf_counter()

    async def one(chat: Messages) -> float:
        first = None
        async for chunk in engine.astream(chat, params):
            if first is None and (chunk.text or chunk.completion is not None):
                first = time.perf_counter() - started
        return first

    return list(await asyncio.gather(*(one(chat) for chat in chats)))


async def parse_shares(engine, chats: list[Messages], max_tokens: int) -> dict:
    """The share of decompositions that parse into 1-3 sub-questions (and into none), free and structured
    (vLLM's guided decoding to the JSON schema of `structured_decompositions`)."""
    shares = {}
    for mode, schema in (("free", None), ("structured", subquestions_schema(3))):
        done = await engine.agenerate(chats, SamplingParams(max_tokens=max_tokens, json_schema=schema))
        counts = [len(parse_subquestions(c.text or "")) for c in done]
        shares[mode] = {"parsed_1_to_3": round(100 * sum(1 <= n <= 3 for n in counts) / len(counts), 1),
                        "none": round(100 * sum(n == 0 for n in counts) / len(counts), 1)}
    return shares


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def measure_hf(p: dict, chats: list[Messages], loop: asyncio.AbstractEventLoop) -> dict:
    started = time.perf_counter()
    engine = HFEngine(HFModel(engine="hf", model=p["model"], dtype="auto"))
    load_s = time.perf_counter() - started
    params, ttft_params = SamplingParams(max_tokens=p["max_tokens"]), SamplingParams(max_tokens=p["ttft_max_tokens"])
    engine.generate(chats[:2], SamplingParams(max_tokens=4))  # warm-up
    rates, ttft, texts = {}, {}, {}
    for level in p["levels"]:
        rates[level], texts[level] = hf_tokens_per_s(engine, chats[:prompts_at(level)], params, level)
        ttft[level] = p50(loop.run_until_complete(hf_first_tokens(engine, chats[:level], ttft_params)))
        print(f"[bench] vllm_engine hf c={level}: {rates[level]:.1f} tokens/s, TTFT p50 {ttft[level]} s", flush=True)
    return {"load_s": load_s, "rates": rates, "ttft": ttft, "texts": texts, "dtype": engine.dtype}


def measure_vllm(p: dict, chats: list[Messages], loop: asyncio.AbstractEventLoop) -> dict:
    from dnc_ray.llm.vllm import VLLMEngine  # imports vLLM

    started = time.perf_counter()
    engine = VLLMEngine(vllm_model(p))  # the engine's start: profiling, KV cache, compile / warm-up
    load_s = time.perf_counter() - started
    params, ttft_params = SamplingParams(max_tokens=p["max_tokens"]), SamplingParams(max_tokens=p["ttft_max_tokens"])
    try:  # every call on this one loop, for the engine's whole life
        loop.run_until_complete(engine.agenerate(chats[:2], SamplingParams(max_tokens=4)))  # warm-up
        rates, ttft, texts = {}, {}, {}
        for level in p["levels"]:
            rates[level], texts[level] = loop.run_until_complete(
                vllm_tokens_per_s(engine, chats[:prompts_at(level)], params, level))
            ttft[level] = p50(loop.run_until_complete(vllm_first_tokens(engine, chats[:level], ttft_params)))
            print(f"[bench] vllm_engine vllm c={level}: {rates[level]:.1f} tokens/s, TTFT p50 {ttft[level]} s", flush=True)
        parsing = loop.run_until_complete(parse_shares(engine, chats[:p["parse_rows"]], p["parse_max_tokens"]))
        print(f"[bench] vllm_engine decompositions parsed (GSM8K test 0-{p['parse_rows'] - 1}): {parsing}", flush=True)
    finally:
        engine.shutdown()
        loop.run_until_complete(asyncio.sleep(0))  # its output task takes the cancellation
    return {"load_s": load_s, "rates": rates, "ttft": ttft, "texts": texts, "parsing": parsing}


# ------------------------------------------------------------------ the served graph on each engine
def served_app(p: dict, engine: str) -> ServeAppConfig:
    if engine == "vllm":  # each replica's own small KV cache (vLLM's CPU default would take most of the RAM)
        model = vllm_model(p, max_tokens=p["max_tokens"]).model_dump()
    else:
        model = {"engine": "hf", "model": p["model"], "max_tokens": p["max_tokens"]}
    half = {"model": model, "num_cpus": 0.5, "max_ongoing_requests": 32}
    return ServeAppConfig(decomposer=half, solver=half, request_timeout_s=600)


async def served_point(p: dict, questions: list[str], port: int, engine: str) -> dict:
    url = deploy(served_app(p, engine), port)
    try:
        async with http_session(900) as http:
            send = http_sender(http, url)
            await send(questions[0])  # warm-up: models loaded, first generate done
            point = await closed_loop(send, questions, p["served_clients"], p["served_seconds"])
    finally:
        serve.delete("bench")
    print(f"[bench] vllm_engine served {engine}: {point}", flush=True)
    return {"requests": point["requests"], "requests_per_s": point["requests_per_s"], "p50_s": point["p50_s"],
            "clients": p["served_clients"]}


def run(size: str) -> dict:
    p = SIZES[size]
    top = max(p["levels"])
    rows = load_rows(TaskConfig(name="gsm8k", split="test", limit=max(prompts_at(top), 16, p["parse_rows"])))
    chats = [decompose_messages(r["question"], None, TASKS["gsm8k"].rules.max_subquestions) for r in rows]
    loop = asyncio.new_event_loop()
    try:
        measured = {"hf": measure_hf(p, chats[:prompts_at(top)], loop), "vllm": measure_vllm(p, chats, loop)}
        init_ray(num_cpus=4)  # at the tiny size: joins the runner's Ray
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            questions = [r["question"] for r in rows]
            served = {engine: loop.run_until_complete(served_point(p, questions, port, engine)) for engine in ENGINES}
        finally:
            serve.shutdown()
    finally:
        loop.close()
    rates = {e: {str(c): round(measured[e]["rates"][c], 1) for c in p["levels"]} for e in ENGINES}
    hf_texts, vllm_texts = measured["hf"]["texts"][top], measured["vllm"]["texts"][top]
    same = sum(a == b for a, b in zip(hf_texts, vllm_texts, strict=True))
    return {
        "params": {k: p[k] for k in ("model", "max_tokens", "levels", "ttft_max_tokens", "vllm", "parse_rows", "parse_max_tokens")}
                  | {"prompts_per_level": {str(c): prompts_at(c) for c in p["levels"]}, "dtype": "auto",
                     "hf_dtype": measured["hf"]["dtype"], "vllm_version": vllm_version(),
                     "served_seconds": p["served_seconds"]},
        "load_s": {e: round(measured[e]["load_s"], 2) for e in ENGINES},
        "tokens_per_s": rates,
        "vllm_vs_hf": {c: round(rates["vllm"][c] / rates["hf"][c], 2) for c in rates["hf"]},
        "ttft_p50_s": {e: {str(c): measured[e]["ttft"][c] for c in p["levels"]} for e in ENGINES},
        "same_greedy_outputs": f"{same}/{len(hf_texts)} ({top} rows)",
        "served": served,
        "decompositions_parsed_pct": measured["vllm"]["parsing"],
    }


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def render(result: dict, folder: Path) -> str:
    rates, ttft, ratio = result["tokens_per_s"], result["ttft_p50_s"], result["vllm_vs_hf"]
    rows = [{"concurrent requests": c, "hf tokens/s": rates["hf"][c], "vllm tokens/s": rates["vllm"][c],
             "vllm / hf": ratio[c], "hf TTFT p50, s": ttft["hf"][c], "vllm TTFT p50, s": ttft["vllm"][c]}
            for c in rates["hf"]]
    load, served = result["load_s"], result["served"]
    served_text = "; ".join(f"{e}: {s['requests_per_s']} requests/s, p50 {s['p50_s']} s" for e, s in served.items())
    plotted = {f"{e} c={c}": v for e in ENGINES for c, v in rates[e].items()}
    return "\n\n".join([
        table(rows, ["concurrent requests", "hf tokens/s", "vllm tokens/s", "vllm / hf", "hf TTFT p50, s",
                     "vllm TTFT p50, s"]),
        "Same model, prompts and greedy settings, `dtype: auto` for both (hf resolved to "
        f"{result['params']['hf_dtype']}). hf runs static batches of the level's size; vLLM has that many "
        "requests in flight and batches them continuously; at level 1 both answer "
        f"{result['params']['prompts_per_level'][next(iter(rates['hf']))]} prompts one after another. "
        f"TTFT: {result['params']['ttft_max_tokens']} tokens streamed, one batch (hf) or that many streams (vLLM). "
        f"Load: hf {load['hf']} s, vLLM {load['vllm']} s (engine start, KV cache, warm-up). "
        f"Identical greedy outputs: {result['same_greedy_outputs']}. "
        f"Served graph (/v1/solve two_stage, {served['hf']['clients']} closed-loop clients, "
        f"{result['params']['served_seconds']} s): {served_text}.",
        parse_table(result),
        bar_plot(folder, "vllm_engine", plotted, "generated tokens / s"),
    ])


def parse_table(result: dict) -> str:
    parsed, p = result["decompositions_parsed_pct"], result["params"]
    rows = [{"decomposer (vLLM, greedy)": f"{p['model']}, {mode}", "parse into 1-3 sub-questions, %": v["parsed_1_to_3"],
             "none, %": v["none"]} for mode, v in parsed.items()]
    return (f"Decompositions of GSM8K test questions 0-{p['parse_rows'] - 1} ({p['parse_max_tokens']} new tokens), "
            "free and with `structured_decompositions: true` (a JSON list of at most 3 questions, guided decoding):\n\n"
            + table(rows, ["decomposer (vLLM, greedy)", "parse into 1-3 sub-questions, %", "none, %"]))
