"""RunStore: latest part wins, half-written parts are invisible, done keys are the successes."""

from __future__ import annotations

import os

from dnc_ray.method.row import new_row, to_table
from dnc_ray.stages.store import RunStore


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


# ---------------------------------------------------------------- the lease: one driver per output (issue 12, item 2)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from dnc_ray.infra.lease import Lease, LeaseHeld, LeaseLost  # noqa: E402


def write_lease(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    held = {"owner": "someone-else", "host": "elsewhere", "pid": 1, "heartbeat": time.time(), "ttl_s": 60.0, **fields}
    (folder / "lease.json").write_text(json.dumps(held))


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path):
    with Lease(str(tmp_path / "run"), settle_s=0):
        held = json.loads((tmp_path / "run" / "lease.json").read_text())
        assert held["pid"] == os.getpid() and held["owner"]
        with pytest.raises(LeaseHeld) as info:
            Lease(str(tmp_path / "run"), settle_s=0).acquire()
        message = str(info.value)
        assert "\n" not in message and f"is in use by another driver (pid {os.getpid()} on " in message
    assert not (tmp_path / "run" / "lease.json").exists()  # released
    with Lease(str(tmp_path / "run"), settle_s=0):  # free again
        pass


def test_the_lease_of_a_killed_driver_on_this_machine_is_taken_over_at_once(tmp_path):
    from dnc_ray.infra.lease import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(tmp_path / "run", host=_host(), pid=dead.pid)  # a fresh heartbeat, but its process is gone
    with Lease(str(tmp_path / "run"), settle_s=0) as lease:
        assert json.loads((tmp_path / "run" / "lease.json").read_text())["owner"] == lease.owner


def test_a_lease_held_on_another_machine_is_free_once_its_heartbeat_is_older_than_the_ttl(tmp_path):
    write_lease(tmp_path / "run", heartbeat=time.time() - 30)
    with pytest.raises(LeaseHeld, match=r"pid 1 on elsewhere, heartbeat 30s ago"):
        Lease(str(tmp_path / "run"), settle_s=0).acquire()
    write_lease(tmp_path / "run", heartbeat=time.time() - 61)
    with Lease(str(tmp_path / "run"), settle_s=0):
        pass


def test_a_garbled_lease_is_free(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text('{"owner": "x", "hea')
    with Lease(str(tmp_path / "run"), settle_s=0):
        pass


def test_a_driver_whose_lease_was_taken_over_stops_at_its_next_write(tmp_path):
    lease = Lease(str(tmp_path / "run"), refresh_s=0.05, settle_s=0)
    with lease:
        lease.check()
        write_lease(tmp_path / "run")  # another driver wrote its lease over this one's
        deadline = time.monotonic() + 30
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="another driver .* took over the lease"):
            lease.check()
    assert json.loads((tmp_path / "run" / "lease.json").read_text())["owner"] == "someone-else"  # left alone


def test_two_drivers_taking_a_free_lease_at_once_one_is_refused(tmp_path):
    first, second = Lease(str(tmp_path / "run"), settle_s=0), Lease(str(tmp_path / "run"), settle_s=0)
    first._write()
    second._write()  # the later write wins: the first one, reading back, is refused
    assert first.holder()["owner"] == second.owner
    with pytest.raises(LeaseHeld):
        first.refuse_if_held()


# ---------------------------------------------------------------- a damaged run.json is rebuilt (issue 12, item 3)

from dnc_ray.config import GenerateConfig
from dnc_ray.infra.errors import ConfigError
from dnc_ray.stages.run_record import load_meta, run_identity


def two_stage(out, **fields) -> GenerateConfig:
    teacher = {"engine": "openai", "model": "teacher", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    return GenerateConfig.model_validate({"task": {"name": "gsm8k"}, "strategy": "two_stage", "output": str(out),
                                          "decomposer": teacher, "solver": teacher, **fields})


def solved(qid: str, error: str | None = None) -> dict:
    return {**row(qid, error=error, solution="s"), "decomposer": "teacher", "solver": "teacher", "prediction": "1"}


@pytest.mark.parametrize("damage", [b'{"identity": {"task": {"na', b"", b"\xff\xfe", b'{"identity": {}}'])
def test_a_damaged_run_json_is_rebuilt_from_the_config_when_the_rows_match(tmp_path, damage):
    cfg = two_stage(tmp_path / "run")
    store = RunStore(cfg.output)
    store.write_rows(to_table([solved("a"), solved("b", error="solve: unfinished (...)")]))
    (tmp_path / "run" / "run.json").write_bytes(damage)
    meta, warning = load_meta(store, cfg)
    assert meta["identity"] == run_identity(cfg)
    [recovered] = meta["attempts"]
    assert recovered["rows"] == 2 and recovered["errors"] == 1 and recovered["recovered"]
    assert warning.startswith(f"{cfg.output}/run.json: ") and "rebuilt from this config" in warning
    assert "the 2 rows in rows/ (1 failed or unfinished, to be retried)" in warning and "history" in warning


def test_run_json_missing_beside_rows_is_rebuilt_too(tmp_path):
    cfg = two_stage(tmp_path / "run")
    RunStore(cfg.output).write_rows(to_table([solved("a")]))
    meta, warning = load_meta(RunStore(cfg.output), cfg)
    assert "run.json: missing, but rows/ holds rows" in warning and meta["attempts"][0]["rows"] == 1


@pytest.mark.parametrize("fields, why", [
    ({"task": {"name": "gsm8k", "split": "train"}}, "is of gsm8k/test, the config runs gsm8k/train"),
    ({"solver": {"engine": "hf"}}, "has solver teacher, the config smollm2-135m-instruct"),
])
def test_a_damaged_run_json_is_not_rebuilt_over_rows_of_another_run(tmp_path, fields, why):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows(to_table([solved("a")]))
    (tmp_path / "run" / "run.json").write_text("{trunc")
    with pytest.raises(ConfigError, match="it cannot be rebuilt from this config") as info:
        load_meta(store, two_stage(tmp_path / "run", **fields))
    assert why in str(info.value)


def test_an_intact_run_json_is_read_as_is(tmp_path):
    cfg = two_stage(tmp_path / "run")
    store = RunStore(cfg.output)
    store.write_meta({"identity": run_identity(cfg), "config": {}, "attempts": [{"rows": 3}]})
    assert load_meta(store, cfg) == ({"identity": run_identity(cfg), "config": {}, "attempts": [{"rows": 3}]}, None)


def test_many_parts_are_merged_into_one_keeping_each_keys_latest_row(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows(to_table([row("a", error="solve: unfinished (...)"), row("b", solution="b1")]))
    store.write_rows(to_table([row("a", solution="a2")]))
    store.write_rows(to_table([row("c", error="decompose: timeout")]))
    before = store.read_rows()
    assert store.compact(above=3) == 0 and len(store.part_names()) == 3  # few parts: left alone
    assert store.compact(above=2) == 3
    assert len(store.part_names()) == 1 and store.read_rows() == before
    assert {r["id"]: r["solution"] for r in store.read_rows()} == {"a": "a2", "b": "b1", "c": None}
