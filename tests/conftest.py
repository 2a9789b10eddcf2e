"""Shared fixtures: one local Ray for the session, and a scripted teacher on 127.0.0.1."""

from __future__ import annotations

import os

# Local Ray binds to 127.0.0.1 (by default it takes the machine's network address): test traffic
# stays on loopback. Read by Ray at import time, so it is set before `import ray`; subprocesses inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import ray  # noqa: E402

from dnc_ray.prompts import DECOMPOSE_INSTRUCTION, SOLVE_INSTRUCTION  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs (2 real cores): enough for two actor pools and tasks."""
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def question_of(content: str) -> str:
    return content.rsplit("Question: ", 1)[1].strip()


class ScriptedTeacher:
    """Replies like a teacher: two sub-questions to a decomposition prompt; to a solving prompt the
    gold answer for questions in `right`, a wrong one otherwise."""

    def __init__(self, gold: dict[str, str], right: set[str]):
        self.gold, self.right = gold, right

    def __call__(self, messages: list[dict]) -> str:
        content = messages[-1]["content"]
        question = question_of(content)
        if content.startswith(DECOMPOSE_INSTRUCTION[:40]):
            return f"1. What is given in: {question[:30]}?\n2. What is asked?"
        assert content.startswith(SOLVE_INSTRUCTION[:40]), content[:80]
        answer = self.gold[question] if question in self.right else "-1"
        return f"Working through the sub-questions.\nThe answer is: {answer}."
