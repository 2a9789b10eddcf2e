"""The Batch API of an OpenAI-compatible endpoint: a round's requests as JSONL files, uploaded, run as
batches, polled, and their results read back by custom id.

    split_requests   a round's request lines cut into files within `max_requests` and `max_bytes`
    BatchClient      upload + create, retrieve, find a batch by its input file (a driver killed between the
                     two), read a finished batch's output and error files as {custom_id: Completion}
    BatchModel       the method's `Model` for a `mode: batch` model: `complete` puts the chat into the
                     current round (see stages/batch_rounds.py) and waits for its line's result; its cost
                     is the batch price (`batch_api.price`, else half the model's price)

custom_id: the row key and a digest of the request (`<id>#<sample>#<digest>`), so a restarted driver
recognises a line it already paid for, whatever step or turn the row is at.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import openai

from dnc_ray.llm.configs import OpenAIModel, Price
from dnc_ray.llm.engine import Completion, Messages, SamplingParams

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ENDPOINT = "/v1/chat/completions"

# The row whose call is being made: set by the round driver for each row's task (a Model sees only the chat).
CURRENT_ROW: contextvars.ContextVar[dict] = contextvars.ContextVar("dnc_batch_row")


def batch_price(cfg: OpenAIModel) -> Price:
    return cfg.batch_api.price or Price(input_per_1k=cfg.price.input_per_1k / 2, output_per_1k=cfg.price.output_per_1k / 2)


def request_body(cfg: OpenAIModel, chat: Messages, params: SamplingParams) -> dict:
    body: dict = {"model": cfg.model, "messages": chat, "temperature": params.temperature, "max_tokens": params.max_tokens}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def custom_id(row: dict, body: dict) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return f"{row['id']}#{row['sample']}#{digest}"


def request_line(cid: str, body: dict) -> bytes:
    return (json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}) + "\n").encode()


def split_requests(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[int]]:
    """Indices of `lines` per file: at most max_requests lines and max_bytes bytes each (one line over
    max_bytes alone is its own file: the API refuses it, and its rows fail)."""
    files, current, size = [], [], 0
    for i, line in enumerate(lines):
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(i)
        size += len(line)
    if current:
        files.append(current)
    return files


class BatchClient:
    """The files and batches calls of one endpoint (the official client's own retries on 429/5xx)."""

    def __init__(self, cfg: OpenAIModel):
        key = "not-needed" if cfg.api_key_env is None else os.environ.get(cfg.api_key_env, "")
        self.client = openai.AsyncOpenAI(api_key=key, base_url=cfg.base_url, timeout=max(cfg.request_timeout_s, 120.0),
                                         max_retries=cfg.max_retries)
        self.cfg = cfg

    async def upload(self, data: bytes, name: str) -> str:
        return (await self.client.files.create(file=(name, data, "application/jsonl"), purpose="batch")).id

    async def create(self, input_file_id: str, metadata: dict[str, str]):
        return await self.client.batches.create(input_file_id=input_file_id, endpoint=ENDPOINT,
                                                completion_window=self.cfg.batch_api.completion_window,
                                                metadata=metadata)

    async def retrieve(self, batch_id: str):
        return await self.client.batches.retrieve(batch_id)

    async def find_by_input(self, input_file_id: str):
        """The batch made from this input file, if one was created (the newest first; None if none)."""
        async for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                return batch
        return None

    async def results(self, batch, elapsed_s: float) -> dict[str, Completion]:
        """Every line of a finished batch: its completion, or its error as a Completion with `error`."""
        found: dict[str, Completion] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = (await self.client.files.content(file_id)).text
            for raw in text.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    found[line["custom_id"]] = _completion(line, elapsed_s)
        return found

    async def aclose(self) -> None:
        await self.client.close()


def _completion(line: dict, elapsed_s: float) -> Completion:
    response, error = line.get("response") or {}, line.get("error")
    body = response.get("body") or {}
    status = response.get("status_code")
    if error or status != 200:
        detail = error or body.get("error") or {}
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
        return Completion(text=None, latency_s=elapsed_s,
                          error=f"BatchLineFailed: status {status}: {' '.join(str(message or '').split())[:300]}")
    choices = body.get("choices")
    content = choices[0].get("message", {}).get("content") if isinstance(choices, list) and choices else None
    if not isinstance(content, str):
        return Completion(text=None, latency_s=elapsed_s, error="BatchLineFailed: the response has no choices or message content")
    usage = body.get("usage") or {}
    return Completion(text=content, prompt_tokens=usage.get("prompt_tokens") or 0,
                      completion_tokens=usage.get("completion_tokens") or 0, latency_s=elapsed_s)


@dataclass
class Pending:
    """A request waiting for its round: the model that asked, its custom id and body, the caller's future."""

    model: "BatchModel"
    custom_id: str
    body: dict
    future: object
    queued_at: float = field(default_factory=time.monotonic)


class BatchModel:
    """A `mode: batch` model as the method sees it; `rounds` (stages/batch_rounds.Rounds) runs its requests."""

    def __init__(self, cfg: OpenAIModel, rounds):
        self.cfg, self.rounds = cfg, rounds
        self.name = cfg.model
        self.price = batch_price(cfg)
        self.cost = self.price.cost
        self.params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)

    @property
    def group(self) -> tuple[str, str, str | None]:
        """Requests of one group go into the same batches: one endpoint, one model, one key."""
        return self.cfg.base_url.rstrip("/"), self.cfg.model, self.cfg.api_key_env

    async def complete(self, chat: Messages, stop: tuple[str, ...] = (), json_schema: str | None = None) -> Completion:
        """json_schema: refused by the config before a batch run starts (guided decoding is engine vllm's)."""
        params = SamplingParams(temperature=self.params.temperature, max_tokens=self.params.max_tokens, stop=stop)
        body = request_body(self.cfg, chat, params)
        return await self.rounds.request(self, custom_id(CURRENT_ROW.get(), body), body)
