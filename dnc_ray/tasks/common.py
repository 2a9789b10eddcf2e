"""Shared pieces of the task loaders: the error type, the JSONL reader, field checks."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dnc_ray.infra import storage

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class TaskError(ValueError):
    """Task data that cannot be used; the message names file, line (or row) and field."""


def read_records(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """Yield (1-based line or row number, "<file> line|row <n>", record) of a JSONL or .parquet file.

    `path` is a local path or a storage URI (infra/storage.py): hf://datasets/<org>/<name>/<file>
    (Hugging Face, where there is network), s3://, gs://, file://.
    """
    found = False
    if str(path).endswith(".parquet"):
        for number, record in enumerate(_parquet_records(path), start=1):
            found = True
            yield number, f"{path} row {number}", record
    else:
        for number, record in read_jsonl(path):
            found = True
            yield number, f"{path} line {number}", record
    if not found:  # a run over no question would "succeed" with 0 rows
        kind = "no rows" if str(path).endswith(".parquet") else "no records (the file is empty or holds only blank lines)"
        raise TaskError(f"{path}: {kind}")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file."""
    try:
        with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, _parse_object(line, f"{path} line {number}")
    except UnicodeDecodeError:
        raise TaskError(f"{path}: cannot read: not UTF-8 text") from None


def _parquet_records(path: str | Path) -> list[dict]:
    with _open(path) as f:
        try:
            return pq.read_table(f).to_pylist()
        except (OSError, ValueError) as e:
            raise TaskError(f"{path}: cannot read Parquet: {e}") from None


def _open(path: str | Path):
    try:
        return storage.open_input(str(path))
    except Exception as e:  # each filesystem raises its own errors (missing file, no network, no package)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise TaskError(f"{path}: cannot read: {reason}") from None


def _parse_object(line: str, where: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def field(row: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """row[name], checked to exist and to be of type `kind`; `where` is "<file> line <n>"."""
    if name not in row:
        raise TaskError(f'{where}: field "{name}": missing')
    return check_type(row[name], name, kind, where)


def check_type(value: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        expected = " or ".join(k.__name__ for k in kinds)
        raise TaskError(f'{where}: field "{name}": expected {expected}, got {type(value).__name__}')
    return value


def check_split(task: str, split: str, available: tuple[str, ...]) -> None:
    if split not in available:
        raise TaskError(f"task {task} has no split {split!r}; available: {', '.join(available)}")


def make_row(id: str, task: str, split: str, question: str, context: str | None, answers: list[list[str]]) -> dict:
    """The row every loader returns."""
    return {"id": id, "task": task, "split": split, "question": question, "context": context, "answers": answers}
