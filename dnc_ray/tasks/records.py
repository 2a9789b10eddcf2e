"""A user's own JSONL or Parquet file, its columns mapped onto row fields by TaskConfig.fields."""

from __future__ import annotations

from dnc_ray.tasks.common import TaskError, check_type, field, make_row, read_records

ROW_FIELDS = ("question", "answers", "context", "id")


def load(path: str, fields: dict[str, str] | None, split: str) -> list[dict]:
    """Rows of `path` (.parquet, else JSONL); `fields` maps row field -> column, default the same name."""
    columns = _columns(path, fields or {})
    rows, ids = [], set()
    for number, where, raw in read_records(path):
        row = _row(raw, columns, where, number - 1, split)
        if row["id"] in ids:
            raise TaskError(f'{where}: field "{columns["id"]}": duplicate id {row["id"]!r}')
        ids.add(row["id"])
        rows.append(row)
    return rows


def _columns(path: str, fields: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(fields) - set(ROW_FIELDS))
    if unknown:
        raise TaskError(f"{path}: fields: unknown row field {unknown[0]!r}; known: {', '.join(ROW_FIELDS)}")
    return {name: fields.get(name, name) for name in ROW_FIELDS}


def _row(raw: dict, columns: dict[str, str], where: str, index: int, split: str) -> dict:
    question = field(raw, columns["question"], str, where)
    answers = _answers(field(raw, columns["answers"], (str, list), where), columns["answers"], where)
    context = check_type(raw.get(columns["context"]), columns["context"], (str, type(None)), where)
    id = check_type(raw.get(columns["id"], f"records-{index}"), columns["id"], (str, int), where)
    return make_row(str(id), "records", split, question, context, answers)


def _answers(value: str | list, column: str, where: str) -> list[list[str]]:
    """A string, a list of strings (alternative answers) or a list of span lists -> list of span lists."""
    answers = [[value]] if isinstance(value, str) else [a if isinstance(a, list) else [a] for a in value]
    if not answers or not all(answers) or not all(isinstance(s, str) and s.strip() for spans in answers for s in spans):
        raise TaskError(
            f'{where}: field "{column}": expected a string, a list of strings or a list of lists of strings, none empty'
        )
    return answers
