import ast
import json
import operator
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnc_ray.config import GenerateConfig
from dnc_ray.evaluate import summarize
from dnc_ray.method.row import ROW_SCHEMA, new_row
from dnc_ray.stages.score import score_rows
from dnc_ray.tasks import GENERIC_RULES, TASKS, PromptRules, Task, TaskConfig, TaskError, get_task, load_rows, scorer
from dnc_ray.tasks.gsm8k import reference_subquestions
from dnc_ray.tasks.task import demonstrations

ROW_KEYS = {"id", "task", "split", "question", "context", "answers"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "name, split, count",
    [("gsm8k", "test", 1319), ("gsm8k", "train", 7473), ("drop", "dev", 422), ("bamboogle", "test", 125)],
)
def test_bundled_counts_and_ids(name, split, count):
    rows = load_rows(TaskConfig(name=name, split=split))
    assert len(rows) == count
    assert all(set(r) == ROW_KEYS and r["task"] == name and r["split"] == split for r in rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == count
    assert ids == [r["id"] for r in load_rows(TaskConfig(name=name, split=split))]


def test_gsm8k_row_and_reference_subquestions():
    first = load_rows(TaskConfig(name="gsm8k"))[0]
    assert first["id"] == "gsm8k-test-0"
    assert first["question"].startswith("Janet\u2019s ducks lay 16 eggs")
    assert first["answers"] == [["18"]] and first["context"] is None
    assert reference_subquestions()[first["question"]] == [
        "How many eggs does Janet sell?",
        "How much does Janet make at the farmers' market?",
    ]
    assert len(reference_subquestions("test")) == 1319


def test_gsm8k_gold_drops_commas():
    rows = load_rows(TaskConfig(name="gsm8k"))
    assert all("," not in r["answers"][0][0] for r in rows)
    assert "114200" in {r["answers"][0][0] for r in rows}


def test_drop_answers_converted():
    rows = {r["id"]: r for r in load_rows(TaskConfig(name="drop", split="dev"))}
    multi = rows["drop-8b7f7ee7-a1cf-4656-bb92-fcc74acdae82"]
    assert multi["answers"] == [["100 Peso note", "500 Pesos note"], ["500 Pesos note"], ["100", "500"]]
    assert multi["context"].strip()
    assert rows["drop-7c72066b-f148-4554-8b81-4d74fbe61101"]["answers"] == [["1943"], ["1942"]]
    # a year-only date, then a number: the same string once
    assert rows["drop-0903294b-08fc-4061-937a-44890a55ca78"]["answers"] == [["1943"]]
    assert rows["drop-28553293-d719-441b-8f00-ce3dc6df5398-2"]["question"].endswith("Mason/")


def test_drop_user_path_full_date(tmp_path):
    empty_date = {"day": "", "month": "", "year": ""}
    answer = {"number": "", "date": {"day": "3", "month": "March", "year": "1085"}, "spans": []}
    validated = [
        {"number": "", "date": {"day": "", "month": "March", "year": "1085"}, "spans": []},
        {"number": "", "date": empty_date, "spans": []},
        answer,
    ]
    raw = {"query_id": "q1", "passage": "P.", "question": "When?", "answer": answer, "validated_answers": validated}
    rows = load_rows(TaskConfig(name="drop", split="dev", path=write_jsonl(tmp_path / "d.jsonl", [raw, raw])))
    assert [r["id"] for r in rows] == ["drop-q1", "drop-q1-2"]
    assert rows[0]["answers"] == [["3 March 1085"], ["March 1085"]]


def test_bamboogle_alt_answer():
    rows = {r["id"]: r for r in load_rows(TaskConfig(name="bamboogle"))}
    assert rows["bamboogle-47"]["answers"] == [["Mildred Warner"], ["Mildred Gale"]]
    assert rows["bamboogle-0"]["answers"] == [["james madison"]]


def test_limit_and_user_path(tmp_path):
    assert [r["id"] for r in load_rows(TaskConfig(name="gsm8k", limit=3))] == [f"gsm8k-test-{i}" for i in range(3)]
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "1+1?", "answer": "2\n#### 1,002"}])
    rows = load_rows(TaskConfig(name="gsm8k", path=path, limit=5))
    assert rows == [
        {"id": "gsm8k-test-0", "task": "gsm8k", "split": "test", "question": "1+1?", "context": None, "answers": [["1002"]]}
    ]


def test_records_jsonl_with_field_map(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"q": "Capital of France?", "gold": "Paris", "key": "a"},
            {"q": "Two primes?", "gold": ["2", "3"], "passage": "Primes.", "key": 7},
            {"q": "Which?", "gold": [["x", "y"], ["z"]], "key": "c"},
        ],
    )
    cfg = TaskConfig(
        name="records", path=path, metric="bamboogle", fields={"question": "q", "answers": "gold", "context": "passage", "id": "key"}
    )
    rows = load_rows(cfg)
    assert [r["id"] for r in rows] == ["a", "7", "c"]
    assert [r["answers"] for r in rows] == [[["Paris"]], [["2"], ["3"]], [["x", "y"], ["z"]]]
    assert [r["context"] for r in rows] == [None, "Primes.", None]
    assert rows[0]["task"] == "records" and rows[0]["question"] == "Capital of France?"


def test_records_parquet(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": [["1"], ["2", "two"]]}), path)
    rows = load_rows(TaskConfig(name="records", path=str(path), metric="gsm8k", fields={"answers": "answer"}))
    assert [(r["id"], r["answers"]) for r in rows] == [("records-0", [["1"]]), ("records-1", [["2"], ["two"]])]

    pq.write_table(pa.table({"text": ["a?"], "answers": ["1"]}), path)
    with pytest.raises(TaskError, match=r'r\.parquet row 1: field "question": missing'):
        load_rows(TaskConfig(name="records", path=str(path), metric="gsm8k"))


def test_records_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"question": "a", "answers": "1"}, {"question": "b", "answers": []}])
    with pytest.raises(TaskError, match=r'r\.jsonl line 2: field "answers": expected'):
        load_rows(TaskConfig(name="records", path=path, metric="drop"))
    with pytest.raises(TaskError, match="unknown row field 'gold'"):
        load_rows(TaskConfig(name="records", path=path, metric="drop", fields={"gold": "answers"}))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question": "a", "answers": "1", "id": "x"}] * 2)
    with pytest.raises(TaskError, match=r'dup\.jsonl line 2: field "id": duplicate'):
        load_rows(TaskConfig(name="records", path=dup, metric="drop"))


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match=r"nope\.jsonl: cannot read"):
        load_rows(TaskConfig(name="bamboogle", path=str(tmp_path / "nope.jsonl")))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": oops}\n')
    with pytest.raises(TaskError) as err:
        load_rows(TaskConfig(name="gsm8k", path=str(path)))
    assert "bad.jsonl line 3" in str(err.value) and "not valid JSON" in str(err.value)
    path.write_text("[1, 2]\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl line 1: expected a JSON object, got list"):
        load_rows(TaskConfig(name="gsm8k", path=str(path)))


def test_missing_and_mistyped_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}])
    with pytest.raises(TaskError, match=r'data\.jsonl line 2: field "question": missing'):
        load_rows(TaskConfig(name="gsm8k", path=path))
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": 1, "question": "q", "answer": ["x"]}])
    with pytest.raises(TaskError, match=r'data\.jsonl line 1: field "answer": expected str, got list'):
        load_rows(TaskConfig(name="bamboogle", path=path))


def test_unknown_split():
    with pytest.raises(TaskError, match="available: train, test"):
        load_rows(TaskConfig(name="gsm8k", split="dev"))
    with pytest.raises(TaskError, match="available: dev"):
        load_rows(TaskConfig(name="drop", split="test"))


def test_reference_subquestions_train():
    with pytest.raises(ValueError, match="split test only"):
        reference_subquestions("train")


def test_scorer_dispatch():
    assert scorer(TaskConfig(name="gsm8k"))("$18.", [["18"]]) == (1.0, True)
    assert scorer(TaskConfig(name="gsm8k"))("17", [["18"]]) == (0.0, False)
    assert scorer(TaskConfig(name="drop", split="dev"))("1085", [["1085"]]) == (1.0, True)
    partial, correct = scorer(TaskConfig(name="drop", split="dev"))("Chaz", [["Chaz Schilens"]])
    assert 0 < partial < 1 and not correct
    assert scorer(TaskConfig(name="bamboogle"))("It was James Madison.", [["james madison"]]) == (1.0, True)
    records = TaskConfig(name="records", path="unused.jsonl", metric="gsm8k")
    assert scorer(records)("The answer is 1,002", [["1002"]]) == (1.0, True)


def test_gsm8k_from_a_parquet_url_in_the_hub_format(tmp_path):
    """A user path may be any fsspec URL (hf://, s3://, file://) to JSONL or Parquet; file:// runs here."""
    bundled = load_rows(TaskConfig(name="gsm8k", split="test", limit=3))
    hub_rows = [{"question": r["question"], "answer": f"work\n#### {r['answers'][0][0]}"} for r in bundled]
    pq.write_table(pa.Table.from_pylist(hub_rows), tmp_path / "test-00000-of-00001.parquet")
    url = f"file://{tmp_path}/test-00000-of-00001.parquet"
    assert load_rows(TaskConfig(name="gsm8k", split="test", path=url)) == bundled


def test_hub_dataset_url_without_network_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no request leaves the machine
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time
    url = "hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet"
    with pytest.raises(TaskError, match=r"hf://datasets/openai/gsm8k.*cannot read"):
        load_rows(TaskConfig(name="gsm8k", split="test", path=url))


def test_offset_and_limit_select_a_slice():
    every = load_rows(TaskConfig(name="gsm8k", split="test", limit=12))
    assert load_rows(TaskConfig(name="gsm8k", split="test", offset=8, limit=4)) == every[8:12]
    assert load_rows(TaskConfig(name="bamboogle", split="test", offset=120))[0]["id"] == "bamboogle-120"


# ---------------------------------------------------------------- the registry: one Task per file


def test_registry_holds_the_benchmarks_with_their_rules():
    assert list(TASKS) == ["gsm8k", "drop", "bamboogle"]
    assert all(isinstance(t, Task) and isinstance(t.rules, PromptRules) for t in TASKS.values())
    gsm8k, drop, bamboogle = TASKS["gsm8k"], TASKS["drop"], TASKS["bamboogle"]
    assert (gsm8k.splits, drop.splits, bamboogle.splits) == (("train", "test"), ("dev",), ("test",))
    assert gsm8k.metrics == {"em": "correct"}
    assert drop.metrics == {"em": "correct", "f1": "score"}
    assert bamboogle.metrics == {"acc": "correct"}
    # the paper's cap: 2 sub-questions on Bamboogle, 3 elsewhere; DROP answers in at most five words
    assert (gsm8k.rules.max_subquestions, drop.rules.max_subquestions, bamboogle.rules.max_subquestions) == (3, 3, 2)
    assert [t.rules.short_answer for t in (gsm8k, drop, bamboogle)] == [False, True, False]
    assert [t.rules.bare_direct_prompt for t in (gsm8k, drop, bamboogle)] == [False, False, True]
    assert all(set(t.metrics.values()) <= set(ROW_SCHEMA.names) for t in TASKS.values())
    assert get_task(TaskConfig(name="drop", split="dev")) is drop


def test_records_take_the_rules_and_metrics_of_their_metric(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"question": "q?", "answers": "Paris"}])
    task = get_task(TaskConfig(name="records", path=path, metric="bamboogle", split="mine"))
    assert task.name == "records"
    assert task.rules == TASKS["bamboogle"].rules and task.metrics == {"acc": "correct"}
    assert task.score is TASKS["bamboogle"].score
    assert task.load("mine", path)[0]["question"] == "q?"  # the records loader, not bamboogle's
    drop_like = get_task(TaskConfig(name="records", path=path, metric="drop"))
    assert drop_like.rules.short_answer and drop_like.metrics == {"em": "correct", "f1": "score"}
    assert load_rows(TaskConfig(name="records", path=path, metric="drop", split="mine"))[0]["split"] == "mine"


def test_generic_rules_hold_one_demonstration_of_each_style():
    assert GENERIC_RULES.max_subquestions == 3
    assert not GENERIC_RULES.short_answer and not GENERIC_RULES.bare_direct_prompt
    assert demonstrations(GENERIC_RULES.self_ask_examples) == [
        demonstrations(TASKS[name].rules.self_ask_examples)[0] for name in ("gsm8k", "drop", "bamboogle")
    ]


def test_tasks_package_does_not_import_config():
    """dnc_ray.config imports dnc_ray.tasks, so the tasks must not import the config back at runtime."""
    code = "import sys, dnc_ray.tasks; assert 'dnc_ray.config' not in sys.modules, 'tasks imported config'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_registered_task_loads_and_scores_through_evaluate(monkeypatch):
    """Adding a task = one Task object named in TASKS: config, loading, scoring and the report follow."""
    seen = []

    def load(split, path):
        seen.append((split, path))
        return [
            {"id": f"toy-{i}", "task": "toy", "split": split, "question": f"{i} + {i}?", "context": None,
             "answers": [[str(2 * i)]]}
            for i in range(4)
        ]

    def score(prediction, answers):
        correct = any(prediction.strip() == spans[0] for spans in answers)
        return float(correct), correct

    toy = Task("toy", ("test",), load, score, {"hits": "correct"}, PromptRules(max_subquestions=4))
    monkeypatch.setitem(TASKS, "toy", toy)

    rows = load_rows(TaskConfig(name="toy", offset=1, limit=2))
    assert [r["id"] for r in rows] == ["toy-1", "toy-2"] and seen == [("test", None)]
    with pytest.raises(TaskError, match="task toy has no split 'dev'; available: test"):
        load_rows(TaskConfig(name="toy", split="dev"))

    cfg = GenerateConfig.model_validate(
        {"task": {"name": "toy", "limit": 2, "offset": 1}, "strategy": "direct", "output": "o",
         "solver": {"engine": "hf"}}
    )
    assert cfg.max_subquestions == 4  # the task's rules give the default
    cfg = GenerateConfig.model_validate(cfg.model_dump(mode="json"))  # as `dnc evaluate` reads run.json
    solved = []
    for row, prediction in zip(load_rows(cfg.task), ["2", "5"], strict=True):
        solved.append(new_row(row))
        solved[-1]["prediction"] = prediction
    score_rows(solved, scorer(cfg.task))
    assert [(r["score"], r["correct"]) for r in solved] == [(1.0, True), (0.0, False)]
    report = summarize(cfg, solved, [{"rows": 2, "elapsed_s": 1.0}])
    assert report["scores"] == {"hits": 50.0} and report["task"] == "toy/test"


# ---------------------------------------------------------------- self-ask demonstrations

_FOLLOW_UP, _ANSWER, _FINAL = "Follow up: ", "Intermediate answer: ", "So the final answer is: "


def parse_demonstration(text: str) -> dict:
    """One demonstration in the self-ask format, checked line by line; its parts."""
    lines = text.split("\n")
    context = lines.pop(0)[len("Context: ") :] if lines[0].startswith("Context: ") else None
    assert lines[0].startswith("Question: ") and lines[0].endswith("?"), lines[0]
    assert lines[1] in ("Are follow up questions needed here: Yes.", "Are follow up questions needed here: No.")
    assert lines[-1].startswith(_FINAL) and lines[-1][len(_FINAL) :].strip(), lines[-1]
    steps = lines[2:-1]
    assert len(steps) % 2 == 0, steps
    pairs = [(steps[i], steps[i + 1]) for i in range(0, len(steps), 2)]
    for follow_up, answer in pairs:  # every "Follow up:" line is followed by an "Intermediate answer:" line
        assert follow_up.startswith(_FOLLOW_UP) and follow_up.endswith("?"), follow_up
        assert answer.startswith(_ANSWER) and answer[len(_ANSWER) :].strip(), answer
    assert (lines[1].endswith("Yes.")) == bool(pairs)
    return {
        "context": context,
        "question": lines[0][len("Question: ") :],
        "follow_ups": [f[len(_FOLLOW_UP) :] for f, _ in pairs],
        "answers": [a[len(_ANSWER) :] for _, a in pairs],
        "final": lines[-1][len(_FINAL) :],
    }


@pytest.mark.parametrize("name", ["gsm8k", "drop", "bamboogle"])
def test_self_ask_examples_parse(name):
    rules = TASKS[name].rules
    examples = demonstrations(rules.self_ask_examples)
    assert len(examples) == 4
    assert "\n\n".join(examples) == rules.self_ask_examples  # one blank line between demonstrations
    parsed = [parse_demonstration(e) for e in examples]
    assert all(len(p["follow_ups"]) <= rules.max_subquestions for p in parsed)
    assert all((p["context"] is not None) == (name == "drop") for p in parsed)
    if name == "bamboogle":
        assert sorted(len(p["follow_ups"]) for p in parsed) == [0, 2, 2, 2]  # one needs no follow-up
    else:
        assert all(2 <= len(p["follow_ups"]) <= 3 for p in parsed)
    if name == "drop":
        for p in parsed:
            assert 3 <= len(re.split(r"(?<=[.!?])\s+", p["context"].strip())) <= 5, p["context"]
            assert all(len(a.split()) <= 5 for a in [*p["answers"], p["final"]]), p


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calculate(expression: str) -> float:
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        assert isinstance(node, ast.BinOp) and type(node.op) in _OPS, ast.dump(node)
        return _OPS[type(node.op)](value(node.left), value(node.right))

    return value(ast.parse(expression.replace(" x ", " * "), mode="eval").body)


def test_gsm8k_examples_arithmetic():
    """Each intermediate answer is "<calculation> = <result> <unit>.", rightly computed; the last is the final answer."""
    for example in demonstrations(TASKS["gsm8k"].rules.self_ask_examples):
        parsed = parse_demonstration(example)
        results = []
        for answer in parsed["answers"]:
            match = re.fullmatch(r"([\d .x+\-/]+?) = (\d+(?:\.\d+)?) [a-z]+\.", answer)
            assert match, answer
            assert _calculate(match[1]) == float(match[2]), answer
            # a calculation uses the question's numbers or earlier results
            numbers = set(re.findall(r"\d+", parsed["question"] + " " + parsed["follow_ups"][len(results)]))
            assert set(re.findall(r"\d+", match[1])) <= numbers | set(results), answer
            results.append(match[2])
        assert parsed["final"] == results[-1]


def test_drop_examples_arithmetic():
    first, second = (parse_demonstration(e) for e in demonstrations(TASKS["drop"].rules.self_ask_examples)[:2])
    assert "61-yard touchdown pass" in first["context"] and "37-yard field goal" in first["context"]
    assert int(first["final"]) == 61 - 37
    assert "31.5% had children" in second["context"] and float(second["final"]) == 100 - 31.5


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_task_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    for cfg in (TaskConfig(name="gsm8k", path=str(path)), TaskConfig(name="records", path=str(path), metric="gsm8k")):
        with pytest.raises(TaskError, match=r"empty\.jsonl: no records \(the file is empty or holds only blank lines\)"):
            load_rows(cfg)
