"""The cluster path: manifests that parse and point at real files, and the pipeline as a `ray job submit`
job on a local multi-node Ray (head + worker on loopback), re-submitted to reuse finished stages."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from dnc_ray.config import PipelineConfig, load_config

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def test_manifests_parse_and_point_at_real_entrypoints_and_configs():
    manifests = sorted((ROOT / "cluster").rglob("*.yaml"))
    assert {p.name for p in manifests} >= {"raycluster.yaml", "rayjob-pipeline.yaml", "rayservice.yaml", "aws.yaml"}
    for path in manifests:
        assert list(yaml.safe_load_all(path.read_text())), path
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-pipeline.yaml").read_text())
    _, script, flag, config = job["spec"]["entrypoint"].split()
    assert (ROOT / script).exists() and flag == "--config"
    load_config(ROOT / config, PipelineConfig)
    service = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema

    served = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert served.applications[0].import_path == "dnc_ray.serve.app:build_app"
    assert yaml.safe_load((ROOT / "cluster/serve_config.yaml").read_text())["applications"] == yaml.safe_load(
        service["spec"]["serveConfigV2"])["applications"]


@pytest.mark.parametrize("stage", ["generate", "distill", "train", "evaluate", "pipeline", "study"])
def test_job_entrypoints_run_their_dnc_command(stage, monkeypatch, capsys, tmp_path):
    """`python jobs/<stage>.py ARGS` (what `ray job submit` runs) is `dnc <stage> ARGS`: its usage, and a
    user error as the CLI reports it, with the CLI's exit status."""

    def run(*args: str) -> int | str | None:
        monkeypatch.setattr(sys, "argv", [f"jobs/{stage}.py", *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "jobs" / f"{stage}.py"), run_name="__main__")
        return exit_.value.code

    assert run("--help") == 0
    assert capsys.readouterr().out.startswith(f"usage: dnc {stage} ")
    if stage in ("generate", "train", "pipeline", "study"):
        missing = tmp_path / "missing.yaml"
        assert run("--config", str(missing)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dnc {stage}: error: {missing}: cannot read config"), err


@pytest.fixture
def local_cluster():
    """A head and one worker on 127.0.0.2/127.0.0.3, stopped (its own process groups only) at the end."""
    folder = tempfile.mkdtemp(prefix="dnc-c", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DNC_CLUSTER_DIR": folder,
           "DNC_CLUSTER_PORT": str(free_port()), "DNC_DASHBOARD_PORT": str(dashboard),
           "DNC_HEAD_CPUS": "2", "DNC_WORKER_CPUS": "2", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    script = str(ROOT / "cluster" / "local_cluster.sh")
    try:
        subprocess.run([script, "start", "1"], env=env, check=True, timeout=700)  # the script waits up to 2 x 300 s
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([script, "stop"], env=env, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def submit(address: str, env: dict, config: Path, submission_id: str) -> tuple[str, str]:
    """`ray job submit` (waits for the end); returns the job's final status line and its logs.

    The submit itself must succeed: exit status 0 means the job was accepted and succeeded."""
    ray = [str(BIN / "ray"), "job"]
    submitted = subprocess.run(
        [*ray, "submit", "--address", address, "--submission-id", submission_id, "--working-dir", str(ROOT),
         "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--", "python", "jobs/pipeline.py",
         "--config", str(config)],
        env=env, timeout=1200, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    status = subprocess.run([*ray, "status", "--address", address, submission_id], env=env, timeout=60,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    logs = subprocess.run([*ray, "logs", "--address", address, submission_id], env=env, timeout=60,
                          capture_output=True, text=True).stdout
    return status, logs


FAKE_RAY = """#!/usr/bin/env bash
# `ray` as local_cluster.sh calls it: nodes come up at once, the job agent only at the 3rd submission
case "$1 $2" in
  "start --block") exec sleep 600 ;;
  "list nodes") printf 'ALIVE\\nALIVE\\n' ;;
  "job submit")
    n=$(( $(cat "$FAKE_DIR/submits" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/submits"
    if (( n < 3 )); then echo "No available agent to submit job, please try again later." >&2; exit 1; fi ;;
esac
exit 0
"""


@pytest.mark.slow  # a subprocess `dnc`: seconds of imports
def test_start_returns_only_once_the_head_accepts_jobs(tmp_path):
    """The dashboard (and `ray list nodes`) answers before the head's job agent: `start` must wait for the agent."""
    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    folder = tempfile.mkdtemp(prefix="dnc-f", dir="/tmp")
    env = {**os.environ, "RAY": str(fake), "FAKE_DIR": str(tmp_path), "DNC_CLUSTER_DIR": folder,
           "DNC_DASHBOARD_PORT": str(free_port())}
    script = str(ROOT / "cluster" / "local_cluster.sh")
    try:
        started = subprocess.run([script, "start", "1"], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert (tmp_path / "submits").read_text().strip() == "3"  # refused twice, then accepted
        assert "accepting jobs" in started.stdout
    finally:
        subprocess.run([script, "stop"], env=env, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(1800)
def test_pipeline_job_on_a_local_cluster_then_reused(local_cluster, tmp_path):
    address, env = local_cluster
    tiny = {"engine": "hf", "model": "tiny-random-smollm2", "batch_size": 2, "max_tokens": 8, "num_cpus": 0.5}
    config = {
        "output": str(tmp_path / "pipeline"),
        "train_task": {"name": "gsm8k", "split": "test", "offset": 2, "limit": 8},
        "eval_task": {"name": "gsm8k", "split": "test", "limit": 2},
        "teacher_decomposer": {"engine": "reference"},
        "teacher_solver": tiny,
        "variant": "sd-t",
        "student": {"model": "tiny-random-smollm2", "max_steps": 2, "per_worker_batch_size": 2, "max_length": 192,
                    "num_workers": 2, "cpus_per_worker": 0.5, "checkpoint_every_steps": 2, "log_every_steps": 1,
                    "lr": 1.0e-3},
        "student_decomposer": {"batch_size": 2, "max_tokens": 8, "num_cpus": 0.5},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))

    status, logs = submit(address, env, path, "dnc-first")
    assert "succeeded" in status.lower(), status + logs[-3000:]
    report = json.loads((tmp_path / "pipeline" / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["direct", "teacher", "base-student", "student"]
    assert all(r["rows"] == 2 and r["errors"] == 0 for r in report["runs"])
    assert report["runs"][-1]["decomposer"].endswith("student/model")
    assert (tmp_path / "pipeline" / "cost_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "pipeline" / "student" / "model" / "config.json").exists()
    # The job's log is what a person reads: the project's lines; Ray's, DeepSpeed's and Transformers' in files
    assert "[pipeline] === " in logs and "[train] step 2/2" in logs and "[generate] finished: " in logs
    assert not [noise for noise in ("Reporting training result", "Execution plan", "(RayTrainWorker", "(MapWorker",
                                    "core_worker.cc") if noise in logs], logs[-3000:]
    assert "Execution plan" in (tmp_path / "pipeline" / "logs" / "driver.log").read_text()
    assert "(RayTrainWorker" in (tmp_path / "pipeline" / "logs" / "workers.log").read_text()

    status, logs = submit(address, env, path, "dnc-again")
    assert "succeeded" in status.lower(), status + logs[-3000:]
    assert "8 done earlier, 0 to run" in logs
    assert f"reusing {tmp_path / 'pipeline'}/distill" in logs and "student/model" in logs
    assert "[train]" not in logs  # no training the second time
