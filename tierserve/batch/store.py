"""The Batch API's persistent state: uploaded files and batch objects under a data directory.

```
data_dir/
  files/{file_id}.data        the bytes (written first)
  files/{file_id}.json        the OpenAI file object (its presence is what makes the file exist)
  batches/{batch_id}.json     the OpenAI batch object
  batches/{batch_id}.output.jsonl, .errors.jsonl   results, one line appended per request
```

Every JSON document is replaced atomically (a temporary file, then ``os.replace``), so a process
killed at any point leaves either the old or the new one. Result lines are appended with one
``write`` each and flushed at once: a killed server loses at most a torn last line, which
``ResultLog.open`` cuts off before appending again. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

FILE_PURPOSES = ("batch",)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("failed", "completed", "expired", "cancelled")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}


class NotFound(KeyError):
    """No file or batch has this id."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "tierserve"


def _write_json(path: Path, document: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _valid_id(value: str, prefix: str) -> bool:
    """Ids are ours (prefix + hex): anything else names nothing, and never a path."""
    rest = value[len(prefix):]
    return value.startswith(prefix) and 0 < len(rest) <= 64 and rest.isalnum()


class FileStore:
    """Files as OpenAI's Files API describes them."""

    def __init__(self, root: Path) -> None:
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)

    def create(self, data: bytes, filename: str, purpose: str, file_id: str | None = None
               ) -> dict:
        file_id = file_id or f"file-{secrets.token_hex(12)}"
        (self.root / f"{file_id}.data").write_bytes(data)
        document = {"id": file_id, "object": "file", "bytes": len(data),
                    "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                    "status": "processed", "status_details": None}
        _write_json(self.root / f"{file_id}.json", document)
        return document

    def get(self, file_id: str) -> dict:
        path = self.root / f"{file_id}.json"
        if not _valid_id(file_id, "file-") or not path.exists():
            raise NotFound(file_id)
        return json.loads(path.read_text(encoding="utf-8"))

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return (self.root / f"{file_id}.data").read_bytes()

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / f"{file_id}.json").unlink()
        (self.root / f"{file_id}.data").unlink(missing_ok=True)

    def list(self, purpose: str | None = None) -> list[dict]:
        """Newest first."""
        files = []
        for path in self.root.glob("file-*.json"):
            try:
                files.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                continue  # deleted meanwhile
        files = [f for f in files if purpose is None or f["purpose"] == purpose]
        return sorted(files, key=lambda f: (f["created_at"], f["id"]), reverse=True)


class BatchStore:
    """Batch objects and their result logs."""

    def __init__(self, root: Path) -> None:
        self.root = root / "batches"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def create(self, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict | None, total: int) -> dict:
        now = int(time.time())
        batch = {"id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": endpoint,
                 "errors": None, "input_file_id": input_file_id,
                 "completion_window": completion_window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now,
                 "in_progress_at": None,
                 "expires_at": now + COMPLETION_WINDOW_S[completion_window],
                 "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": total, "completed": 0, "failed": 0},
                 "metadata": metadata}
        self.save(batch)
        return batch

    def save(self, batch: dict) -> None:
        with self._lock:
            _write_json(self.root / f"{batch['id']}.json", batch)

    def get(self, batch_id: str) -> dict:
        path = self.root / f"{batch_id}.json"
        if not _valid_id(batch_id, "batch_") or not path.exists():
            raise NotFound(batch_id)
        return json.loads(path.read_text(encoding="utf-8"))

    def list(self) -> list[dict]:
        """Newest first."""
        batches = [json.loads(p.read_text(encoding="utf-8"))
                   for p in self.root.glob("batch_*.json")]
        return sorted(batches, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def update(self, batch_id: str, expect: tuple[str, ...] | None = None, **fields
               ) -> dict | None:
        """Change some fields; with ``expect``, only if the status is one of those (else
        None): a cancel from a request thread is never overwritten."""
        with self._lock:
            batch = self.get(batch_id)
            if expect is not None and batch["status"] not in expect:
                return None
            batch.update(fields)
            _write_json(self.root / f"{batch_id}.json", batch)
            return batch

    def log_path(self, batch_id: str, kind: str) -> Path:
        return self.root / f"{batch_id}.{kind}.jsonl"


class ResultLog:
    """One batch's results: output lines (status 200) and error lines, appended as they
    finish. Their order is the order requests finished in, not the input order; each line
    carries its ``custom_id``, as OpenAI's output files do."""

    def __init__(self, store: BatchStore, batch_id: str) -> None:
        self.paths = {kind: store.log_path(batch_id, kind) for kind in ("output", "errors")}
        self.done: set[str] = set()
        self.counts = {"completed": 0, "failed": 0}
        self._files = {}
        self._lock = threading.Lock()

    def open(self) -> ResultLog:
        """Read what an earlier run wrote (cutting a torn last line) and open for appending."""
        for kind, path in self.paths.items():
            kept = 0
            if path.exists():
                data = path.read_bytes()
                for line in data.split(b"\n")[:-1]:  # a line counts only with its newline
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.done.add(record["custom_id"])
                    self.counts["completed" if _succeeded(record) else "failed"] += 1
                    kept += len(line) + 1
                if kept != len(data):
                    with open(path, "r+b") as f:
                        f.truncate(kept)
            self._files[kind] = open(path, "ab")
        return self

    def append(self, record: dict) -> None:
        ok = _succeeded(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if record["custom_id"] in self.done:
                return  # never twice (a resumed request that finished before the crash)
            out = self._files["output" if ok else "errors"]
            out.write(line)
            out.flush()
            self.done.add(record["custom_id"])
            self.counts["completed" if ok else "failed"] += 1

    def close(self, sync: bool = True) -> None:
        with self._lock:
            for f in self._files.values():
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
                f.close()
            self._files = {}

    def size(self, kind: str) -> int:
        path = self.paths[kind]
        return path.stat().st_size if path.exists() else 0


def _succeeded(record: dict) -> bool:
    response = record.get("response")
    return bool(response) and response.get("status_code") == 200
