"""A run's output folder: Parquet parts written as batches finish, plus run.json; a local path or a storage URI.

Resume rule: a re-run skips the keys whose latest row succeeded and retries the others; when the
same key was written more than once, the latest part wins. A crash loses only batches in flight.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from dnc_ray.infra import storage
from dnc_ray.infra.errors import ConfigError
from dnc_ray.method.row import ROW_SCHEMA, row_key, to_table

COMPACT_ABOVE = 64  # parts an output may hold at the end of an attempt before they are merged into one


class DamagedRunRecord(ConfigError):
    """run.json is there but not a readable run record (truncated, edited, overwritten)."""


class RunStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = storage.filesystem(uri)
        self._seq = 0

    def exists(self) -> bool:
        return storage.exists(storage.join(self.uri, "run.json"))

    def read_meta(self) -> dict:
        """run.json; DamagedRunRecord when it cannot be read as a run record."""
        data = storage.read_bytes(storage.join(self.uri, "run.json"))
        try:
            meta = json.loads(data.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError is one
            raise DamagedRunRecord(f"{self.uri}/run.json: not valid JSON ({e}); is this a dnc run?") from None
        missing = {"identity", "config", "attempts"} - set(meta if isinstance(meta, dict) else ())
        if missing or not isinstance(meta["attempts"], list):
            what = f"missing {', '.join(sorted(missing))}" if missing else "attempts is not a list"
            raise DamagedRunRecord(f"{self.uri}/run.json: not a dnc run record ({what})")
        return meta

    def has_rows(self) -> bool:
        return bool(self._parts())

    def part_names(self) -> list[str]:
        """The Parquet parts written so far (a cheap listing: whether someone wrote since)."""
        return self._parts()

    def keep_damaged_meta(self) -> str:
        """Copy run.json aside (run.json.damaged-<time>) before it is rebuilt; returns the copy's name."""
        name = f"run.json.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        path = storage.join(self.uri, "run.json")
        if storage.exists(path):
            storage.write_bytes(storage.join(self.uri, name), storage.read_bytes(path))
        return name

    def write_meta(self, meta: dict) -> None:
        """Atomic: a crash mid-write leaves the previous run.json, never a truncated one."""
        storage.write_text(storage.join(self.uri, "run.json"), json.dumps(meta, indent=2))

    def write_rows(self, table: pa.Table) -> None:
        """One new Parquet part; names sort by write time so that the latest part wins on read.

        Written under a temporary name and then renamed, so a crash mid-write leaves no part.
        """
        self.fs.create_dir(f"{self.root}/rows", recursive=True)
        self._seq += 1
        name = f"{self.root}/rows/part-{time.time_ns()}-{os.getpid()}-{self._seq:06d}.parquet"
        pq.write_table(table.cast(ROW_SCHEMA), f"{name}.tmp", filesystem=self.fs)
        self.fs.move(f"{name}.tmp", name)

    def read_rows(self, parts: list[str] | None = None) -> list[dict]:
        """Every key's latest row, in key order (of `parts`, default every part)."""
        latest: dict[tuple[str, int], dict] = {}
        for part in self._parts() if parts is None else parts:
            for row in pq.read_table(part, filesystem=self.fs, schema=ROW_SCHEMA).to_pylist():
                latest[row_key(row)] = row
        return [latest[k] for k in sorted(latest)]

    def compact(self, above: int = COMPACT_ABOVE) -> int:
        """When there are more than `above` parts (rows are written as they finish: many small parts),
        rewrite every key's latest row as one part, then delete the others; returns how many were merged.

        Only under the output's lease (no other writer). A crash between the two steps leaves both:
        the new part is the latest, so every key still reads the same.
        """
        parts = self._parts()
        if len(parts) <= above:
            return 0
        self.write_rows(to_table(self.read_rows(parts)))
        for part in parts:
            self.fs.delete_file(part)
        return len(parts)

    def done_keys(self) -> set[tuple[str, int]]:
        return {row_key(r) for r in self.read_rows() if r["error"] is None}

    def _parts(self) -> list[str]:
        return [f"{self.root}/rows/{name}" for name in storage.list_files(storage.join(self.uri, "rows"), ".parquet")]
