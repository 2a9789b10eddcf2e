"""Config loading: types and defaults, and every bad config as one ConfigError naming file, line and field."""

import json
import textwrap

import pytest

from dnc_ray.config import GenerateConfig, PipelineConfig, ServeAppConfig, load_config
from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.configs import HFModel, OpenAIModel, Price, ReferenceModel
from dnc_ray.tasks import TaskConfig

VALID = """\
task:
  name: gsm8k
  limit: 5
strategy: two_stage
output: runs/gsm8k-two-stage
decomposer:
  engine: openai
  model: gpt-4o-mini
  base_url: http://localhost:8000/v1
  temperature: 0.7
  price:
    input_per_1k: 0.15
    output_per_1k: 0.6
solver:
  engine: hf
  temperature: 0.0
"""

OPENAI = {"engine": "openai", "model": "m", "base_url": "http://localhost:8000/v1"}
HF = {"engine": "hf"}


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text, name="config.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerateConfig)
    message = str(info.value)
    assert name in message
    return message


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of `text` containing `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def config(**overrides) -> dict:
    data = {"task": {"name": "gsm8k"}, "strategy": "direct", "output": "out", "solver": dict(HF)}
    data.update(overrides)
    return data


def validate_error(data: dict) -> str:
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        GenerateConfig.model_validate(data)
    return str(info.value)


# ---------------------------------------------------------------- a valid config


def test_valid_two_stage_loads_with_types_and_values(tmp_path):
    """The file's values land in the typed fields (each model's `engine` picks its class); the defaults are
    not mirrored here: what they do is tested where they act."""
    cfg = load_config(write(tmp_path, VALID), GenerateConfig)
    assert isinstance(cfg, GenerateConfig)
    assert cfg.strategy == "two_stage" and cfg.output == "runs/gsm8k-two-stage"
    assert isinstance(cfg.task, TaskConfig) and (cfg.task.name, cfg.task.limit) == ("gsm8k", 5)

    d = cfg.decomposer
    assert isinstance(d, OpenAIModel)
    assert (d.model, d.base_url, d.temperature) == ("gpt-4o-mini", "http://localhost:8000/v1", 0.7)
    assert isinstance(d.price, Price) and d.price.cost(1000, 2000) == pytest.approx(0.15 + 1.2)

    s = cfg.solver
    assert isinstance(s, HFModel) and s.temperature == 0.0
    assert s.price.cost(1000, 2000) == 0.0  # a local model costs nothing unless priced


def test_reference_decomposer_on_gsm8k_loads(tmp_path):
    cfg = load_config(
        write(tmp_path, "task: {name: gsm8k}\nstrategy: decompose\noutput: o\ndecomposer: {engine: reference}\n"),
        GenerateConfig,
    )
    assert isinstance(cfg.decomposer, ReferenceModel) and cfg.solver is None


# ---------------------------------------------------------------- unknown / missing / wrong keys


def test_typo_key_names_file_line_and_field_path(tmp_path):
    text = VALID.replace("  temperature: 0.0\n", "  temprature: 0.5\n")
    message = error_of(tmp_path, text, "typo.yaml")
    line = line_of(text, "temprature")
    assert line == 16
    assert f"line {line}" in message
    assert "solver.temprature" in message
    assert "solver.hf" not in message  # the union's tag is not part of the field path


def test_unknown_top_level_key(tmp_path):
    text = VALID + "num_sample: 3\n"
    message = error_of(tmp_path, text)
    assert f"line {line_of(text, 'num_sample:')}" in message and "`num_sample`" in message


def test_missing_required_output(tmp_path):
    text = "".join(line + "\n" for line in VALID.splitlines() if not line.startswith("output:"))
    message = error_of(tmp_path, text, "no_output.yaml")
    assert "`output`" in message
    assert "required" in message.lower()


def test_missing_required_model_field(tmp_path):
    text = VALID.replace("  model: gpt-4o-mini\n", "")
    message = error_of(tmp_path, text)
    assert "decomposer.model" in message and "required" in message.lower()
    assert f"line {line_of(text, 'decomposer:')}" in message


def test_unknown_task_name(tmp_path):
    text = VALID.replace("name: gsm8k", "name: gsm9k")
    message = error_of(tmp_path, text)
    assert "task.name" in message and f"line {line_of(text, 'gsm9k')}" in message
    assert "unknown task 'gsm9k'" in message
    assert "known tasks: gsm8k, drop, bamboogle, records" in message  # the registry's tasks are listed


def test_unknown_records_metric(tmp_path):
    text = "task:\n  name: records\n  path: r.jsonl\n  metric: squad\n"
    text += "strategy: direct\noutput: o\nsolver: {engine: hf}\n"
    message = error_of(tmp_path, text)
    assert "line 4" in message and "task.metric" in message
    assert "unknown metric 'squad'" in message and "gsm8k, drop, bamboogle" in message


def test_unknown_strategy(tmp_path):
    text = VALID.replace("strategy: two_stage", "strategy: three_stage")
    message = error_of(tmp_path, text)
    assert "`strategy`" in message and f"line {line_of(text, 'three_stage')}" in message
    assert "two_stage" in message and "self_ask" in message


def test_every_strategy_of_the_method_is_a_config_strategy():
    from dnc_ray.method import STRATEGIES

    for name, strategy in STRATEGIES.items():
        models = {"solver": None} | {role: dict(OPENAI) for role in strategy.roles}
        extra = {"decompositions": "runs/earlier"} if name == "solve" else {}
        cfg = GenerateConfig.model_validate(config(strategy=name, **models, **extra))
        assert cfg.strategy == name


def test_unknown_engine(tmp_path):
    text = VALID.replace("engine: hf", "engine: tgi")
    message = error_of(tmp_path, text)
    assert "`solver`" in message and f"line {line_of(text, 'solver:')}" in message
    assert "tgi" in message and "'hf'" in message


def test_wrong_type_and_range(tmp_path):
    text = VALID.replace("limit: 5", "limit: -1")
    message = error_of(tmp_path, text)
    assert "task.limit" in message and f"line {line_of(text, 'limit:')}" in message
    text = VALID.replace("temperature: 0.7", "temperature: hot")
    message = error_of(tmp_path, text)
    assert "decomposer.temperature" in message and f"line {line_of(text, 'hot')}" in message


def test_every_error_is_reported(tmp_path):
    text = VALID.replace("strategy: two_stage", "strategy: nope").replace("engine: hf", "engine: nope")
    message = error_of(tmp_path, text)
    assert "`strategy`" in message and "`solver`" in message


# ---------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"strategy": "two_stage"}, "strategy two_stage needs a `decomposer`"),
        ({"strategy": "decompose", "solver": None}, "strategy decompose needs a `decomposer`"),
        ({"solver": None}, "strategy direct needs a `solver`"),
        ({"decomposer": dict(OPENAI)}, "strategy direct runs no decomposer"),
        (
            {"strategy": "two_stage", "decomposer": dict(OPENAI), "num_samples": 2},
            "num_samples > 1 needs a sampling decomposer (temperature > 0)",
        ),
        (
            {"strategy": "two_stage", "decomposer": {"engine": "reference"}, "num_samples": 2},
            "num_samples > 1 needs a sampling decomposer",
        ),
        ({"num_samples": 2}, "num_samples > 1 samples decompositions"),
        (
            {"task": {"name": "drop"}, "strategy": "decompose", "solver": None, "decomposer": {"engine": "reference"}},
            "the reference decomposer exists for task gsm8k only",
        ),
        ({"strategy": "solve"}, "`decompositions` (an earlier run) goes with strategy solve"),
        ({"decompositions": "runs/earlier"}, "`decompositions` (an earlier run) goes with strategy solve"),
        ({"solver": {"engine": "reference"}}, "the reference engine only decomposes"),
        ({"strategy": "self_ask"}, "strategy self_ask needs a `decomposer`"),
        ({"strategy": "self_ask", "decomposer": {"engine": "reference"}}, "the reference decomposer cannot"),
        ({"strategy": "self_ask", "decomposer": {**OPENAI, "temperature": 0.5}, "num_samples": 2},
         "num_samples > 1 samples decompositions"),
        ({"strategy": "self_ask", "decomposer": dict(OPENAI), "max_turns": 0}, "greater than 0"),
        ({"task": {"name": "records"}}, "task records needs `path` and `metric`"),
        ({"task": {"name": "records", "path": "x.jsonl"}}, "task records needs `path` and `metric`"),
        ({"task": {"name": "records", "metric": "drop"}}, "task records needs `path` and `metric`"),
        ({"task": {"name": "gsm8k", "metric": "drop"}}, "`fields` and `metric` are for task records only"),
        ({"solver": {"engine": "hf", "dtype": "float16"}}, "dtype float16 needs a GPU"),
        ({"solver": {"engine": "hf", "device": "cuda"}}, "device is cuda but num_gpus is 0"),
    ],
)
def test_cross_field_rules(overrides, expected):
    assert expected in validate_error(config(**overrides))


def test_cross_field_rules_pass_when_consistent():
    GenerateConfig.model_validate(
        config(strategy="two_stage", decomposer={**OPENAI, "temperature": 0.8}, num_samples=4)
    )
    GenerateConfig.model_validate(config(strategy="solve", decompositions="runs/earlier"))
    assert GenerateConfig.model_validate(config(strategy="self_ask", decomposer=dict(OPENAI))).max_turns == 8
    GenerateConfig.model_validate(config(task={"name": "records", "path": "x.jsonl", "metric": "drop"}))
    GenerateConfig.model_validate(config(solver={"engine": "hf", "dtype": "bfloat16", "device": "cuda", "num_gpus": 1}))


def test_cross_field_error_from_file_names_file_and_line(tmp_path):
    text = """\
    task: {name: drop}
    strategy: decompose
    output: out
    decomposer:
      engine: reference
    """
    message = error_of(tmp_path, text, "ref_on_drop.yaml")
    assert "the reference decomposer exists for task gsm8k only" in message
    assert "line 1" in message

    text = "task: {name: gsm8k}\nstrategy: direct\noutput: o\nsolver:\n  engine: hf\n  dtype: float16\n"
    message = error_of(tmp_path, text, "fp16.yaml")
    assert "line 4" in message and "`solver`" in message and "float16 needs a GPU" in message

    text = "task:\n  name: records\n  metric: gsm8k\nstrategy: direct\noutput: o\nsolver: {engine: hf}\n"
    message = error_of(tmp_path, text, "records.yaml")
    assert "line 1" in message and "`task`" in message and "records needs `path` and `metric`" in message


# ---------------------------------------------------------------- max_subquestions: the task's default


@pytest.mark.parametrize(
    "task, expected",
    [
        ({"name": "bamboogle"}, 2),
        ({"name": "gsm8k"}, 3),
        ({"name": "drop", "split": "dev"}, 3),
        ({"name": "records", "path": "r.jsonl", "metric": "bamboogle"}, 2),
        ({"name": "records", "path": "r.jsonl", "metric": "gsm8k"}, 3),
    ],
)
def test_max_subquestions_unset_is_the_tasks(task, expected):
    cfg = GenerateConfig.model_validate(config(task=task))
    assert cfg.max_subquestions == expected
    assert GenerateConfig.model_validate(cfg.model_dump(mode="json")).max_subquestions == expected


def test_max_subquestions_explicit_wins(tmp_path):
    assert GenerateConfig.model_validate(config(task={"name": "bamboogle"}, max_subquestions=3)).max_subquestions == 3
    assert GenerateConfig.model_validate(config(max_subquestions=1)).max_subquestions == 1
    assert "max_subquestions" in validate_error(config(max_subquestions=0))
    path = write(tmp_path, "task: {name: bamboogle}\nstrategy: direct\noutput: o\nsolver: {engine: hf}\n")
    assert load_config(path, GenerateConfig).max_subquestions == 2


def test_pipeline_max_subquestions_is_the_train_tasks():
    base = {
        "output": "o",
        "train_task": {"name": "bamboogle"},
        "eval_task": {"name": "gsm8k"},
        "teacher_decomposer": dict(HF),
        "teacher_solver": dict(HF),
    }
    assert PipelineConfig.model_validate(base).max_subquestions == 2
    swapped = {**base, "train_task": {"name": "gsm8k"}, "eval_task": {"name": "bamboogle"}}
    assert PipelineConfig.model_validate(swapped).max_subquestions == 3
    assert PipelineConfig.model_validate({**base, "max_subquestions": 3}).max_subquestions == 3


def test_serve_max_subquestions_left_to_the_request():
    graph = {"decomposer": {"model": dict(HF)}, "solver": {"model": dict(HF)}}
    assert ServeAppConfig.model_validate(graph).max_subquestions is None  # the serve app resolves it per request
    assert ServeAppConfig.model_validate({**graph, "max_subquestions": 2}).max_subquestions == 2


def test_solver_reference_from_file(tmp_path):
    message = error_of(tmp_path, "task: {name: gsm8k}\nstrategy: direct\noutput: o\nsolver: {engine: reference}\n")
    assert "the reference engine only decomposes" in message


# ---------------------------------------------------------------- unreadable files


def test_not_yaml(tmp_path):
    message = error_of(tmp_path, "task: [unclosed\nstrategy: direct\n", "broken.yaml")
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_not_a_mapping(tmp_path, text):
    message = error_of(tmp_path, text, "list.yaml")
    assert "mapping" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerateConfig)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)


# ---------------------------------------------------------------- secrets never reach run.json


def test_dump_holds_env_var_name_not_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DNC_TEST_KEY", "sk-should-not-leak")
    text = VALID.replace("  temperature: 0.7\n", "  temperature: 0.7\n  api_key_env: DNC_TEST_KEY\n")
    cfg = load_config(write(tmp_path, text), GenerateConfig)
    assert cfg.decomposer.api_key_env == "DNC_TEST_KEY"

    dump = cfg.model_dump(mode="json")
    dumped = json.dumps(dump)
    assert dump["decomposer"]["api_key_env"] == "DNC_TEST_KEY"
    assert "sk-should-not-leak" not in dumped
    assert "sk-should-not-leak" not in repr(cfg)
    # run.json's config round-trips into the same config (dnc evaluate relies on it)
    assert GenerateConfig.model_validate(json.loads(dumped)) == cfg

    from dnc_ray.stages.run_record import run_identity

    assert "sk-should-not-leak" not in json.dumps(run_identity(cfg))


def test_api_key_env_may_be_null():
    cfg = GenerateConfig.model_validate(config(solver={**OPENAI, "api_key_env": None}))
    assert cfg.solver.api_key_env is None


def test_every_shipped_generate_config_validates():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.glob("jobs/configs/*.yaml"))
    generate = [p for p in configs if "strategy:" in p.read_text()]
    assert len(generate) >= 4
    for path in generate:
        load_config(path, GenerateConfig)


# ---------------------------------------------------------------- duplicate keys, encoding, max_failed_rows


def test_a_duplicate_key_names_file_line_and_field(tmp_path):
    message = error_of(tmp_path, VALID + "strategy: direct\n", "dup.yaml")
    assert f"line {VALID.count(chr(10)) + 1}" in message and "duplicate key `strategy`" in message
    nested = VALID.replace("  temperature: 0.7\n", "  temperature: 0.7\n  temperature: 0.9\n")
    message = error_of(tmp_path, nested, "nested.yaml")
    assert f"line {line_of(nested, 'temperature: 0.9')}" in message and "`decomposer.temperature`" in message


def test_a_config_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.replace("runs/gsm8k-two-stage", "runs/caf\u00e9").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, GenerateConfig)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line_of(VALID, 'output:')}: not UTF-8") and "\n" not in message


@pytest.mark.parametrize("value, rows, allowed", [(0, 100, 0), (3, 100, 3), ("5%", 100, 5), ("5%", 10, 0),
                                                  ("100%", 7, 7), ("12.5%", 16, 2)])
def test_max_failed_rows_is_a_count_or_a_share(value, rows, allowed):
    from dnc_ray.config import failed_rows_allowed

    cfg = GenerateConfig.model_validate({"task": {"name": "gsm8k"}, "strategy": "direct", "output": "o",
                                         "solver": HF, "max_failed_rows": value})
    assert failed_rows_allowed(cfg.max_failed_rows, rows) == allowed


@pytest.mark.parametrize("value", [-1, "x", "5", "101%", "-3%"])
def test_max_failed_rows_rejects_the_rest(value):
    with pytest.raises(ValueError, match="max_failed_rows"):
        GenerateConfig.model_validate({"task": {"name": "gsm8k"}, "strategy": "direct", "output": "o",
                                       "solver": HF, "max_failed_rows": value})
