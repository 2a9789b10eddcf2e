"""Serving: a closed-loop load generator against the served graph's POST /v1/solve (two_stage).

1. Load curve: N concurrent clients, each sending its next request as soon as the last one is answered,
   for T seconds; requests/s and p50/p95/p99 latency against N, with `@serve.batch` on (batch_size 8)
   and off (batch_size 1), local SmolLM2 as decomposer and solver.
2. Graph overhead: the same load through the graph against running the method's two_stage in the load
   generator over the two engines directly (what the ingress does, without the graph), both stages on an
   OpenAI-compatible stand-in with a fixed latency, so the difference is the graph's own cost (HTTP
   proxy, ingress, handles). And against bare Ray Serve (its own application): a FastAPI ingress that makes two
   handle calls per request to deployments with no model (one per stage) that sleep the stand-in's latency, through
   the same proxy and load, so the difference is what the method and its engines add to Serve's own plumbing.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig

from benchmarks.common import free_port, start_stub
from benchmarks.report import plt, save_figure, table
from dnc_ray.config import ServeAppConfig
from dnc_ray.infra.cluster import init_ray
from dnc_ray.llm.chat_model import ChatModel
from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.row import new_row
from dnc_ray.serve.app import build_app
from dnc_ray.tasks import GENERIC_RULES, TaskConfig, load_rows

SIZES = {
    "tiny": {"model": "tiny-random-smollm2", "max_tokens": [8, 8], "concurrency": [1, 4], "seconds": 1.5,
             "overhead_concurrency": [1, 4], "overhead_seconds": 1.5, "upstream_latency_s": 0.05},
    "full": {"model": "smollm2-135m-instruct", "max_tokens": [48, 64], "concurrency": [1, 4, 8, 16], "seconds": 40,
             "overhead_concurrency": [1, 16], "overhead_seconds": 20, "upstream_latency_s": 0.2},
}
BATCHING = {"batch_on": 8, "batch_off": 1}

Send = Callable[[str], Awaitable[float | None]]  # a streaming sender returns its time to the first token


async def closed_loop(send: Send, questions: list[str], clients: int, seconds: float) -> dict:
    """`clients` loops, each sending one question after another until `seconds` pass; latency per request."""
    latencies: list[float] = []
    first_tokens: list[float] = []
    end = time.perf_counter() + seconds

    async def client(index: int) -> None:
        turn = index
        while time.perf_counter() < end:
            started = time.perf_counter()
            first_token = await send(questions[turn % len(questions)])
            latencies.append(time.perf_counter() - started)
            if first_token is not None:
                first_tokens.append(first_token)
            turn += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    summary = summarize(latencies, time.perf_counter() - started)
    if first_tokens:
        ttft = percentiles(first_tokens)
        summary |= {"ttft_p50_s": ttft[49], "ttft_p99_s": ttft[98]}
    return summary


def percentiles(values: list[float]) -> list[float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return [round(c, 3) for c in cuts]


def summarize(latencies: list[float], elapsed_s: float) -> dict:
    cuts = percentiles(latencies)
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed_s, 3),
            "p50_s": cuts[49], "p95_s": cuts[94], "p99_s": cuts[98]}


def http_sender(http: aiohttp.ClientSession, url: str) -> Send:
    async def send(question: str) -> None:
        async with http.post(url, json={"question": question, "strategy": "two_stage"}) as response:
            response.raise_for_status()  # a failed request is not a measurement
            await response.read()
    return send


def stream_sender(http: aiohttp.ClientSession, url: str) -> Send:
    """The question to the `pipeline` chat model with `stream: true`; returns the seconds to the first content token."""
    async def send(question: str) -> float | None:
        started, first_token = time.perf_counter(), None
        body = {"model": "pipeline", "messages": [{"role": "user", "content": question}], "stream": True}
        async with http.post(url, json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if first_token is None and line.startswith(b"data: {") and b'"content":"' in line.replace(b'"content":""', b""):
                    first_token = time.perf_counter() - started
        return first_token
    return send


def http_session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 connector=aiohttp.TCPConnector(limit=64))


def direct_sender(app: ServeAppConfig) -> Send:
    """The method's two_stage over the app's two models called directly: what the ingress runs per
    request, with the options it gives a request without a task, without the graph."""
    models = {role: ChatModel(served.model, OpenAIEngine(served.model))
              for role, served in (("decomposer", app.decomposer), ("solver", app.solver))}
    rules = GENERIC_RULES if app.max_subquestions is None else replace(GENERIC_RULES, max_subquestions=app.max_subquestions)
    options = MethodOptions(rules=rules, max_turns=app.max_turns)

    async def send(question: str) -> None:
        row = new_row({"id": "request", "task": None, "split": None, "question": question, "context": None, "answers": None})
        await run_row(STRATEGIES["two_stage"], row, models, options)
        if row["error"] is not None:
            raise RuntimeError(row["error"])  # a failed request is not a measurement
    return send


def local_app(model: str, max_tokens: list[int], batch_size: int) -> ServeAppConfig:
    def half(tokens: int) -> dict:
        return {"model": {"engine": "hf", "model": model, "max_tokens": tokens, "batch_size": batch_size},
                "num_cpus": 0.5, "batch_wait_timeout_s": 0.05}
    return ServeAppConfig(decomposer=half(max_tokens[0]), solver=half(max_tokens[1]), request_timeout_s=600)


def upstream_model(base_url: str) -> OpenAIModel:
    return OpenAIModel(engine="openai", model="stub-teacher", base_url=base_url, api_key_env=None,
                       max_in_flight=64, max_tokens=64, max_retries=0)


QUIET = LoggingConfig(enable_access_log=False, log_level="WARNING")  # no log line per request
BARE_APP, BARE_PREFIX = "bare", "/bare"
bare_api = FastAPI()


@serve.deployment
class Sleeper:
    """A model deployment with no model: the stand-in's latency, then a fixed answer."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    async def complete(self, prompt: str) -> str:
        await asyncio.sleep(self.latency_s)
        return "The answer is: 42"


@serve.deployment
@serve.ingress(bare_api)
class BareIngress:
    """Bare Ray Serve's two_stage: a decompose call, then a solve call, by handle; no prompt, no parsing."""

    def __init__(self, decomposer: DeploymentHandle, solver: DeploymentHandle):
        self.decomposer, self.solver = decomposer, solver

    @bare_api.post("/v1/solve")
    async def solve(self, body: dict) -> dict:
        decomposition = await self.decomposer.complete.remote(body["question"])
        return {"answer": await self.solver.complete.remote(decomposition)}


def deploy(app: ServeAppConfig, port: int) -> str:
    serve.run(build_app(app), name="bench", route_prefix="/", logging_config=QUIET)
    return f"http://127.0.0.1:{port}/v1/solve"


def deploy_bare(app: ServeAppConfig, latency_s: float, port: int) -> str:
    """Bare Serve as its own application, with the graph's replica settings (CPUs, requests held at once)."""
    def sleeper(name: str) -> Application:
        served = app.decomposer
        return Sleeper.options(name=name, ray_actor_options={"num_cpus": served.num_cpus},
                               max_ongoing_requests=served.max_ongoing_requests).bind(latency_s)
    ingress = BareIngress.options(ray_actor_options={"num_cpus": app.ingress.num_cpus},
                                  max_ongoing_requests=app.ingress.max_ongoing_requests)
    serve.run(ingress.bind(sleeper("BareDecomposer"), sleeper("BareSolver")), name=BARE_APP,
              route_prefix=BARE_PREFIX, logging_config=QUIET)
    return f"http://127.0.0.1:{port}{BARE_PREFIX}/v1/solve"


async def load_curves(p: dict, questions: list[str], port: int) -> dict:
    """/v1/solve with @serve.batch on and off; with it on, also the pipeline chat model streamed (TTFT)."""
    curves = {}
    async with http_session(900) as http:
        for mode, batch_size in BATCHING.items():
            url = deploy(local_app(p["model"], p["max_tokens"], batch_size), port)
            senders = {mode: http_sender(http, url)}
            if mode == "batch_on":
                senders["batch_on_streamed"] = stream_sender(http, url.replace("/v1/solve", "/v1/chat/completions"))
            for name, send in senders.items():
                await send(questions[0])  # warm-up: models loaded, first generate done
                curves[name] = {}
                for clients in p["concurrency"]:
                    curves[name][clients] = await closed_loop(send, questions, clients, p["seconds"])
                    print(f"[bench] serving {name} c={clients}: {curves[name][clients]}", flush=True)
    return curves


async def graph_overhead(p: dict, questions: list[str], port: int) -> dict:
    server, base_url = start_stub(p["upstream_latency_s"])
    try:
        served = {"model": upstream_model(base_url).model_dump(), "num_cpus": 0.25}
        app = ServeAppConfig(decomposer=served, solver=served)
        url, bare_url = deploy(app, port), deploy_bare(app, p["upstream_latency_s"], port)
        direct = direct_sender(app)
        overhead = {}
        async with http_session(120) as http:
            graph, bare = http_sender(http, url), http_sender(http, bare_url)
            for send in (graph, direct, bare):
                await send(questions[0])
            for clients in p["overhead_concurrency"]:
                measured = {path: await closed_loop(send, questions, clients, p["overhead_seconds"])
                            for path, send in (("direct_engines", direct), ("served_graph", graph), ("bare_serve", bare))}
                overhead[clients] = measured | added_cost(measured)
                print(f"[bench] serving overhead c={clients}: +{overhead[clients]['added_p50_share']:.1%} at p50, "
                      f"{overhead[clients]['graph_p50_vs_bare_serve']}x bare Serve's p50", flush=True)
        return overhead
    finally:
        serve.delete(BARE_APP)
        server.kill()


def added_cost(measured: dict) -> dict:
    """The graph against the engines called directly (seconds and share added at p50) and against bare Serve (ratios)."""
    d, g, b = (measured[path] for path in ("direct_engines", "served_graph", "bare_serve"))
    return {"added_p50_s": round(g["p50_s"] - d["p50_s"], 3), "added_p50_share": round((g["p50_s"] - d["p50_s"]) / d["p50_s"], 3),
            "graph_p50_vs_bare_serve": round(g["p50_s"] / b["p50_s"], 2),
            "graph_rps_vs_bare_serve": round(g["requests_per_s"] / b["requests_per_s"], 2)}


def run(size: str) -> dict:
    p = SIZES[size]
    questions = [r["question"] for r in load_rows(TaskConfig(name="gsm8k", split="test", limit=64))]
    init_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        curves = asyncio.run(load_curves(p, questions, port))
        overhead = asyncio.run(graph_overhead(p, questions, port))
    finally:
        serve.shutdown()
    top = max(p["concurrency"])
    return {
        "params": {k: p[k] for k in ("model", "max_tokens", "seconds", "upstream_latency_s")} | {"batch_size": BATCHING},
        "load": curves,
        "overhead": overhead,
        "speedup_batch_on_vs_off": round(curves["batch_on"][top]["requests_per_s"] / curves["batch_off"][top]["requests_per_s"], 2),
        "graph_added_p50_share": {c: o["added_p50_share"] for c, o in overhead.items()},
    }


def render(result: dict, folder: Path) -> str:
    load = [{"@serve.batch": mode, "clients": clients, **point} for mode, curve in result["load"].items()
            for clients, point in curve.items() if mode in BATCHING]
    streamed = [{"clients": clients, **point} for clients, point in result["load"].get("batch_on_streamed", {}).items()]
    overhead = [{"clients": clients, "path": path, **o[path]} | (graph_columns(o) if path == "served_graph" else {})
                for clients, o in result["overhead"].items() for path in ("direct_engines", "served_graph", "bare_serve")
                if path in o]  # bare_serve: not in results that predate that anchor
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for mode, curve in result["load"].items():
        clients = [int(c) for c in curve]
        left.plot(clients, [p["requests_per_s"] for p in curve.values()], marker="o", label=mode)
        right.plot(clients, [p["p50_s"] for p in curve.values()], marker="o", label=f"{mode} p50")
        right.plot(clients, [p["p95_s"] for p in curve.values()], marker="x", linestyle="--", label=f"{mode} p95")
    left.set(xlabel="concurrent clients", ylabel="requests / s")
    right.set(xlabel="concurrent clients", ylabel="latency, s")
    for ax in (left, right):
        ax.legend(fontsize=7)
    columns = ["requests", "requests_per_s", "p50_s", "p95_s", "p99_s"]
    params = result["params"]
    return "\n\n".join([
        f"### Load against concurrency: `@serve.batch` on (batch {params['batch_size']['batch_on']}) and off (batch 1)",
        table(load, ["@serve.batch", "clients", *columns]),
        f"At the highest concurrency, batching serves {result['speedup_batch_on_vs_off']}x the requests/s. "
        f"Closed loop: each client sends its next question when the last is answered, for {params['seconds']} s.",
        save_figure(fig, folder, "serving"),
        "### Streaming: time to the first token (the `pipeline` chat model, `stream: true`, `@serve.batch` on)",
        table(streamed, ["clients", "requests", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "p50_s", "p99_s"]),
        "The first token comes once the decomposition is done and the solver's first token is out; the "
        "solver's batch is shared with the other clients' streams.",
        f"### The composed graph's overhead (both stages on a stand-in API with {params['upstream_latency_s']} s latency)",
        table(overhead, ["clients", "path", *columns, "added p50", "vs bare Serve"]),
        "Against the engines called directly (the method in the load generator), the graph adds its HTTP proxy, "
        "ingress and handles. " + bare_serve_sentence(result["overhead"]),
    ])


def bare_serve_sentence(overhead: dict) -> str:
    if not all("bare_serve" in o for o in overhead.values()):
        return "Bare Ray Serve was not measured in this result (it predates that anchor)."
    return ("Against bare Ray Serve (a FastAPI ingress making two handle calls per request to deployments with no "
            "model that sleep the stand-in's latency, the graph's replica settings, the same proxy), it also adds the "
            "method and the engines' HTTP calls to the stand-in: the graph's p50 is "
            + ", ".join(f"{o['graph_p50_vs_bare_serve']}x bare Serve's at {clients} clients "
                        f"({o['graph_rps_vs_bare_serve']}x its requests/s)" for clients, o in overhead.items()) + ".")


def graph_columns(o: dict) -> dict:
    """The served graph's row: what it adds to the engines called directly, and its ratios to bare Serve."""
    versus = f"p50 {o['graph_p50_vs_bare_serve']}x, requests/s {o['graph_rps_vs_bare_serve']}x" if "bare_serve" in o else None
    return {"added p50": f"{o['added_p50_s']} s ({o['added_p50_share']:.1%})", "vs bare Serve": versus}
