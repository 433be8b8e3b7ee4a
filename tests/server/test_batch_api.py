"""The HTTP Batch API against a real server, driven by the official openai client: files and
batches round trip, outputs equal the same requests sent online, errors are OpenAI-shaped, a
cancel frees every KV block, and a server SIGKILLed mid-batch resumes it with nothing lost or
done twice."""

from __future__ import annotations

import io
import json
import random
import signal
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, wait_until_idle
from tierserve.server.batches import BatchObject, FileObject


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _completion_lines(num: int, seed: int = 0, max_tokens=lambda i: 8) -> list[dict]:
    """Completions that share prefixes (3 templates), scattered through the file."""
    rng = random.Random(seed)
    templates = [" ".join(f"w{rng.randrange(400)}" for _ in range(24)) for _ in range(3)]
    lines = []
    for i in range(num):
        prompt = f"{templates[rng.randrange(3)]} question {i} {rng.randrange(1000)}"
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens(i),
                               "temperature": 0, "ignore_eos": True}})
    return lines


def _online(client, body: dict):
    """The same request sent online (vLLM's ignore_eos goes in extra_body)."""
    body = dict(body)
    extra = {"ignore_eos": body.pop("ignore_eos")} if "ignore_eos" in body else None
    return client.completions.create(**body, extra_body=extra)


def _wait(client, batch_id: str, done=("completed", "failed", "cancelled", "expired"),
          timeout: float = 120.0, until=None):
    deadline = time.time() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in done or (until is not None and until(batch)):
            return batch
        assert time.time() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.05)


def _records(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(tiny_llama_dir, "--data-dir", str(tmp_path_factory.mktemp("data")),
                         "--max-batch-file-size", "64KiB", "--max-batch-requests", "60",
                         "--max-num-seqs", "8")
    yield proc
    proc.stop()


def test_openai_client_runs_a_batch_whose_outputs_equal_online_requests(server):
    client = _client(server)
    lines = _completion_lines(16)
    lines.insert(5, {"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
                     "body": {"prompt": "x", "max_tokens": -1}})
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    FileObject.model_validate(httpx.get(f"{server.url}/v1/files/{uploaded.id}").json())
    assert client.files.content(uploaded.id).content == _jsonl(lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h", metadata={"job": "round-trip"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "round-trip"}
    batch = _wait(client, batch.id)
    BatchObject.model_validate(httpx.get(f"{server.url}/v1/batches/{batch.id}").json())
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (17, 16, 1)
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    outputs = {r["custom_id"]: r for r in _records(client, batch.output_file_id)}
    errors = _records(client, batch.error_file_id)
    assert len(outputs) == 16 and [e["custom_id"] for e in errors] == ["bad-body"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    for line in lines:
        if line["custom_id"] == "bad-body":
            continue
        record = outputs[line["custom_id"]]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        online = _online(client, line["body"])
        body = record["response"]["body"]
        assert body["choices"][0]["text"] == online.choices[0].text
        assert body["usage"]["completion_tokens"] == online.usage.completion_tokens == 8
    assert batch.id in [b.id for b in client.batches.list()]
    listed = [f.id for f in client.files.list(purpose="batch")]
    assert uploaded.id in listed and batch.output_file_id not in listed
    # The input of a finished batch can go; its results stay.
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert wait_until_idle(server)["tierserve_kv_blocks_in_use"] == 0


def test_files_and_batches_errors_are_openai_shaped(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.files.retrieve("file-0123456789abcdef")
    assert unknown.value.body["code"] == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-../../etc/passwd")
    with pytest.raises(openai.NotFoundError) as unknown_input:
        client.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/completions",
                              completion_window="24h")
    assert unknown_input.value.body["param"] == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    # A malformed line fails the whole batch, naming the lines at fault.
    good = _completion_lines(3)
    malformed = (_jsonl(good[:1]) + b"{not json\n" + _jsonl(good[1:2])
                 + _jsonl([{**good[2], "custom_id": good[0]["custom_id"]}])
                 + _jsonl([{**good[2], "custom_id": "x", "url": "/v1/chat/completions"}]))
    uploaded = client.files.create(file=("bad.jsonl", io.BytesIO(malformed)), purpose="batch")
    batch = _wait(client, client.batches.create(input_file_id=uploaded.id,
                                                endpoint="/v1/completions",
                                                completion_window="24h").id)
    assert batch.status == "failed" and batch.output_file_id is None
    faults = {(e.line, e.code) for e in batch.errors.data}
    assert faults == {(2, "invalid_json_line"), (4, "duplicate_custom_id"),
                      (5, "mismatched_endpoint")}
    # Limits: a file over --max-batch-file-size (400, or 413 far over), a batch over
    # --max-batch-requests, a purpose this server does not store.
    with pytest.raises(openai.BadRequestError) as too_big:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * (65 << 10))), purpose="batch")
    assert too_big.value.body["code"] == "file_too_large"
    far_over = httpx.post(server.url + "/v1/files", data={"purpose": "batch"},
                          files={"file": ("huge.jsonl", b"x" * (1 << 20))})
    assert far_over.status_code == 413 and far_over.json()["error"]["code"] == "body_too_large"
    many = client.files.create(file=("many.jsonl", io.BytesIO(_jsonl(_completion_lines(61)))),
                               purpose="batch")
    with pytest.raises(openai.BadRequestError) as too_many:
        client.batches.create(input_file_id=many.id, endpoint="/v1/completions",
                              completion_window="24h")
    assert too_many.value.body["code"] == "batch_too_large"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=many.id, endpoint="/v1/embeddings",
                              completion_window="24h")
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)  # already failed
    assert httpx.get(server.url + "/health").status_code == 200


def test_cancel_midway_frees_every_block_and_keeps_finished_results(server):
    client = _client(server)
    lines = _completion_lines(48, seed=3, max_tokens=lambda i: 4 if i % 6 == 0 else 200)
    uploaded = client.files.create(file=("long.jsonl", io.BytesIO(_jsonl(lines))),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h")
    running = _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 1)
    assert running.status == "in_progress", running
    assert server.metrics()["tierserve_kv_blocks_in_use"] > 0
    # Online requests keep priority: one sent now is served while the batch still runs.
    online = _online(client, {**lines[1]["body"], "max_tokens": 16})
    assert online.usage.completion_tokens == 16
    assert client.batches.retrieve(batch.id).status == "in_progress"
    with pytest.raises(openai.ConflictError):
        client.files.delete(uploaded.id)  # the input of an unfinished batch
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    finished = _records(client, batch.output_file_id)
    assert 1 <= len(finished) < 48 == batch.request_counts.total
    assert batch.request_counts.completed == len(finished)
    values = wait_until_idle(server)
    assert values["tierserve_kv_blocks_in_use"] == 0
    assert values["tierserve_num_requests_running"] == 0
    # and online requests go on
    assert _client(server).completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_a_queued_batch_cancelled_ends_at_once_and_json_line_separators_are_not_newlines(
        server):
    client = _client(server)
    long = _completion_lines(40, seed=8, max_tokens=lambda i: 200)
    first = client.batches.create(input_file_id=client.files.create(
        file=("a.jsonl", io.BytesIO(_jsonl(long))), purpose="batch").id,
        endpoint="/v1/completions", completion_window="24h")
    # U+2028 and U+0085 are legal unescaped in a JSON string (json.dumps with ensure_ascii=False
    # writes them so): they must not split a line.
    odd = _completion_lines(2, seed=9)
    odd[0]["body"]["prompt"] += " \u2028 and \x85 inside"
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in odd).encode()
    second = client.batches.create(input_file_id=client.files.create(
        file=("b.jsonl", io.BytesIO(data)), purpose="batch").id,
        endpoint="/v1/completions", completion_window="24h")
    assert second.request_counts.total == 2
    _wait(client, first.id, until=lambda b: b.status == "in_progress")
    client.batches.cancel(second.id)  # queued behind the first
    ended = _wait(client, second.id, timeout=30)
    assert ended.status == "cancelled"
    assert client.batches.retrieve(first.id).status == "in_progress"  # it did not wait for it
    client.batches.cancel(first.id)
    assert _wait(client, first.id).status == "cancelled"
    rerun = client.batches.create(input_file_id=second.input_file_id,
                                  endpoint="/v1/completions", completion_window="24h")
    done = _wait(client, rerun.id)
    assert done.status == "completed" and done.request_counts.completed == 2, done
    assert wait_until_idle(server)["tierserve_kv_blocks_in_use"] == 0


def test_a_batch_past_its_window_expires_on_restart_with_every_request_accounted(
        tiny_llama_dir, tmp_path):
    """State left by an earlier server: an in-progress batch whose 24 h are over, one result
    already in its log. The new server resumes it, finds it expired, and publishes that result
    and a batch_expired error line for each of the others."""
    from tierserve.batch.store import BatchStore, FileStore, ResultLog

    data_dir = tmp_path / "data"
    lines = _completion_lines(5, seed=11)
    uploaded = FileStore(data_dir).create(_jsonl(lines), "in.jsonl", "batch")
    store = BatchStore(data_dir)
    batch = store.create(uploaded["id"], "/v1/completions", "24h", None, total=5)
    store.update(batch["id"], status="in_progress", in_progress_at=batch["created_at"] - 90000,
                 expires_at=int(time.time()) - 10)
    results = ResultLog(store, batch["id"]).open()
    results.append({"id": "r0", "custom_id": "req-0", "error": None, "response": {
        "status_code": 200, "request_id": "x", "body": {"choices": [{"text": "kept"}]}}})
    results.close()
    proc = ServerProcess(tiny_llama_dir, "--data-dir", str(data_dir))
    try:
        client = _client(proc)
        done = _wait(client, batch["id"], timeout=60)
        assert done.status == "expired" and done.expired_at is not None, done
        assert [r["custom_id"] for r in _records(client, done.output_file_id)] == ["req-0"]
        expired = _records(client, done.error_file_id)
        assert sorted(r["custom_id"] for r in expired) == [f"req-{i}" for i in range(1, 5)]
        assert {r["error"]["code"] for r in expired} == {"batch_expired"}
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 4)
        assert proc.metrics().get('tierserve_requests_total{status="length"}', 0) == 0
    finally:
        proc.stop()


def test_sigkill_mid_batch_then_restart_resumes_with_nothing_lost_or_duplicated(
        tiny_llama_dir, tmp_path):
    data_dir = tmp_path / "data"
    args = ("--data-dir", str(data_dir), "--max-num-seqs", "4")
    lines = _completion_lines(40, seed=5, max_tokens=lambda i: 3 if i % 4 == 0 else 150)
    first = ServerProcess(tiny_llama_dir, *args)
    try:
        client = _client(first)
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))),
                                       purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h")
        partial = _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 4)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.stop()
    assert partial.status == "in_progress", partial
    log = data_dir / "batches" / f"{batch.id}.output.jsonl"
    before = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert 4 <= len(before) < 40  # killed midway, with results on disk

    second = ServerProcess(tiny_llama_dir, *args)
    try:
        client = _client(second)
        done = _wait(client, batch.id)
        assert done.status == "completed", done
        records = _records(client, done.output_file_id)
        ids = [r["custom_id"] for r in records]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
        assert done.request_counts.completed == 40 and done.error_file_id is None
        # Only the rest ran after the restart: the finished ones were kept, not recomputed.
        ran = second.metrics()['tierserve_requests_total{status="length"}']
        assert ran == 40 - len(before)  # (those in flight at the kill ran again, from scratch)
        kept = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in before}
        by_id = {r["custom_id"]: r for r in records}
        for custom_id, text in kept.items():
            assert by_id[custom_id]["response"]["body"]["choices"][0]["text"] == text
        for line in lines[:8]:  # results computed before and after the kill equal online runs
            online = _online(client, line["body"])
            assert (by_id[line["custom_id"]]["response"]["body"]["choices"][0]["text"]
                    == online.choices[0].text)
    finally:
        second.stop()
