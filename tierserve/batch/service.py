"""BatchService: the HTTP Batch API's worker. It runs uploaded batches through the BatchLLM plan
on the server's own engine, beside online traffic, and keeps their state on disk.

Batches run one at a time, oldest first. A batch is validated (its lines' format: JSON, a unique
``custom_id``, ``method`` POST, ``url`` equal to the batch's endpoint; any fault fails the whole
batch with ``errors``), then its requests' bodies are checked one by one (a bad body is a 400 line
in the error file; the rest run), planned as ``tierserve batch`` plans them, and submitted in plan
order as background requests (``BACKGROUND_PRIORITY``):

- online requests keep priority: they are scheduled first and the scheduler preempts batch
  requests to admit them (every policy);
- a batch uses the slack: while online requests are in flight, the batch's admitted requests
  reserve at most ``share`` of the KV pool and of ``--max-num-seqs`` (``--batch-share``, default
  0.5); with no online request in flight it may take ``idle_share`` (0.95), as ``tierserve batch``
  does. What it reserves is the planner's memory-centric estimate (prompt tokens not shared
  with a leader, plus the output length estimate of ``OutputLengthHistory``).

Every finished request is appended to the batch's result log at once (``ResultLog``). A server
restarted mid-batch reads the log back, keeps what is there and runs only the rest: nothing is
lost or done twice. Cancelling aborts the requests in flight (their KV blocks go back at the next
engine step) and publishes what finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tierserve.batch.jobfile import (
    Job,
    failed_response,
    jsonl_lines,
    parse_line,
    success_line,
)
from tierserve.batch.planner import BatchItem, OutputLengthHistory, plan_batch
from tierserve.batch.runner import expected_output, reserved_tokens
from tierserve.batch.store import (
    COMPLETION_WINDOW_S,
    ENDPOINTS,
    FILE_PURPOSES,
    TERMINAL,
    BatchStore,
    FileStore,
    NotFound,
    ResultLog,
)
from tierserve.batch.validate import format_faults
from tierserve.engine.async_engine import AsyncEngine, EngineDeadError
from tierserve.request import BACKGROUND_PRIORITY

log = logging.getLogger(__name__)

OUTPUT_ESTIMATE_CAP = 512  # the output a request that leaves max_tokens open is planned at
RETRY_S = 5  # seconds before the worker tries again after the data directory failed it
ONLINE_HOLD_S = 2.0  # online traffic counts as present this long after its last request


class BatchRequestError(Exception):
    """A Batch API call refused: the router turns it into an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(slots=True)
class BatchSettings:
    data_dir: Path
    share: float = 0.5  # of the KV pool and of max_num_seqs, while online requests are in flight
    idle_share: float = 0.95  # with no online request in flight
    max_file_bytes: int = 200 << 20
    max_requests: int = 50_000


@dataclass(slots=True)
class _Pending:
    job: Job
    group: int
    leader: int | None  # line of the request that computes the shared prefix
    shared_len: int
    declared: int  # the output budget per completion
    need_tokens: int = 0


class BatchService:
    """Owns the Files and Batches stores and runs batches on an AsyncEngine."""

    def __init__(self, engine: AsyncEngine, model_name: str, settings: BatchSettings) -> None:
        if not 0 < settings.share <= settings.idle_share <= 1:
            raise ValueError(f"--batch-share must be in (0, {settings.idle_share}], got "
                             f"{settings.share}")
        self.engine, self.model_name, self.settings = engine, model_name, settings
        self.files = FileStore(settings.data_dir)
        self.batches = BatchStore(settings.data_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._current: str | None = None  # the batch running now
        self._log: ResultLog | None = None  # its results
        self._cancelled: set[str] = set()  # cancels asked for (by any thread)
        self._in_flight = 0  # batch user requests in the engine now

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (from the event loop); unfinished batches resume first."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._worker = asyncio.ensure_future(self._work())
        pending = [b["id"] for b in self.batches.list() if b["status"] not in TERMINAL]
        if pending:
            log.info("batch API: resuming %d unfinished batch(es): %s", len(pending),
                     ", ".join(pending))
        self._wake.set()

    async def stop(self) -> None:
        """Stop the worker; a batch in progress stays in progress and resumes next start."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None

    def _wake_worker(self) -> None:
        """Safe from any thread (the API's calls run in worker threads)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- the API ---------------------------------------------------------------------------------
    def create_file(self, data: bytes, filename: str, purpose: str) -> dict:
        if purpose not in FILE_PURPOSES:
            raise BatchRequestError(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}; "
                                    "this server stores files for the Batch API only", "purpose")
        if len(data) > self.settings.max_file_bytes:
            raise BatchRequestError(400, f"the file has {len(data):,} bytes; at most "
                                    f"{self.settings.max_file_bytes:,} (--max-batch-file-size)",
                                    "file", "file_too_large")
        return self.files.create(data, filename or "upload.jsonl", purpose)

    def get_file(self, file_id: str) -> dict:
        try:
            return self.files.get(file_id)
        except NotFound:
            raise _no_file(file_id, "file_id") from None

    def file_content(self, file_id: str) -> bytes:
        try:
            return self.files.content(file_id)
        except NotFound:
            raise _no_file(file_id, "file_id") from None

    def delete_file(self, file_id: str) -> dict:
        self.get_file(file_id)
        users = [b["id"] for b in self.batches.list()
                 if b["input_file_id"] == file_id and b["status"] not in TERMINAL]
        if users:
            raise BatchRequestError(409, f"file {file_id} is the input of unfinished batch "
                                    f"{users[0]}; cancel it first", "file_id", "file_in_use")
        self.files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict | None) -> dict:
        if endpoint not in ENDPOINTS:
            raise BatchRequestError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}",
                                    "endpoint", "invalid_endpoint")
        if completion_window not in COMPLETION_WINDOW_S:
            raise BatchRequestError(400, "completion_window must be '24h'", "completion_window")
        try:
            file = self.files.get(input_file_id)
        except NotFound:
            raise _no_file(input_file_id, "input_file_id") from None
        if file["purpose"] != "batch":
            raise BatchRequestError(400, f"file {input_file_id} has purpose {file['purpose']!r}; "
                                    "a batch's input needs purpose 'batch'", "input_file_id")
        try:
            total = sum(1 for line in jsonl_lines(self.files.content(input_file_id))
                        if line.strip())
        except UnicodeDecodeError as exc:
            raise BatchRequestError(400, f"file {input_file_id} is not UTF-8 text: {exc}",
                                    "input_file_id", "invalid_file") from None
        if total == 0:
            raise BatchRequestError(400, f"file {input_file_id} has no request lines",
                                    "input_file_id", "empty_file")
        if total > self.settings.max_requests:
            raise BatchRequestError(400, f"file {input_file_id} has {total:,} requests; a batch "
                                    f"takes at most {self.settings.max_requests:,} "
                                    "(--max-batch-requests): split it", "input_file_id",
                                    "batch_too_large")
        batch = self.batches.create(input_file_id, endpoint, completion_window, metadata, total)
        log.info("batch %s: created from %s (%d requests, %s)", batch["id"], input_file_id,
                 total, endpoint)
        self._wake_worker()
        return batch

    def get_batch(self, batch_id: str) -> dict:
        try:
            return self._live(self.batches.get(batch_id))
        except NotFound:
            raise BatchRequestError(404, f"No batch with id '{batch_id}' (GET /v1/batches lists "
                                    "them)", "batch_id", "batch_not_found") from None

    def list_batches(self) -> list[dict]:
        return [self._live(batch) for batch in self.batches.list()]

    def _live(self, batch: dict) -> dict:
        """The stored batch with the running one's counts as they are now."""
        results = self._log if batch["id"] == self._current else None
        if results is not None and batch["status"] not in TERMINAL:
            batch["request_counts"] = {"total": batch["request_counts"]["total"],
                                       **results.counts}
        return batch

    def list_files(self, purpose: str | None) -> list[dict]:
        return self.files.list(purpose)

    def cancel_batch(self, batch_id: str) -> dict:
        batch = self.get_batch(batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] in TERMINAL:
            raise BatchRequestError(409, f"batch {batch_id} is already {batch['status']}; only "
                                    "an unfinished batch can be cancelled", "batch_id",
                                    "batch_not_cancellable")
        if self.batches.update(batch_id, expect=("validating", "in_progress", "finalizing"),
                               status="cancelling", cancelling_at=int(time.time())) is None:
            return self.cancel_batch(batch_id)  # it changed meanwhile: answer for its new state
        log.info("batch %s: cancelling", batch_id)
        self._cancelled.add(batch_id)
        self._wake_worker()
        return self.get_batch(batch_id)

    # -- the worker ------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    pending = await asyncio.to_thread(self._pending)
                except OSError:
                    log.exception("batch API: cannot read the data directory; retrying")
                    await asyncio.sleep(RETRY_S)
                    continue
                if not pending:
                    break
                # Cancelled ones first (they only publish what finished), then the oldest.
                batch = min(pending, key=lambda b: (b["status"] != "cancelling",
                                                    b["created_at"], b["id"]))
                try:
                    await self._run(batch["id"])
                except EngineDeadError:
                    log.error("batch %s: the engine stopped; the batch resumes when the server "
                              "restarts", batch["id"])
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
                    log.exception("batch %s failed", batch["id"])
                    try:
                        self._fail(batch["id"], "internal_error", f"{type(exc).__name__}: {exc}")
                    except Exception:  # noqa: BLE001 - e.g. a full disk: try again later
                        log.exception("batch %s: cannot record the failure; retrying in %d s",
                                      batch["id"], RETRY_S)
                        await asyncio.sleep(RETRY_S)
                finally:
                    self._current = None
                    results, self._log = self._log, None
                    if results is not None:
                        results.close(sync=False)
                await asyncio.sleep(0)  # the event loop serves in between

    def _pending(self) -> list[dict]:
        return [b for b in self.batches.list() if b["status"] not in TERMINAL]

    async def _run(self, batch_id: str) -> None:
        batch = self.batches.get(batch_id)
        self._current = batch_id
        if batch["status"] == "cancelling":
            self._cancelled.add(batch_id)
        if batch["status"] == "validating":
            errors = await asyncio.to_thread(self._validate, batch)
            if errors:
                self._fail(batch_id, errors=errors)
            else:
                self.batches.update(batch_id, expect=("validating",), status="in_progress",
                                    in_progress_at=int(time.time()))
            batch = self.batches.get(batch_id)  # or cancelled meanwhile
            if batch["status"] == "failed":
                return
        self._log = await asyncio.to_thread(ResultLog(self.batches, batch_id).open)
        if batch["status"] == "in_progress":
            await self._run_requests(batch)
        batch = self.batches.get(batch_id)
        if (batch_id in self._cancelled or batch["status"] == "cancelling"
                or batch["cancelling_at"] is not None):
            status = "cancelled"
        elif time.time() > batch["expires_at"]:
            status = "expired"
        else:  # done, or killed while finalizing
            status = "completed"
        await asyncio.to_thread(self._finalize, batch_id, status)
        self._cancelled.discard(batch_id)

    def _lines(self, batch: dict) -> list[tuple[int, str]]:
        """The request lines with their line numbers (from 1); blank lines are skipped."""
        return [(number, line) for number, line in
                enumerate(jsonl_lines(self.files.content(batch["input_file_id"])), 1)
                if line.strip()]

    def _validate(self, batch: dict) -> list[dict]:
        """Format faults that fail the whole batch, as OpenAI's ``errors.data``."""
        try:
            lines = self._lines(batch)
        except UnicodeDecodeError as exc:
            return [{"code": "invalid_file", "message": f"the file is not UTF-8 text: {exc}",
                     "param": None, "line": None}]
        except NotFound:
            return [{"code": "file_not_found", "message": f"input file "
                     f"{batch['input_file_id']} was deleted", "param": None, "line": None}]
        return format_faults(lines, batch["endpoint"])

    async def _run_requests(self, batch: dict) -> None:
        batch_id, results = batch["id"], self._log
        lines = await asyncio.to_thread(self._lines, batch)
        engine = self.engine
        suffix = batch_id.removeprefix("batch_")

        def parse() -> list[Job]:
            jobs = []
            for number, text in lines:
                record_id = json.loads(text)["custom_id"]
                if record_id in results.done:
                    continue
                job = parse_line(number - 1, text, engine.tokenizer, engine.core,
                                 batch["endpoint"], self.model_name)
                job.id_prefix = f"batch_req_{suffix}_"
                if job.result is not None:
                    job.result["id"] = job.line_id
                jobs.append(job)
            return jobs

        jobs = await asyncio.to_thread(parse)
        if results.done:
            log.info("batch %s: resuming, %d of %d requests already done", batch_id,
                     len(results.done), len(lines))
        for job in jobs:
            if job.result is not None:  # a body the server refuses: its error line now
                results.append(job.result)
        runnable = [job for job in jobs if job.result is None]
        queue = deque(await asyncio.to_thread(self._plan, runnable))
        log.info("batch %s: running %d requests", batch_id, len(runnable))
        await self._drive(batch, queue)

    def _plan(self, jobs: list[Job]) -> list[_Pending]:
        limits = self.engine.core.limits
        items = [BatchItem(i, job.prompt[1], expected_output(limits, job.prompt[1], job.params,
                                                             OUTPUT_ESTIMATE_CAP))
                 for i, job in enumerate(jobs)]
        plan = plan_batch(items, self.engine.core.kv.block_size)
        return [_Pending(jobs[p.item.index], p.group,
                         jobs[p.leader].line if p.leader is not None else None,
                         p.shared_len if p.leader is not None else 0, p.item.max_tokens)
                for p in plan.requests]

    def _budget(self) -> tuple[int, int]:
        """KV tokens and sequences the batch may reserve now (the slack rule). Online traffic
        counts as present for ONLINE_HOLD_S after its last request: a client sending one
        request after another would otherwise find the pool full of batch work each time."""
        core = self.engine.core
        online = (self.engine.num_in_flight - self._in_flight > 0
                  or time.monotonic() - self.engine.last_online_at < ONLINE_HOLD_S)
        share = self.settings.share if online else self.settings.idle_share
        tokens = int(core.kv.num_blocks * core.kv.block_size * share)
        return tokens, max(1, int(core.scheduler.config.max_num_seqs * share))

    async def _drive(self, batch: dict, queue: deque[_Pending]) -> None:
        batch_id, results = batch["id"], self._log
        history = OutputLengthHistory()
        leaders: dict[int, str] = {}  # line -> its first engine request id
        tasks: dict[asyncio.Task, _Pending] = {}
        used = seqs = 0

        def need(pending: _Pending) -> int:
            n = pending.job.params.n
            return reserved_tokens(n * (len(pending.job.prompt[1]) - pending.shared_len),
                                   [pending.declared] * n, pending.group, history)

        try:
            while queue or tasks:
                if batch_id in self._cancelled:
                    return
                if len(self._cancelled) > 0:
                    await self._finish_queued_cancels(batch_id)
                if time.time() > batch["expires_at"]:
                    self._expire([p.job for p in tasks.values()] + [p.job for p in queue])
                    return
                tokens, max_seqs = self._budget()
                while queue and (not tasks or (used + need(queue[0]) <= tokens
                                               and seqs + queue[0].job.params.n <= max_seqs)):
                    pending = queue.popleft()
                    pending.need_tokens = need(pending)
                    task = self._submit(batch_id, pending, leaders)
                    tasks[task] = pending
                    used += pending.need_tokens
                    seqs += pending.job.params.n
                    self._in_flight += 1
                done, _ = await asyncio.wait(tasks, timeout=0.25,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    pending = tasks.pop(task)
                    used -= pending.need_tokens
                    seqs -= pending.job.params.n
                    self._in_flight -= 1
                    job = pending.job
                    try:
                        output = task.result()
                        if output is None or output.error:
                            reason = output.error if output is not None else "it was aborted"
                            raise RuntimeError(reason)
                        line = success_line(job, output, self.model_name)
                    except EngineDeadError:
                        raise  # the batch resumes when the server restarts
                    except Exception as exc:  # noqa: BLE001 - this request alone fails
                        results.append(failed_response(job, f"the request failed: {exc}",
                                                       None, status=500))
                        continue
                    for completion in output.outputs:
                        history.observe(pending.group, len(completion.token_ids))
                    results.append(line)
        finally:
            for task in tasks:
                task.cancel()  # its stream closes: the engine aborts the request, frees blocks
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._in_flight = 0

    async def _finish_queued_cancels(self, running: str) -> None:
        """A batch cancelled while it waits behind the running one ends now, not after it."""
        for batch_id in list(self._cancelled - {running}):
            try:
                if self.batches.get(batch_id)["status"] == "cancelling":
                    results = await asyncio.to_thread(ResultLog(self.batches, batch_id).open)
                    await asyncio.to_thread(self._finalize, batch_id, "cancelled", results)
            except Exception:  # noqa: BLE001 - the worker finalizes it later instead
                log.exception("batch %s: finalizing the cancel failed", batch_id)
            self._cancelled.discard(batch_id)

    def _submit(self, batch_id: str, pending: _Pending, leaders: dict[int, str]) -> asyncio.Task:
        job, engine = pending.job, self.engine
        request_id = f"{batch_id}-{job.line}"
        leader = leaders.get(pending.leader) if pending.leader is not None else None
        requests = engine.make_requests(request_id, job.prompt[1], job.params,
                                        priority=BACKGROUND_PRIORITY, leader=leader,
                                        shared_prefix_len=pending.shared_len if leader else None)
        leaders[job.line] = requests[0].request_id
        stream = engine.generate(request_id, job.prompt[0], requests)

        async def last():
            final = None
            try:
                async for output in stream:
                    final = output
            finally:
                await stream.aclose()
            return final

        return asyncio.ensure_future(last())

    # -- endings ---------------------------------------------------------------------------------
    def _fail(self, batch_id: str, code: str = "", message: str = "",
              errors: list[dict] | None = None) -> None:
        errors = errors or [{"code": code, "message": message, "param": None, "line": None}]
        if self.batches.update(batch_id, expect=("validating", "in_progress", "finalizing",
                                                 "cancelling"), status="failed",
                               failed_at=int(time.time()),
                               errors={"object": "list", "data": errors}) is None:
            return  # cancelled meanwhile: it ends as cancelled
        log.warning("batch %s failed: %s", batch_id, errors[0]["message"])

    def _expire(self, unfinished: list[Job]) -> None:
        """Error lines for what did not run; the batch is then finalized as expired."""
        for job in unfinished:
            self._log.append({"id": job.line_id, "custom_id": job.custom_id, "response": None,
                              "error": {"code": "batch_expired", "message": "the batch expired "
                                        "before this request ran"}})

    def _finalize(self, batch_id: str, status: str, results: ResultLog | None = None) -> None:
        """Publish the result logs as files and end the batch (the running one's, unless
        ``results`` names another's). Idempotent: a server killed while finalizing does it
        again, to the same file ids."""
        now = int(time.time())
        own = results is None
        results = self._log if own else results
        self.batches.update(batch_id, status="finalizing", finalizing_at=now)
        results.close()
        suffix = batch_id.removeprefix("batch_")
        ids = {}
        for kind, tag in (("output", "out"), ("errors", "err")):
            path = results.paths[kind]
            if path.exists() and path.stat().st_size:
                ids[kind] = self.files.create(path.read_bytes(), f"{batch_id}_{kind}.jsonl",
                                              "batch_output", file_id=f"file-{suffix}{tag}")["id"]
        total = self.batches.get(batch_id)["request_counts"]["total"]
        self.batches.update(batch_id, status=status, **{f"{status}_at": now},
                            output_file_id=ids.get("output"), error_file_id=ids.get("errors"),
                            request_counts={"total": total, **results.counts})
        log.info("batch %s: %s (%d completed, %d failed)", batch_id, status,
                 results.counts["completed"], results.counts["failed"])
        if own:
            self._log = None


def _no_file(file_id: str, param: str) -> BatchRequestError:
    return BatchRequestError(404, f"No file with id '{file_id}' (GET /v1/files lists them)",
                             param, "file_not_found")
