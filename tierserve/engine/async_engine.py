"""AsyncEngine: the engine loop and the output work on background threads, with per-request async
streams for the server.

```
  asyncio loop  --add, abort-------------------> engine thread  (core.step, and commands between)
  engine thread --add, step updates, abort-----> output thread  (OutputProcessor: detokenize,
  output thread --stop (a stop string fired),--> engine thread   stop strings, logprobs)
                  fail (its text work failed)
  output thread --RequestOutput (call_soon_threadsafe)--> the request's asyncio stream
```

The asyncio event loop never runs a model step or tokenizes. The engine thread runs only model
steps and the commands between them, so the text work of one step overlaps the next model step
(torch ops release the GIL). The output thread owns the OutputProcessor alone; the engine thread
keeps its own map of user request -> engine requests for aborts. An aborted request (a client
that went away) is dropped at the start of the next engine step, which frees its KV blocks; so is
a request a stop string ended (the engine may have run a step or two more of it meanwhile, whose
tokens the client never sees).

A request that fails (in a step, or in its text work here) ends with an error output on its own
stream; the engine and every other stream go on. Only a bug in these loops themselves stops
them (EngineDeadError for everyone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tierserve.engine.loading import LoadedEngine
from tierserve.engine.output import OutputProcessor
from tierserve.outputs import RequestOutput
from tierserve.request import BACKGROUND_PRIORITY, Request, RequestStatus, SamplingParams
from tierserve.sched.plan import RequestUpdate

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the server answers 503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a bug or a fatal error); nothing more can be served."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    background: bool = False


class AsyncEngine:
    """Runs ``EngineCore.step`` in a loop on a background thread and turns its updates into
    RequestOutputs on a second one."""

    def __init__(self, engine: LoadedEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.core = engine.core
        self.tokenizer = engine.tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # -> engine thread
        self._wake = threading.Event()
        self._engine_ids: dict[str, list[str]] = {}  # user -> engine request ids; engine thread
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # -> output thread; None ends it
        self._processor = OutputProcessor(self.tokenizer)  # the output thread's alone
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        # Background (Batch API) requests do not count toward max_waiting_requests: those
        # waiting in the scheduler (the engine thread's count, kept current at each add and
        # step) and those whose add command is still queued (counted down by the engine thread).
        self._background_waiting = 0
        # When an online (not background) request last started or ended (monotonic seconds).
        self.last_online_at = float("-inf")
        self._background_submitted = 0  # written by the event loop only
        self._background_applied = 0  # written by the engine thread only
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tierserve-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._run_outputs, name="tierserve-output",
                                               daemon=True)
        self._output_thread.start()
        self._thread.start()

    # -- status --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return (self._thread.is_alive() and self._output_thread.is_alive()
                and self.error is None)

    def health_problem(self, max_consecutive_step_failures: int = 3) -> str | None:
        """Why this server should be restarted, or None: a loop died, the KV accounting broke,
        or that many engine steps in a row failed as a whole (the last one's error)."""
        core = self.core
        if not self.alive:
            return f"the engine loop stopped: {self.error!r}"
        if core.fatal_error is not None:
            return core.fatal_error
        if core.consecutive_step_failures >= max_consecutive_step_failures:
            return (f"{core.consecutive_step_failures} engine steps in a row failed; the last: "
                    f"{core.last_step_error}")
        return None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def next_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000) % 10**8}"

    # -- requests ------------------------------------------------------------------------------
    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      client_id: str | None = None, priority: int = 0, leader: str | None = None,
                      shared_prefix_len: int | None = None) -> list[Request]:
        """Validate and build the engine requests for one user request (``n`` of them);
        ``leader``/``shared_prefix_len`` as in ``EngineCore.make_requests`` (a batch plan)."""
        return self.core.make_requests(request_id, prompt_ids, params, client_id=client_id,
                                       priority=priority, leader=leader,
                                       shared_prefix_len=shared_prefix_len)

    def generate(self, request_id: str, prompt: str | None, requests: list[Request]
                 ) -> AsyncIterator[RequestOutput]:
        """Submit a user request now and return an iterator of its RequestOutput after every
        step that changed it. Call from the event loop.

        Admission is decided here, not at the first iteration, so a server refuses a streamed
        request (EngineDeadError, QueueFullError) before its response starts, and requests
        submitted together count each other as waiting. Closing the iterator early (a client
        that disconnected) aborts the request; so does dropping it before its first iteration.
        """
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        background = all(r.priority >= BACKGROUND_PRIORITY for r in requests)
        queued = self._background_submitted - self._background_applied
        waiting = max(0, self.core.scheduler.num_waiting - self._background_waiting
                      + self._commands.qsize() - queued)
        if (self.max_waiting_requests is not None and not background
                and waiting >= self.max_waiting_requests):
            raise QueueFullError(f"{waiting} requests are already waiting "
                                 f"(--max-waiting-requests {self.max_waiting_requests})")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), background)
        self._streams[request_id] = stream
        if background:
            self._background_submitted += 1
        else:
            self.last_online_at = time.monotonic()
        self._command(("add", request_id, prompt, requests))
        outputs = self._follow(request_id, stream)
        # NOTE: an async generator that never started does not run its finally when closed or
        # collected (e.g. a client gone before its streamed response began): release on
        # collection too. Releasing twice changes nothing.
        weakref.finalize(outputs, self._release_soon, stream.loop, request_id)
        return outputs

    def _release_soon(self, loop: asyncio.AbstractEventLoop, request_id: str) -> None:
        """``_release`` from a weakref callback, which the garbage collector may run on any
        thread, even one inside a lock ``abort`` takes: hand it to the event loop; a loop
        already closed gets a bare abort command (a queue put, safe anywhere)."""
        try:
            loop.call_soon_threadsafe(self._release, request_id)
        except RuntimeError:  # the loop is closed
            self._streams.pop(request_id, None)
            self._commands.put(("abort", request_id))

    async def _follow(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._release(request_id)

    def _release(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # released already
        if not stream.background:
            self.last_online_at = time.monotonic()
        # NOTE: also after a finished output: it drops the engine thread's id map entry, and
        # ending requests that already finished changes nothing. A stop string's own "stop"
        # command was queued before its finished output was delivered, so it comes first.
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a user request (all its completions); safe from any thread, idempotent."""
        self._command(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the engine and output threads."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._output_thread.join(timeout)
        self.engine.runner.close()

    # -- the engine thread ---------------------------------------------------------------------
    def _command(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping and self.error is None:
                self._apply_commands()
                if not self.core.has_unfinished() and not self.core.kv.has_inflight:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                updates = self.core.step()
                self._background_waiting = sum(
                    1 for r in self.core.scheduler.waiting if r.priority >= BACKGROUND_PRIORITY)
                if updates:
                    self._outputs.put(("updates", updates))
            self._abort_all()
        except BaseException as exc:  # a bug: fail every stream loudly, keep the error
            self._fail("engine loop", exc)
        finally:
            self._outputs.put(None)  # the output thread ends after what is queued before it

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, requests = command
                background = all(r.priority >= BACKGROUND_PRIORITY for r in requests)
                if background:
                    self._background_applied += 1
                if request_id not in self._streams:
                    continue  # the client left before the request reached the engine
                if background:
                    self._background_waiting += len(requests)
                # The add reaches the output thread before any update of these requests.
                self._outputs.put(command)
                self._engine_ids[request_id] = [r.request_id for r in requests]
                self._add(request_id, requests)
            elif kind == "stop":
                self.core.abort(command[1], status=RequestStatus.FINISHED_STOPPED)
            elif kind == "fail":
                self.core.abort(command[1], status=RequestStatus.FINISHED_ERROR)
            else:
                self._abort(command[1])

    def _add(self, request_id: str, requests: list[Request]) -> None:
        try:
            for request in requests:
                self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - this request alone cannot start
            log.exception("request %s could not be added", request_id)
            failed = [RequestUpdate(r.request_id, [], finished=True, finish_reason="error",
                                    error=f"it could not be queued: {exc}") for r in requests]
            self.core.abort([r.request_id for r in requests], status=RequestStatus.FINISHED_ERROR)
            self._outputs.put(("updates", failed))

    def _abort(self, request_id: str) -> None:
        self.core.abort(self._engine_ids.pop(request_id, []))
        self._outputs.put(("abort", request_id))

    def _abort_all(self) -> None:
        # Also the requests of streams already closed whose aborts were not applied (the loop
        # stopped on an output thread error): their blocks go back too.
        for request_id in set(self._streams) | set(self._engine_ids):
            self._abort(request_id)  # the output thread then ends a stream still open

    def _fail(self, where: str, exc: BaseException) -> None:
        log.exception("%s died", where)
        if self.error is None:
            self.error = exc
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait,
                                             EngineDeadError(f"{where} died: {exc}"))
        self._wake.set()  # the engine loop sees the error and stops

    # -- the output thread ---------------------------------------------------------------------
    def _run_outputs(self) -> None:
        processor = self._processor
        try:
            while (item := self._outputs.get()) is not None:
                kind = item[0]
                if kind == "updates":
                    self._process(item[1])
                elif kind == "add":
                    self._track(*item[1:])
                else:
                    processor.abort(item[1])
                    # Reaches only a stream still open (shutdown): a client abort closed its own.
                    self._deliver(RequestOutput(item[1], None, [], [], finished=True))
        except BaseException as exc:  # a bug: same as an engine loop death
            self._fail("output thread", exc)

    def _track(self, request_id: str, prompt: str | None, requests: list[Request]) -> None:
        try:
            self._processor.add(request_id, prompt, requests)
        except Exception as exc:  # noqa: BLE001 - fails this request, not the thread
            log.exception("request %s: its output state could not be set up", request_id)
            self._command(("fail", [r.request_id for r in requests]))
            self._deliver(RequestOutput(request_id, prompt, requests[0].prompt_token_ids, [],
                                        finished=True, error=f"setting up its output failed: "
                                        f"{type(exc).__name__}: {exc}"))

    def _process(self, updates: list[RequestUpdate]) -> None:
        folded = self._processor.process(updates)
        # Before the outputs go out: see the NOTE in generate().
        if folded.to_stop:
            self._command(("stop", folded.to_stop))
        if folded.to_fail:
            self._command(("fail", folded.to_fail))
        for output in folded.outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)
