"""infra/storage.py: local paths made absolute, URIs, atomic writes, folder copy and listing; RunStore.write_meta through it."""

from __future__ import annotations

import json
import uuid

import pytest

from dnc_ray.infra import storage
from dnc_ray.stages.store import RunStore


def test_a_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("out/run.json")
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path / "out" / "run.json")
    assert storage.absolute("out") == str(tmp_path / "out")
    assert storage.absolute("s3://bucket/out") == "s3://bucket/out"  # URIs unchanged
    storage.write_text("out/a.txt", "relative")
    assert (tmp_path / "out" / "a.txt").read_text() == "relative"


def test_join():
    assert storage.join("s3://bucket/run/", "rows", "/part.parquet") == "s3://bucket/run/rows/part.parquet"
    assert storage.join("out", "report.md") == "out/report.md"


def test_file_uri(tmp_path):
    uri = f"file://{tmp_path}/deep/er/x.txt"
    storage.write_text(uri, "via file://")
    assert (tmp_path / "deep" / "er" / "x.txt").read_text() == "via file://"
    assert storage.read_text(uri) == "via file://"
    assert storage.exists(uri) and storage.exists(f"file://{tmp_path}/deep") and storage.is_folder(f"file://{tmp_path}/deep")
    assert not storage.exists(f"file://{tmp_path}/nope.txt")


def test_atomic_write_replaces_the_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    storage.write_text(str(target), "first, and longer than the second")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(TypeError):  # the stream refuses the data: fails after the temporary file is open
        storage.write_bytes(str(target), object())
    assert target.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_missing_file_names_the_uri(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file") as err:
        storage.open_input(missing)
    assert err.value.filename == missing and err.value.strerror == "no such file"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        storage.read_text(f"file://{missing}")
    storage.delete(missing)  # deleting what is not there is no error


def test_copy_folder_between_local_folders(tmp_path):
    src, dst = tmp_path / "model", tmp_path / "copies" / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    storage.copy_folder(str(src), str(dst))
    assert (dst / "config.json").read_text() == "{}" and (dst / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.copy_folder(str(tmp_path / "absent"), str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()


def test_list_files_with_a_suffix(tmp_path):
    for name in ["b.parquet", "a.parquet", "a.parquet.tmp", "notes.txt", "sub/c.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty.parquet").mkdir()  # a folder is not a file, whatever its name
    assert storage.list_files(str(tmp_path), ".parquet") == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert len(storage.list_files(f"file://{tmp_path}")) == 5
    assert storage.list_files(str(tmp_path / "no-such-folder"), ".parquet") == []


def test_a_scheme_pyarrow_lacks_goes_through_fsspec():
    root = f"memory://dnc-test-{uuid.uuid4().hex}"
    storage.write_text(f"{root}/run/a.json", "one")
    storage.write_text(f"{root}/run/a.json", "two")
    assert storage.read_text(f"{root}/run/a.json") == "two"
    assert storage.list_files(f"{root}/run") == ["a.json"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.open_input(f"{root}/run/b.json")
    storage.delete(f"{root}/run/a.json")
    assert not storage.exists(f"{root}/run/a.json")
    with pytest.raises(ValueError, match="no filesystem for nosuchscheme://"):
        storage.filesystem("nosuchscheme://x/y")


class _DiskFullMidWrite:
    """A local filesystem whose output streams take half the data, then fail (a crash mid-write)."""

    def __init__(self, fs):
        self.fs, self.written = fs, []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path):
        stream, written = self.fs.open_output_stream(path), self.written

        class Half:
            def __enter__(self):
                return self

            def write(self, data):
                stream.write(data[: len(data) // 2])
                written.append(path)
                raise OSError("disk full")

            def __exit__(self, *exc):
                stream.close()

        return Half()


def test_write_meta_is_atomic(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    before = {"identity": {"task": "gsm8k"}, "config": {}, "attempts": [{"rows": 1}]}
    store.write_meta(before)
    real = storage.filesystem
    failing = {}

    def filesystem(uri):
        fs, path = real(uri)
        failing["fs"] = _DiskFullMidWrite(fs)
        return failing["fs"], path

    monkeypatch.setattr(storage, "filesystem", filesystem)
    with pytest.raises(OSError, match="disk full"):
        store.write_meta({**before, "attempts": [{"rows": 1}, {"rows": 2}]})
    monkeypatch.undo()
    (half,) = failing["fs"].written
    assert half.startswith(str(tmp_path / "run" / "run.json.")) and half.endswith(".tmp")  # half was written there
    assert store.read_meta() == before  # run.json as it was
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]  # the half-written temporary is gone
