import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnc_ray.config import TaskConfig
from dnc_ray.tasks import TaskError, load_rows, scorer
from dnc_ray.tasks.gsm8k import reference_subquestions

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
