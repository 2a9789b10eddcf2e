"""The method, defined once (dnc_ray.method): strategies run on rows through real model calls over HTTP to a
scripted OpenAI-compatible teacher on 127.0.0.1; self_ask's loop, its bounds, usage per turn; batching of turns."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from conftest import ScriptedTeacher
from dnc_ray.llm.chat_model import ChatModel, MicroBatcher
from dnc_ray.llm.configs import OpenAIModel
from dnc_ray.llm.openai import OpenAIEngine
from dnc_ray.method import STRATEGIES, MethodOptions, run_row
from dnc_ray.method.prompts import FOLLOW_UP_INSTRUCTION
from dnc_ray.method.row import new_row
from dnc_ray.method.self_ask import next_line
from dnc_ray.tasks import TASKS
from dnc_ray.testing.stub_server import StubServer

PRICE = {"input_per_1k": 1.0, "output_per_1k": 2.0}
QUESTION = "Tom has 3 boxes of 4 pens. How many pens?"
GOLD = {QUESTION: "12"}
OPTIONS = MethodOptions(rules=TASKS["gsm8k"].rules, max_turns=4)


def teacher(server: StubServer) -> OpenAIModel:
    return OpenAIModel(engine="openai", model="stub-teacher", base_url=server.base_url, api_key_env=None,
                       max_retries=0, price=PRICE)


def models(server: StubServer) -> dict:
    cfg = teacher(server)
    return {"decomposer": ChatModel(cfg, OpenAIEngine(cfg)), "solver": ChatModel(cfg, OpenAIEngine(cfg))}


def row(question: str = QUESTION, **fields) -> dict:
    return new_row({"id": "q0", "task": "gsm8k", "split": "test", "question": question, "context": None,
                    "answers": [[GOLD.get(question, "0")]]}) | fields


def run(strategy: str, server: StubServer, the_row: dict, options: MethodOptions = OPTIONS) -> dict:
    return asyncio.run(run_row(STRATEGIES[strategy], the_row, models(server), options))


def words(text: str) -> int:
    return len(text.split())


def test_self_ask_ends_on_the_final_answer_with_every_turn_accounted():
    script = ScriptedTeacher(GOLD, set(GOLD), follow_ups=lambda q: 2)
    with StubServer(reply=script) as server:
        done = run("self_ask", server, row())
        requests = list(server.requests)
    assert done["error"] is None
    assert done["prediction"] == "12" and done["subquestions"] == [
        f"What is part 1 of: {QUESTION[:30]}?", f"What is part 2 of: {QUESTION[:30]}?"]
    assert done["solution"] == "\n".join([
        f"Question: {QUESTION}",
        "Are follow up questions needed here: Yes.",
        f"Follow up: What is part 1 of: {QUESTION[:30]}?",
        "Intermediate answer: part 1 is 10",
        f"Follow up: What is part 2 of: {QUESTION[:30]}?",
        "Intermediate answer: part 2 is 10",
        "So the final answer is: 12",
    ])
    # 3 decomposer turns (follow-up, follow-up, final) and 2 solver calls, in that interleaved order
    assert len(requests) == 5
    turns, answers = requests[0::2], requests[1::2]
    decompose, solve = done["usage"]["decompose"], done["usage"]["solve"]
    assert (decompose["calls"], solve["calls"]) == (3, 2)
    assert decompose["prompt_tokens"] == sum(words(m[-1]["content"]) for m in turns)
    assert decompose["completion_tokens"] == sum(words(script(m)) for m in turns)
    assert solve["prompt_tokens"] == sum(words(m[-1]["content"]) for m in answers)
    assert solve["completion_tokens"] == sum(words(script(m)) for m in answers)
    assert decompose["cost_usd"] == pytest.approx((decompose["prompt_tokens"] + 2 * decompose["completion_tokens"]) / 1000)
    # each turn's prompt is the previous one's transcript plus what the turn added
    assert "Intermediate answer: part 1 is 10" in turns[1][-1]["content"]
    assert turns[2][-1]["content"].endswith("Intermediate answer: part 2 is 10\n")


def test_self_ask_without_follow_ups_answers_at_once():
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD), follow_ups=lambda q: 0)) as server:
        done = run("self_ask", server, row())
    assert done["error"] is None and done["subquestions"] == [] and done["prediction"] == "12"
    assert done["solution"].splitlines()[1:] == ["Are follow up questions needed here: No.", "So the final answer is: 12"]
    assert done["usage"]["solve"] is None and done["usage"]["decompose"]["calls"] == 1


def test_self_ask_stops_at_max_turns_with_an_error():
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD), follow_ups=lambda q: 99)) as server:
        done = run("self_ask", server, row(), replace(OPTIONS, max_turns=3))
        assert len(server.requests) == 6
    assert done["error"] == "self_ask: no final answer within max_turns (3) turns"
    assert done["prediction"] is None and len(done["subquestions"]) == 3
    assert (done["usage"]["decompose"]["calls"], done["usage"]["solve"]["calls"]) == (3, 3)


def test_self_ask_reply_without_either_marker_fails_the_row():
    with StubServer(reply=lambda messages: "I think it is twelve.") as server:
        done = run("self_ask", server, row())
    assert done["error"] == 'self_ask: turn 1: the reply has neither "Follow up:" nor "So the final answer is:"'
    assert done["solution"] == f"Question: {QUESTION}\nAre follow up questions needed here: I think it is twelve."


def test_self_ask_upstream_failure_on_turn_2_fails_the_row():
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD)), fail=lambda index, messages: 500 if index == 2 else None) as server:
        done = run("self_ask", server, row())
    assert done["error"].startswith("self_ask: InternalServerError")
    assert done["usage"]["decompose"]["calls"] == 2 and done["usage"]["solve"]["calls"] == 1


@pytest.mark.parametrize(("reply", "expected"), [
    ("Yes.\nFollow up: How many boxes?\nIntermediate", ("Follow up:", "How many boxes?")),
    ("So the final answer is: 12.\nFollow up: more?", ("So the final answer is:", "12")),
    ("follow up:   When was it built?", ("Follow up:", "When was it built?")),
    ("Follow up:\nnothing here", (None, "")),
])
def test_next_line_takes_the_first_marker(reply, expected):
    assert next_line(reply) == expected


def test_two_stage_and_a_row_resumed_at_its_failed_step():
    with StubServer(reply=ScriptedTeacher(GOLD, set(GOLD))) as server:
        done = run("two_stage", server, row())
        assert len(server.requests) == 2
        assert done["subquestions"] == [f"What is given in: {QUESTION[:30]}?", "What is asked?"]
        assert done["prediction"] == "12" and done["decomposer"] == done["solver"] == "stub-teacher"
        # a row whose decomposition is kept from an earlier attempt runs the solve step only
        kept = row(decomposition="x?", subquestions=["x?"], usage={"decompose": done["usage"]["decompose"], "solve": None})
        again = run("two_stage", server, kept)
        assert len(server.requests) == 3 and "Sub-questions: 1. x?" in server.requests[-1][-1]["content"]
    assert again["prediction"] == "12" and again["usage"]["decompose"] == done["usage"]["decompose"]


def test_task_rules_shape_the_prompts():
    with StubServer(reply=lambda messages: "The answer is: Paris") as server:
        bamboogle = MethodOptions(rules=TASKS["bamboogle"].rules)
        run("direct", server, row("Capital of France?"), bamboogle)
        assert server.requests[-1][-1]["content"] == "Capital of France?"  # bare single-stage prompt
    with StubServer(reply=lambda messages: "1. a?\n2. b?\n3. c?") as server:
        run("decompose", server, row(), bamboogle)
        assert "at most 2" in server.requests[-1][-1]["content"]


def test_an_engine_bug_raises_instead_of_failing_rows():
    class Broken:
        name = "broken"

        def cost(self, prompt_tokens, completion_tokens):
            return 0.0

        async def complete(self, chat, stop=(), json_schema=None):
            raise TypeError("bug in the engine")

    with pytest.raises(TypeError, match="bug in the engine"):
        asyncio.run(run_row(STRATEGIES["direct"], row(), {"solver": Broken()}, OPTIONS))


def test_micro_batcher_batches_turns_of_different_rows():
    """Rows needing 0-3 follow-ups through one batcher, the second half arriving (as Ray Data's next batch
    does) while the first is at work: calls of rows at different turns share batches."""
    questions = [f"Question number {i}: how many?" for i in range(8)]
    gold = {q: str(i) for i, q in enumerate(questions)}
    script = ScriptedTeacher(gold, set(gold), follow_ups=lambda q: int(q.split()[2].rstrip(":")) % 4)

    class Recording:
        """The real engine, with the chats of each call it gets noted."""

        def __init__(self, engine):
            self.engine, self.batches = engine, []

        @staticmethod
        def label(content: str) -> str:
            if content.startswith(FOLLOW_UP_INSTRUCTION):
                return "answer"
            return f"turn {content.rsplit('Question: ', 1)[1].count('Follow up:') + 1}"

        async def agenerate(self, chats, params):
            self.batches.append([self.label(c[-1]["content"]) for c in chats])
            if len(self.batches) == 3:
                second_half.set()
            return await self.engine.agenerate(chats, params)

    second_half = None
    with StubServer(reply=script) as server:
        cfg = teacher(server)
        recording = Recording(OpenAIEngine(cfg))
        model = ChatModel(cfg, OpenAIEngine(cfg))
        model._agenerate = MicroBatcher(recording, max_batch_size=3).agenerate
        rows = [row(q) | {"id": f"q{i}"} for i, q in enumerate(questions)]

        async def one(r: dict, later: bool) -> dict:
            if later:
                await second_half.wait()
            return await run_row(STRATEGIES["self_ask"], r, {"decomposer": model, "solver": model}, OPTIONS)

        async def all_rows():
            nonlocal second_half
            second_half = asyncio.Event()
            return await asyncio.gather(*(one(r, i >= 4) for i, r in enumerate(rows)))

        done = asyncio.run(all_rows())
    assert [r["prediction"] for r in done] == [gold[q] for q in questions]
    calls = sum(len(b) for b in recording.batches)
    assert calls == len(server.requests) == sum(1 + 2 * (i % 4) for i in range(8))
    assert max(len(b) for b in recording.batches) == 3 and len(recording.batches) < calls
    assert any(len(set(b)) > 1 for b in recording.batches), recording.batches  # calls at different turns together
