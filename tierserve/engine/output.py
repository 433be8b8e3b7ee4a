"""OutputProcessor: RequestUpdates -> RequestOutputs. Detokenizes, applies stop strings, gathers n.

One user request with ``n`` completions is ``n`` engine requests; this class folds them back into
one RequestOutput and tells the engine which engine requests a stop string has ended, and which
to end because their user request failed (here, say its detokenizer raised, or in the engine).
A failure fails one user request, never the fold of the others.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tierserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tierserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tierserve.request import Request, RequestStatus
from tierserve.sched.plan import RequestUpdate, TokenLogprobs

if TYPE_CHECKING:
    from tierserve.engine.core import EngineCore


@dataclass(slots=True)
class _Completion:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None


@dataclass(slots=True)
class Folded:
    """One step's updates folded in: changed outputs, and engine requests the engine must end
    (a stop string fired; their user request failed)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    to_stop: list[str] = field(default_factory=list)
    to_fail: list[str] = field(default_factory=list)

    def end_in(self, core: EngineCore) -> None:
        """End ``to_stop`` and ``to_fail`` in ``core`` now."""
        if self.to_stop:
            core.abort(self.to_stop, status=RequestStatus.FINISHED_STOPPED)
        if self.to_fail:
            core.abort(self.to_fail, status=RequestStatus.FINISHED_ERROR)


class OutputProcessor:
    """Keeps the per-request text state between engine steps."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._by_engine_id: dict[str, tuple[_Parent, _Completion]] = {}

    def add(self, request_id: str, prompt: str | None, engine_requests: list[Request]) -> None:
        """Track a user request made of ``engine_requests`` (one per completion index)."""
        first = engine_requests[0]
        parent = _Parent(request_id, prompt, first.prompt_token_ids, [],
                         RequestMetrics(arrival_time=first.arrival_time))
        if first.sampling_params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]  # the first prompt token is not scored
        for index, request in enumerate(engine_requests):
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                           request.sampling_params.skip_special_tokens)
            completion = _Completion(index, request, detok)
            if request.sampling_params.logprobs is not None:
                completion.logprobs, completion.cumulative_logprob = [], 0.0
            parent.completions.append(completion)
            self._by_engine_id[request.request_id] = (parent, completion)
        self._parents[request_id] = parent

    def step(self, core) -> tuple[list[RequestOutput], int]:
        """Run one engine step and fold its updates in; a stop string that fired ends its
        request in the engine at once. Returns the changed outputs and the tokens generated."""
        updates = core.step()
        folded = self.process(updates)
        folded.end_in(core)
        return folded.outputs, sum(len(update.new_token_ids) for update in updates)

    def drive(self, core, on_step: Callable[[list[RequestOutput], int], None]) -> None:
        """Step ``core`` until it has nothing left, with the text work on a second thread.

        The calling thread only runs model steps; a ``tierserve-output`` thread folds each step's
        updates in (detokenize, stop strings, logprobs) while the next step runs, and calls
        ``on_step(changed outputs, tokens generated)`` once per step. A stop string ends its
        request in the engine before the step after the one that was running when it fired
        (that step's tokens of it are ignored here). An error on either thread stops both and is
        raised here.
        """
        steps: queue.SimpleQueue = queue.SimpleQueue()  # updates of each step; None ends
        ends: queue.SimpleQueue = queue.SimpleQueue()  # Folded: engine ids to end
        failed: list[BaseException] = []

        def fold() -> None:
            try:
                while (updates := steps.get()) is not None:
                    folded = self.process(updates)
                    if folded.to_stop or folded.to_fail:
                        ends.put(folded)
                    on_step(folded.outputs, sum(len(update.new_token_ids) for update in updates))
            except BaseException as exc:  # handed to the stepping thread, which raises it
                failed.append(exc)

        worker = threading.Thread(target=fold, name="tierserve-output", daemon=True)
        worker.start()
        try:
            while core.has_unfinished() and not failed:
                while not ends.empty():
                    ends.get().end_in(core)
                steps.put(core.step())
        finally:
            steps.put(None)
            worker.join()
        if failed:
            raise failed[0]

    @property
    def num_unfinished(self) -> int:
        return len(self._parents)

    def process(self, updates: list[RequestUpdate]) -> Folded:
        """Apply one step's updates: the changed RequestOutputs and the engine ids to end.

        Updates for a completion that has already finished are ignored: under AsyncEngine the
        engine may run more steps of a request that a stop string ended here before it hears.
        An error while folding one user request's update fails that request alone."""
        changed: dict[str, _Parent] = {}
        folded = Folded()
        now = time.monotonic()
        for update in updates:
            entry = self._by_engine_id.get(update.request_id)
            if entry is None:
                continue
            parent, completion = entry
            if completion.finish_reason is not None:
                continue  # a stop string ended it here; the engine had not stopped it yet
            changed[parent.request_id] = parent
            if update.finish_reason == "error":
                folded.to_fail += self._fail(parent, update.error or "the request failed")
                continue
            try:
                if parent.metrics.first_token_time is None and update.new_token_ids:
                    parent.metrics.first_token_time = now
                if self._apply(parent, completion, update):
                    folded.to_stop.append(update.request_id)
            except Exception as exc:  # noqa: BLE001 - this request's text work failed
                folded.to_fail += self._fail(parent, f"processing its output failed: "
                                                     f"{type(exc).__name__}: {exc}")
        for parent in changed.values():
            try:
                folded.outputs.append(self._snapshot(parent, now))
            except Exception as exc:  # noqa: BLE001
                folded.to_fail += self._fail(parent, f"building its output failed: "
                                                     f"{type(exc).__name__}: {exc}")
                self._forget(parent)
                folded.outputs.append(RequestOutput(parent.request_id, parent.prompt,
                                                    parent.prompt_token_ids, [], True,
                                                    error=parent.error))
        return folded

    def _fail(self, parent: _Parent, reason: str) -> list[str]:
        """Fail a user request: every completion still running ends with "error". Returns the
        engine ids to end (a completion that errs fails its siblings: the answer is lost)."""
        parent.error = parent.error or reason
        running = [c for c in parent.completions if c.finish_reason is None]
        for completion in running:
            completion.finish_reason = "error"
        return [c.request.request_id for c in running]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark every unfinished completion of a user request aborted and stop tracking it."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for completion in parent.completions:
            completion.finish_reason = completion.finish_reason or "abort"
        return self._snapshot(parent, time.monotonic())

    def _apply(self, parent: _Parent, completion: _Completion, update: RequestUpdate) -> bool:
        """Add the update's tokens; True when a stop string ended the completion here."""
        if update.new_prompt_logprobs and parent.prompt_logprobs is not None:
            parent.prompt_logprobs += [self._logprob_dict(e) for e in update.new_prompt_logprobs]
        token_stop = update.finished and update.finish_reason == "stop"
        text_before = len(completion.text)
        for position, token in enumerate(update.new_token_ids):
            completion.token_ids.append(token)
            is_last = position == len(update.new_token_ids) - 1
            if not (token_stop and is_last):  # a stop token's own text is never shown
                completion.text += completion.detokenizer.add(token)
        for entry in update.new_logprobs:
            self._add_logprobs(completion, entry)
        if update.finished:
            completion.finish_reason = update.finish_reason
            completion.stop_reason = update.stop_reason
            return False
        return self._check_stop_strings(completion, text_before)

    def _check_stop_strings(self, completion: _Completion, text_before: int) -> bool:
        params = completion.request.sampling_params
        if not params.stop or len(completion.text) == text_before:
            return False
        # A stop string may straddle old and new text: search from just before the new part.
        window_start = max(0, text_before - max(len(s) for s in params.stop) + 1)
        hits = [(completion.text.find(s, window_start), s) for s in params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        end = at + len(stop) if params.include_stop_str_in_output else at
        completion.text = completion.text[:end]
        completion.finish_reason, completion.stop_reason = "stop", stop
        return True

    def _add_logprobs(self, completion: _Completion, entry: TokenLogprobs) -> None:
        if completion.logprobs is None:
            return
        completion.logprobs.append(self._logprob_dict(entry))
        completion.cumulative_logprob += entry.logprob

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        """The actual token first, then the top alternatives (vLLM's shape); special tokens
        are shown by name, as they are what the model predicted."""
        decode = self.tokenizer.decode
        step = {entry.token_id: Logprob(entry.logprob, entry.rank,
                                        decode([entry.token_id], False))}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            if token_id not in step:
                step[token_id] = Logprob(logprob, rank, decode([token_id], False))
        return step

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for c in parent.completions:
            self._by_engine_id.pop(c.request.request_id, None)

    def _snapshot(self, parent: _Parent, now: float) -> RequestOutput:
        finished = all(c.finish_reason is not None for c in parent.completions)
        if finished:
            parent.metrics.finished_time = now
            self._forget(parent)
        outputs = [
            CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                             list(c.logprobs) if c.logprobs is not None else None,
                             c.cumulative_logprob)
            for c in parent.completions
        ]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs,
                             finished, parent.completions[0].request.num_cached_tokens,
                             parent.metrics,
                             list(parent.prompt_logprobs) if parent.prompt_logprobs else None,
                             parent.error)
