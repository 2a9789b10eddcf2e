"""What a person reads on the terminal: `dnc generate` and `dnc train` through the CLI show the project's own
lines; Ray's, DeepSpeed's and Transformers' logs go to <output>/logs/ unless --verbose asks for them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dnc_ray.llm.models import TINY_RANDOM

# Lines that buried the project's own ones before (issue "A console a person can read").
NOISE = ["Execution plan", "core_worker.cc", "Loading weights", "Token authentication", "Started a local Ray",
         "Reporting training result", "PlacementGroupCleaner", "RAW: Lock blocking", "real_accelerator",
         "(MapWorker", "(RayTrainWorker", "INFO", "WARNING", "Warning"]


def dnc(*args: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DNC_VERBOSE"}
    command = [sys.executable, "-m", "dnc_ray.cli", *args, *(["--verbose"] if verbose else [])]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def generate_config(tmp_path: Path, ray_address: str, name: str, limit: int) -> Path:
    cfg = {"task": {"name": "gsm8k", "split": "test", "limit": limit}, "strategy": "two_stage",
           "output": str(tmp_path / name), "decomposer": {"engine": "reference"},
           "solver": {"engine": "hf", "model": TINY_RANDOM, "batch_size": 4, "max_tokens": 8, "num_cpus": 1},
           "progress_interval_s": 0.1, "ray": {"address": ray_address}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_quiet(run: subprocess.CompletedProcess) -> None:
    terminal = run.stdout + run.stderr
    assert run.returncode == 0, terminal[-3000:]
    assert not [noise for noise in NOISE if noise in terminal], terminal
    assert all(line.startswith(("[dnc] ", "[generate] ", "[train] ")) for line in terminal.splitlines()), terminal


@pytest.mark.slow
def test_generate_shows_its_progress_and_keeps_rays_logs_in_files(ray_local, tmp_path):
    run = dnc("generate", "--config", str(generate_config(tmp_path, ray_local, "run", limit=8)))
    assert_quiet(run)
    lines = run.stdout.splitlines()
    logs = tmp_path / "run" / "logs"
    assert lines[0] == f"[dnc] logs of Ray, DeepSpeed and Transformers: {logs}/driver.log and workers.log " \
                       "(dnc --verbose shows them here)"
    assert lines[1].startswith("[generate] two_stage on gsm8k/test: 8 rows, 0 done earlier, 8 to run")
    assert any(line.startswith("[generate] 8/8 rows (100%)") for line in lines)
    assert lines[-1].startswith("[generate] finished: 8 rows run (0 failed)")
    assert "Execution plan" in (logs / "driver.log").read_text()  # the noise went to the files
    assert "(MapWorker(MapBatches(MethodStage)) pid=" in (logs / "workers.log").read_text()

    verbose = dnc("generate", "--config", str(generate_config(tmp_path, ray_local, "loud", limit=2)), verbose=True)
    assert verbose.returncode == 0 and "Execution plan" in verbose.stderr and "(MapWorker" in verbose.stdout + verbose.stderr
    assert not (tmp_path / "loud" / "logs").exists()


@pytest.mark.slow
def test_train_shows_each_logged_step_once_and_keeps_ray_train_logs_in_files(ray_local, tmp_path):
    prompt = [{"role": "user", "content": "Break the question into sub-questions.\nQuestion: Tom has 3 apples."}]
    rows = [{"id": f"q{i}", "task": "gsm8k", "variant": "sd-t", "prompt": prompt, "target": "How many?"}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    cfg = {"train_set": str(tmp_path / "train.parquet"), "variant": "sd-t", "model": TINY_RANDOM,
           "output": str(tmp_path / "student"), "max_length": 64, "max_steps": 2, "per_worker_batch_size": 2,
           "checkpoint_every_steps": 2, "log_every_steps": 1, "num_workers": 1, "cpus_per_worker": 1,
           "ray": {"address": ray_local}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    run = dnc("train", "--config", str(tmp_path / "train.yaml"))
    assert_quiet(run)
    steps = [line for line in run.stdout.splitlines() if line.startswith("[train] step ")]
    assert [line.split()[2] for line in steps] == ["1/2", "2/2"], run.stdout
    assert all(" tok/s " in line and " eta " in line for line in steps)
    assert run.stdout.splitlines()[-1].startswith("[train] done: steps 2")
    workers_log = (tmp_path / "student" / "logs" / "workers.log").read_text()
    assert "Reporting training result" in workers_log
    assert "scheduler before it has started" not in workers_log  # DeepSpeed's warm-up schedules read it early


def test_the_served_app_says_one_line_per_request(capsys):
    """`dnc serve`'s terminal: method, route, status and latency of each request, refused ones included."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from dnc_ray.serve.api import Guard

    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return body

    app.add_middleware(Guard, token=None, max_body_bytes=64)
    with TestClient(app) as client:
        assert client.post("/v1/echo", json={"a": 1}).status_code == 200
        assert client.post("/v1/echo", content=b"x" * 65).status_code == 413
        assert client.get("/healthz").status_code == 404  # health checks are not logged
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" ", 2)[0] for line in lines] == ["[serve] POST /v1/echo 200", "[serve] POST /v1/echo 413"]
    assert all(line.endswith(" ms") and line.rsplit(" ", 2)[1].isdigit() for line in lines)


def test_lines_name_the_scope_they_run_in(capsys):
    """A study runs many cells at once: each of a cell's lines names it after the tag, and only within it."""
    from dnc_ray.infra import console

    with console.scope("gsm8k/student/sd-t"):
        console.say("[train] step 1/2  loss 10.7")
        console.say("not one of ours [train] ")
    console.say("[generate] 8/8 rows (100%)")
    assert capsys.readouterr().out.splitlines() == [
        "[train] gsm8k/student/sd-t: step 1/2  loss 10.7", "not one of ours [train] ", "[generate] 8/8 rows (100%)"]
