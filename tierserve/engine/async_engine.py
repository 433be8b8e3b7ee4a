"""AsyncEngine: the engine loop on its own thread, with per-request async streams for the server.

The asyncio event loop never runs a model step or tokenizes: it hands commands (add, abort) to the
engine thread through a queue and receives RequestOutputs through per-request asyncio queues. An
aborted request (a client that went away) is dropped at the start of the next engine step, which
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tierserve.engine.loading import LoadedEngine
from tierserve.engine.output import OutputProcessor
from tierserve.outputs import RequestOutput
from tierserve.request import Request, SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the server answers 503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a bug or a fatal error); nothing more can be served."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    engine_ids: list[str]


class AsyncEngine:
    """Runs ``EngineCore.step`` in a loop on a background thread."""

    def __init__(self, engine: LoadedEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.core = engine.core
        self.tokenizer = engine.tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._processor = OutputProcessor(self.tokenizer)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tierserve-engine", daemon=True)
        self._thread.start()

    # -- status --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def next_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000) % 10**8}"

    # -- requests ------------------------------------------------------------------------------
    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      client_id: str | None = None, priority: int = 0) -> list[Request]:
        """Validate and build the engine requests for one user request (``n`` of them)."""
        return self.core.make_requests(request_id, prompt_ids, params, client_id=client_id,
                                       priority=priority)

    async def generate(self, request_id: str, prompt: str | None, requests: list[Request]
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a user request and yield its RequestOutput after every step that changed it.

        Closing the iterator early (a client that disconnected) aborts the request.
        """
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        waiting = self.core.scheduler.num_waiting + self._commands.qsize()
        if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{waiting} requests are already waiting "
                                 f"(--max-waiting-requests {self.max_waiting_requests})")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         [r.request_id for r in requests])
        self._streams[request_id] = stream
        self._command(("add", request_id, prompt, requests))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a user request (all its completions); safe from any thread, idempotent."""
        self._command(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the engine thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.engine.runner.close()

    # -- the engine thread ---------------------------------------------------------------------
    def _command(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.core.has_unfinished() and not self.core.kv.has_inflight:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            self._abort_all()
        except BaseException as exc:  # a bug: fail every stream loudly, keep the error
            log.exception("engine loop died")
            self.error = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait,
                                                 EngineDeadError(f"engine loop died: {exc}"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, requests = command
                if request_id not in self._streams:
                    continue  # the client left before the request reached the engine
                self._processor.add(request_id, prompt, requests)
                for request in requests:
                    self.core.add_request(request)
            else:
                self._abort(command[1])

    def _abort(self, request_id: str) -> None:
        engine_ids = self._processor.engine_ids(request_id)
        if engine_ids:
            self.core.abort(engine_ids)
            self._processor.abort(request_id)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._abort(request_id)
            self._deliver(RequestOutput(request_id, None, [], [], finished=True))

    def _step(self) -> None:
        for output in self._processor.step(self.core)[0]:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)
