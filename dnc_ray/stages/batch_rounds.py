"""A `dnc generate` run with a `mode: batch` model: the strategy's steps in rounds of Batch API jobs.

Every row runs as its own coroutine in the driver through the same `run_row` as on Ray Data. A batch-mode
model's call does not go out at once: it joins the current round and the row waits. When every row is
either waiting or done, the round is submitted: per endpoint and model, the waiting requests as JSONL
files (split within `batch_api.max_requests` and `max_bytes`), uploaded, one batch each, polled every
`batch_api.poll_s` (a progress line every `progress_interval_s`); the results are handed back by custom
id, and the rows go on to their next call, which makes the next round. So one round serves one step or
turn of every row that is at one:

    direct     1 round                  (the answer)
    decompose  1 round                  (the decomposition)
    solve      1 round                  (the answer over an earlier run's decompositions)
    two_stage  2 rounds                 (decompositions, then answers)
    self_ask   up to 2 x max_turns      (a decomposer turn, then the solver's answer to its follow-up,
               rounds                    ...; a row that has its final answer leaves the rounds)

An online model in the same run (e.g. an `openai` decomposer with a batch-mode solver) is called at once
from the driver, rate limits and retries as usual; a round waits for those calls too. `hf` models are not
allowed here (the config refuses them): their step is a run of its own on Ray Data. No Ray is needed.

What a restarted driver finds: each batch is recorded in run.json (`batches`: the input file as soon as it
is uploaded, then the batch id as soon as it is created). A driver that starts where an attempt did not
finish first waits for that attempt's batches (one created but not recorded is found by its input file),
and keeps their successful lines by custom id: a row that asks the same request again gets that line,
paid once, without a new batch. Failed lines become row errors (`<step>: BatchLineFailed: status ...`),
retried by the next run like any failed row. Rows are written after each round: finished ones, and those
with a step still to run as unfinished (resumed at that step).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import datetime as dt
import time
from collections.abc import Callable

from dnc_ray.config import GenerateConfig
from dnc_ray.infra import console
from dnc_ray.llm.batch_api import CURRENT_ROW, TERMINAL, BatchClient, BatchModel, Pending, request_line, split_requests
from dnc_ray.llm.budget import BudgetedModel, Ledger, LocalLedger
from dnc_ray.llm.chat_model import ChatModel
from dnc_ray.llm.configs import OpenAIModel, ReferenceModel
from dnc_ray.llm.engine import Completion
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.method import STRATEGIES, run_row
from dnc_ray.method.row import row_key, to_table
from dnc_ray.stages.method_stage import unfinished_error
from dnc_ray.stages.reference import reference_decompose
from dnc_ray.stages.score import score_rows
from dnc_ray.tasks import scorer


def uses_batch_api(cfg: GenerateConfig) -> bool:
    return any(isinstance(m := getattr(cfg, role), OpenAIModel) and m.mode == "batch"
               for role in STRATEGIES[cfg.strategy].roles)


def run_rounds(cfg: GenerateConfig, todo: list[dict], writer, meta: dict, save_meta: Callable[[], None],
               options, spent_before_usd: float) -> dict | None:
    """Run `todo` in batch rounds; rows go to `writer` (a RowWriter); returns the budget's summary, if any."""
    return asyncio.run(Rounds(cfg, writer, meta, save_meta, options, spent_before_usd).run(todo))


class Rounds:
    def __init__(self, cfg: GenerateConfig, writer, meta: dict, save_meta, options, spent_before_usd: float):
        self.cfg, self.writer, self.meta, self.save_meta, self.options = cfg, writer, meta, save_meta, options
        self.strategy = STRATEGIES[cfg.strategy]
        self.scorer = scorer(cfg.task) if cfg.strategy != "decompose" else None
        self.attempt = len(meta["attempts"]) - 1
        meta.setdefault("batches", [])
        self.ledger = LocalLedger(Ledger(cfg.budget_usd, spent_before_usd)) if cfg.budget_usd is not None else None
        self.queue: list[Pending] = []
        self.cache: dict[str, Completion] = {}
        self.clients: dict[tuple, BatchClient] = {}
        self.engines: list[OpenAIEngine] = []  # the online models' (closed at the end)
        self.snapshots: list[dict] = []
        self.active = 0
        self.round = 0
        self._idle: asyncio.Event | None = None
        self._printed = 0.0

    # -- the models ----------------------------------------------------------------------------
    def _models(self) -> dict[str, object]:
        models = {}
        for role in self.strategy.roles:
            cfg = getattr(self.cfg, role)
            if isinstance(cfg, ReferenceModel):
                continue
            if cfg.mode == "batch":
                model = BatchModel(cfg, self)
                self.clients.setdefault(model.group, BatchClient(cfg))
            else:
                engine = OpenAIEngine(cfg)
                self.engines.append(engine)
                model = ChatModel(cfg, engine)
            if self.ledger is not None:  # a batch-mode model's requests are all in flight in their round
                model = BudgetedModel(model, self.ledger, None if cfg.mode == "batch" else cfg.max_in_flight)
            models[role] = model
        return models

    # -- the run -------------------------------------------------------------------------------
    async def run(self, todo: list[dict]) -> dict | None:
        self._idle = asyncio.Event()
        models = self._models()
        try:
            await self._pick_up_earlier_batches({row_key(r) for r in todo})
            rows = todo
            if isinstance(getattr(self.cfg, "decomposer", None), ReferenceModel):
                rows = reference_decompose(to_table(rows)).to_pylist()
            loop = asyncio.get_running_loop()
            self.active = len(rows)
            tasks = []
            for row in rows:
                context = contextvars.copy_context()
                context.run(CURRENT_ROW.set, row)
                tasks.append(loop.create_task(self._run_row(row, models), context=context))
            while self.active or self.queue:
                await self._idle.wait()
                self._idle.clear()
                if self.active == 0 and self.queue:
                    self._flush()
                    await self._round()
            await asyncio.gather(*tasks)  # an engine bug in a row raises here
            self._flush()
        finally:
            for client in [*self.clients.values(), *self.engines]:
                await client.aclose()
        return await self.ledger.summary() if self.ledger is not None else None

    async def _run_row(self, row: dict, models: dict) -> None:
        try:
            await run_row(self.strategy, row, models, self.options, self._unfinished)
            self.snapshots.append(copy.deepcopy(row))
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def _unfinished(self, row: dict, next_step) -> None:
        self.snapshots.append({**copy.deepcopy(row), "error": unfinished_error(next_step.name)})

    def _flush(self) -> None:
        """Write every row state reached since the last flush (a row's latest only)."""
        latest = {row_key(r): r for r in self.snapshots}
        self.snapshots = []
        if latest:
            rows = list(latest.values())
            if self.scorer is not None:
                score_rows(rows, self.scorer)
            self.writer.batch_done(to_table(rows))

    async def request(self, model: BatchModel, cid: str, body: dict) -> Completion:
        """A batch-mode call: a line kept from an earlier driver, else a place in the next round."""
        if cid in self.cache:
            return self.cache.pop(cid)
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(model, cid, body, future))
        self.active -= 1
        if self.active == 0:
            self._idle.set()
        return await future

    # -- a round -------------------------------------------------------------------------------
    async def _round(self) -> None:
        pending, self.queue = self.queue, []
        self.round += 1
        groups: dict[tuple, list[Pending]] = {}
        for p in pending:
            groups.setdefault(p.model.group, []).append(p)
        started = time.monotonic()
        parts: list[tuple[dict, list[Pending]]] = []
        for group, items in groups.items():
            settings = items[0].model.cfg.batch_api
            lines = [request_line(p.custom_id, p.body) for p in items]
            files = split_requests(lines, settings.max_requests, settings.max_bytes)
            console.say(f"[batch] round {self.round}: {len(items)} requests to {group[1]} in {len(files)} batch(es)")
            for part, indices in enumerate(files, 1):
                record = await self._submit(group, b"".join(lines[i] for i in indices), part, len(indices))
                parts.append((record, [items[i] for i in indices]))
        finished = await asyncio.gather(*(self._wait(record) for record, _ in parts))
        answers: list[tuple[Pending, Completion]] = []
        for (record, items), batch in zip(parts, finished, strict=True):
            elapsed = time.monotonic() - started
            found = await self._results(record, batch, elapsed)
            for p in items:
                answers.append((p, found.get(p.custom_id) or Completion(text=None, latency_s=elapsed, error=_missing(record))))
        self.active += len(answers)  # before any of them runs on
        for p, completion in answers:
            p.future.set_result(completion)

    async def _submit(self, group: tuple, data: bytes, part: int, requests: int) -> dict:
        client = self.clients[group]
        file_id = await client.upload(data, f"dnc-round{self.round}-part{part}.jsonl")
        record = {"attempt": self.attempt, "round": self.round, "part": part, "base_url": group[0], "model": group[1],
                  "api_key_env": group[2], "requests": requests, "input_file_id": file_id, "batch_id": None,
                  "status": "uploaded", "created": _now()}
        self.meta["batches"].append(record)
        self.save_meta()  # before the batch exists: a driver killed next finds it by its input file
        batch = await client.create(file_id, {"dnc_output": self.cfg.output[-500:], "dnc_round": str(self.round)})
        record.update(batch_id=batch.id, status=batch.status)
        self.save_meta()
        return record

    async def _wait(self, record: dict):
        client = self.clients[(record["base_url"], record["model"], record["api_key_env"])]
        poll_s = self._poll_s(record)
        started = time.monotonic()
        while True:
            batch = await client.retrieve(record["batch_id"])
            if batch.status != record["status"]:
                record["status"] = batch.status
                self.save_meta()
            if batch.status in TERMINAL:
                return batch
            now = time.monotonic()
            if now - self._printed >= self.cfg.progress_interval_s:
                self._printed = now
                counts = batch.request_counts
                done = f"{counts.completed}/{counts.total} requests done, {counts.failed} failed" if counts else ""
                console.say(f"[batch] round {record['round']} part {record['part']}: {batch.id} {batch.status}, {done} | "
                            f"waiting {now - started:.0f}s")
            await asyncio.sleep(poll_s)

    def _poll_s(self, record: dict) -> float:
        for role in self.strategy.roles:
            m = getattr(self.cfg, role)
            if isinstance(m, OpenAIModel) and (m.base_url.rstrip("/"), m.model) == (record["base_url"], record["model"]):
                return m.batch_api.poll_s
        return 30.0

    async def _results(self, record: dict, batch, elapsed_s: float) -> dict[str, Completion]:
        client = self.clients[(record["base_url"], record["model"], record["api_key_env"])]
        found = await client.results(batch, elapsed_s)
        counts = {"ok": sum(c.error is None for c in found.values()), "failed": sum(c.error is not None for c in found.values())}
        record.update(status=batch.status, lines=counts, finished=_now())
        if batch.status == "failed" and batch.errors and batch.errors.data:
            record["errors"] = [e.message for e in batch.errors.data][:5]
        self.save_meta()
        console.say(f"[batch] round {record['round']} part {record['part']}: {batch.id} {batch.status}: {counts['ok']} lines "
                    f"answered, {counts['failed']} failed")
        return found

    # -- a restarted driver --------------------------------------------------------------------
    async def _pick_up_earlier_batches(self, keys: set[tuple[str, int]]) -> None:
        """Wait for the batches of attempts that did not finish; keep their successful lines for `keys`' rows."""
        attempts = self.meta["attempts"]
        earlier = [r for r in self.meta["batches"] if r["attempt"] != self.attempt and r["attempt"] < len(attempts)
                   and attempts[r["attempt"]].get("finished") is None and "recovered" not in attempts[r["attempt"]]]
        earlier = [r for r in earlier if (r["base_url"], r["model"], r["api_key_env"]) in self.clients]
        if not earlier:
            return
        for record in earlier:
            if record["batch_id"] is None:  # killed between upload and create: was it created?
                batch = await self.clients[(record["base_url"], record["model"], record["api_key_env"])].find_by_input(
                    record["input_file_id"])
                record.update(batch_id=batch.id if batch else None, status=batch.status if batch else "never created")
        self.save_meta()
        earlier = [r for r in earlier if r["batch_id"] is not None]
        console.say(f"[batch] picking up {len(earlier)} batch(es) of an earlier driver: "
                    f"{', '.join(r['batch_id'] for r in earlier)}")
        finished = await asyncio.gather(*(self._wait(r) for r in earlier))
        for record, batch in zip(earlier, finished, strict=True):
            found = await self._results(record, batch, 0.0)
            kept = {cid: c for cid, c in found.items() if c.error is None and _key_of(cid) in keys}
            self.cache.update(kept)
            console.say(f"[batch] {batch.id}: {len(kept)} answered lines kept for rows still to run")


def _key_of(cid: str) -> tuple[str, int]:
    row_id, sample, _ = cid.rsplit("#", 2)
    return row_id, int(sample)


def _missing(record: dict) -> str:
    """The error of a request its batch did not answer."""
    if record["status"] == "failed":
        why = "; ".join(record.get("errors", [])) or "no reason given"
        return f"BatchFailed: batch {record['batch_id']} failed: {why}"[:400]
    return f"BatchLineFailed: batch {record['batch_id']} ended {record['status']} before running this request"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
