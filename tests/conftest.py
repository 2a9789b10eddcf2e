"""Shared fixtures: one local Ray for the session, and a scripted teacher on 127.0.0.1."""

from __future__ import annotations

import os
import socket

# Local Ray binds to 127.0.0.1 (by default it takes the machine's network address): test traffic
# stays on loopback. Read by Ray at import time, so it is set before `import ray`; subprocesses inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Every worker line reaches this driver's output as printed: Ray's log de-duplication drops words with digits
# and holds back lines alike from other processes ("[train] gsm8k/...: step 2/2" and another cell's step
# line look the same to it), so a test waiting for one line could wait in vain. (`dnc` shows workers' lines
# through its own printer, without it.)
os.environ["RAY_DEDUP_LOGS"] = "0"
# Ray Train's controller polls its workers every 2 s by default: a run's start, each checkpoint report and its end
# wait for the next poll. Every 0.5 s here, where the runs are a few seconds long and there are dozens of them.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"

import pytest  # noqa: E402
import ray  # noqa: E402

from dnc_ray.method.prompts import (  # noqa: E402
    DECOMPOSE_INSTRUCTION,
    FOLLOW_UP_INSTRUCTION,
    SELF_ASK_INSTRUCTION,
    SOLVE_INSTRUCTION,
)

SLOW_FIXTURES = {"ray_local", "local_cluster"}  # Ray starts: seconds to minutes a test
SLOW_MODULES = {"test_benchmarks.py"}  # every benchmark at its tiny size


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses Ray or runs a benchmark is `slow` (explicit marks add the rest): `make test-fast`
    leaves them out."""
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs (2 real cores): enough for two actor pools and tasks."""
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy(ray_local):
    """Ray Serve's HTTP proxy on 127.0.0.1 (a free port) for one test module's apps."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def question_of(content: str) -> str:
    return content.rsplit("Question: ", 1)[1].strip()


class ScriptedTeacher:
    """Replies like a teacher: two sub-questions to a decomposition prompt; to a solving prompt the
    gold answer for questions in `right`, a wrong one otherwise.

    Self-ask: `follow_ups(question)` follow-ups (default 2), one per turn, then "So the final answer is"
    with the same right-or-wrong answer; a follow-up "What is part N of: <question>?" is answered "part N is 10"."""

    def __init__(self, gold: dict[str, str], right: set[str], follow_ups=lambda question: 2):
        self.gold, self.right, self.follow_ups = gold, right, follow_ups

    def answer(self, question: str) -> str:
        return self.gold[question] if question in self.right else "-1"

    def __call__(self, messages: list[dict]) -> str:
        content = messages[-1]["content"]
        if content.startswith(SELF_ASK_INSTRUCTION[:40]):
            return self.self_ask_turn(content.rsplit("Question: ", 1)[1])
        if content.startswith(FOLLOW_UP_INSTRUCTION[:40]):
            return f"{question_of(content).split(' of: ')[0].removeprefix('What is ')} is 10\nbecause it is."
        question = question_of(content)
        if content.startswith(DECOMPOSE_INSTRUCTION[:40]):
            return f"1. What is given in: {question[:30]}?\n2. What is asked?"
        assert content.startswith(SOLVE_INSTRUCTION[:40]), content[:80]
        return f"Working through the sub-questions.\nThe answer is: {self.answer(question)}."

    def self_ask_turn(self, transcript: str) -> str:
        question = transcript.split("\n")[0]
        asked, needed = transcript.count("Follow up:"), self.follow_ups(question)
        opening = ("Yes.\n" if needed else "No.\n") if asked == 0 else ""
        if asked < needed:
            return f"{opening}Follow up: What is part {asked + 1} of: {question[:30]}?"
        return f"{opening}So the final answer is: {self.answer(question)}.\nQuestion: an invented next question"
