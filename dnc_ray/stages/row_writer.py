"""The driver's writer of a run: rows sent by the MethodStage actors (a Ray queue) as they finish a step, and each
finished batch, written as Parquet parts every 0.5 s from a thread of its own (the lease checked at each write)."""

from __future__ import annotations

import queue
import threading
import time

import pyarrow as pa
from ray.util.queue import Empty as SinkEmpty

from dnc_ray.infra.lease import Lease
from dnc_ray.infra.progress import Progress
from dnc_ray.method.row import row_key, to_table
from dnc_ray.stages.method_stage import is_unfinished
from dnc_ray.stages.score import score_rows
from dnc_ray.stages.store import RunStore


class RowWriter:
    """Writes rows as Parquet parts from two sources, in the order their states were reached: the rows
    the MethodStage actors send to `sink`, and the batches Ray Data hands over (their rows already
    written from the sink are skipped: the sink had them first, their batch left the actor after).

    With a sink, one writer thread does all the writing: it takes rows from the sink as they arrive
    and writes them as one part every `every_s` (0.5 s), and before writing a batch handed over by
    `batch_done` it writes whatever the sink holds. Without one, `batch_done` writes at once. A row
    is counted as done (progress) once, when its last state is written; an unfinished row (a step
    still to run) is written, not counted. At the end of an attempt the parts are merged
    (RunStore.compact) when there are many.
    """

    _CLOSE = object()

    def __init__(self, store: RunStore, lease: Lease, progress: Progress, scorer, sink, wait_s: float = 0.1,
                 every_s: float = 0.5):
        self.store, self.lease, self.progress, self.scorer, self.sink = store, lease, progress, scorer, sink
        self._done: set[tuple[str, int]] = set()
        self.error: BaseException | None = None
        self._batches: queue.Queue = queue.Queue()
        self._thread = None
        if sink is not None:
            self._thread = threading.Thread(target=self._write_loop, args=(wait_s, every_s), name="dnc-rows",
                                            daemon=True)
            self._thread.start()

    def batch_done(self, batch: pa.Table) -> None:
        self._raise_error()
        if self._thread is None:
            self._write_batch(batch)
        else:
            self._batches.put(batch)

    def close(self) -> None:
        """Write what is left (what the actors finished is written even when the pipeline failed)."""
        if self._thread is not None:
            self._batches.put(self._CLOSE)
            self._thread.join()
        self._raise_error()

    def _write_loop(self, wait_s: float, every_s: float) -> None:
        """Rows from the sink are written at most every `every_s` (one part each time: a crash loses at
        most that much finished work, and a run does not become thousands of parts); before a batch,
        whatever the sink holds is written first."""
        pending: dict[tuple[str, int], dict] = {}  # each key's latest state sent, not yet written
        written_at = 0.0
        try:
            while True:
                try:
                    batch = self._batches.get_nowait()
                except queue.Empty:
                    self._take(pending, wait_s)
                    if pending and time.monotonic() - written_at >= every_s:
                        self._write_sent(pending)
                        written_at = time.monotonic()
                    continue
                self._take(pending, 0)  # everything the actors sent before this batch left them
                if pending:
                    self._write_sent(pending)
                    written_at = time.monotonic()
                if batch is self._CLOSE:
                    return
                self._write_batch(batch)
        except BaseException as e:  # noqa: BLE001 - raised in the main thread by batch_done / close
            self.error = e

    def _write_batch(self, batch: pa.Table) -> None:
        rows = [r for r in batch.to_pylist() if row_key(r) not in self._done]
        if rows:
            self._write(rows)

    def _take(self, pending: dict, wait_s: float) -> None:
        """Add what is in the sink to `pending`, waiting up to `wait_s` for something to arrive."""
        sent = []
        if wait_s:
            try:
                sent.append(self.sink.get(block=True, timeout=wait_s))
            except SinkEmpty:
                return
        waiting = self.sink.qsize()
        if waiting:
            sent += self.sink.get_nowait_batch(waiting)
        for rows in sent:
            for row in rows:
                pending.pop(row_key(row), None)  # a row sent again: its later state, in its later place
                pending[row_key(row)] = row

    def _write_sent(self, pending: dict) -> None:
        rows = list(pending.values())
        pending.clear()
        if self.scorer is not None:
            score_rows(rows, self.scorer)
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        self.lease.check()
        self.store.write_rows(to_table(rows))
        finished = [r for r in rows if not is_unfinished(r) and row_key(r) not in self._done]
        self._done.update(row_key(r) for r in finished)
        self.progress.update(len(finished), sum(r["error"] is not None for r in finished))

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error
