"""The Batch API's on-disk state: ids that cannot name a path, atomic documents, and a result
log that survives a torn last line and never records a request twice."""

from __future__ import annotations

import json

import pytest

from tierserve.batch.store import BatchStore, FileStore, NotFound, ResultLog


def _line(custom_id: str, status: int = 200) -> dict:
    return {"id": f"r-{custom_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "x", "body": {}}, "error": None}


def test_files_round_trip_list_newest_first_and_delete(tmp_path):
    files = FileStore(tmp_path)
    a = files.create(b"one\n", "a.jsonl", "batch")
    b = files.create(b"two\n", "b.jsonl", "batch")
    out = files.create(b"r\n", "o.jsonl", "batch_output", file_id="file-abc123out")
    assert files.content(a["id"]) == b"one\n" and a["bytes"] == 4
    assert files.get(out["id"])["purpose"] == "batch_output"
    assert {f["id"] for f in files.list("batch")} == {a["id"], b["id"]}
    files.delete(a["id"])
    with pytest.raises(NotFound):
        files.get(a["id"])
    assert not list(tmp_path.glob("files/.*.tmp"))  # no temporary left behind


@pytest.mark.parametrize("bad", ["../batches/x", "file-../../etc/passwd", "file-", "batch_1",
                                 "file-a/b", "file-" + "a" * 65])
def test_ids_that_are_not_ours_name_nothing(tmp_path, bad):
    (tmp_path / "secret.json").write_text("{}")
    with pytest.raises(NotFound):
        FileStore(tmp_path).get(bad)
    with pytest.raises(NotFound):
        BatchStore(tmp_path).get(bad.replace("file-", "batch_"))


def test_update_with_expect_never_overwrites_a_newer_status(tmp_path):
    store = BatchStore(tmp_path)
    batch = store.create("file-1", "/v1/completions", "24h", None, total=3)
    store.update(batch["id"], status="cancelling")
    assert store.update(batch["id"], expect=("validating",), status="in_progress") is None
    assert store.get(batch["id"])["status"] == "cancelling"
    assert store.update(batch["id"], expect=("cancelling",), status="cancelled")["status"] \
        == "cancelled"


def test_result_log_cuts_a_torn_line_and_records_each_request_once(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = store.create("file-1", "/v1/completions", "24h", None, total=4)["id"]
    results = ResultLog(store, batch_id).open()
    results.append(_line("a"))
    results.append(_line("b", status=400))
    results.append(_line("a"))  # twice: ignored
    results.close()
    output = store.log_path(batch_id, "output")
    with open(output, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"id": "r-c", "custom_id": "c", "resp')
    resumed = ResultLog(store, batch_id).open()
    assert resumed.done == {"a", "b"} and resumed.counts == {"completed": 1, "failed": 1}
    resumed.append(_line("c"))
    resumed.close()
    lines = output.read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["a", "c"]
    errors = store.log_path(batch_id, "errors").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in errors] == ["b"]
