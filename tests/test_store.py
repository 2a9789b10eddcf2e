"""RunStore: latest part wins, half-written parts are invisible, done keys are the successes."""

from __future__ import annotations

from dnc_ray.infra.store import RunStore
from dnc_ray.method.row import new_row, to_table


def row(qid: str, error: str | None = None, solution: str | None = None) -> dict:
    base = new_row({"id": qid, "task": "gsm8k", "split": "test", "question": "q?", "context": None,
                    "answers": [["1"]]})
    return {**base, "error": error, "solution": solution}


def test_latest_part_wins_and_done_keys_are_successes(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows(to_table([row("a", error="solve: timeout"), row("b", solution="first")]))
    assert store.done_keys() == {("b", 0)}
    store.write_rows(to_table([row("a", solution="retried")]))
    assert {r["id"]: r["solution"] for r in store.read_rows()} == {"a": "retried", "b": "first"}
    assert store.done_keys() == {("a", 0), ("b", 0)}


def test_a_part_cut_off_mid_write_is_ignored(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows(to_table([row("a", solution="ok")]))
    (tmp_path / "run" / "rows" / "part-9999999999999999999-1-000001.parquet.tmp").write_bytes(b"PAR1 half")
    assert [r["id"] for r in store.read_rows()] == ["a"]
