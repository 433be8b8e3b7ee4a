"""EngineCore: add_request / abort / step, where step is schedule -> execute -> update.

The executor is anything with ``execute(plan) -> StepResult``: the real ModelRunner, a fake in
tests, a cost model in the simulator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tierserve.config import EngineConfig, tier_block_counts
from tierserve.errors import InvalidRequestError
from tierserve.kv.manager import KVCacheManager
from tierserve.metrics import MetricsCollector
from tierserve.request import Request, RequestStatus, SamplingParams
from tierserve.sched.plan import CopyError, RequestError, RequestUpdate, StepPlan, StepResult
from tierserve.sched.scheduler import Scheduler

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs plans. ``execute`` submits the plan's copies before anything that can raise; each
    submitted copy is reported, done or failed, in some later ``StepResult.swaps_done``."""

    def execute(self, plan: StepPlan) -> StepResult: ...


@dataclass(slots=True)
class EngineLimits:
    """What a request may ask for: the context window, the vocabulary, the KV pool."""

    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    bytes_per_block: int = 0  # one KV block, all layers; 0 when unknown (fake executors)


class EngineCore:
    """The step transaction over one scheduler, one KV manager and one executor."""

    def __init__(self, config: EngineConfig, executor: Executor, limits: EngineLimits,
                 eos_token_ids: frozenset[int] = frozenset(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # step and token times; the simulator passes its virtual clock
        self.executor = executor
        self.limits = limits
        self.eos_token_ids = eos_token_ids
        cache = config.cache
        num_blocks = limits.kv_capacity_tokens // cache.block_size
        num_host, num_disk = tier_block_counts(cache, limits.bytes_per_block)
        self.kv = KVCacheManager(
            num_blocks, cache.block_size, cache.enable_prefix_caching,
            num_host_blocks=num_host, num_disk_blocks=num_disk,
            block_group_size=cache.block_group_size,
            save_evicted_to_host=cache.save_evicted_to_host)
        self.scheduler = Scheduler(config.scheduler, self.kv, limits.max_model_len,
                                   bytes_per_block=limits.bytes_per_block)
        self.metrics = MetricsCollector(clock=clock)
        self._clients: dict[str, str] = {}  # live request -> its client, for service accounting
        self.num_steps = 0
        self.num_step_failures = 0  # whole steps that failed (their requests failed with them)
        self.consecutive_step_failures = 0  # reset by the next step that runs
        self.last_step_error: str | None = None
        # Set when the KV accounting is found broken after a failure: nothing can be trusted
        # any more, the process should be restarted (/health says so).
        self.fatal_error: str | None = None
        # tierserve.structured.constraints.Constraints, set by the loader (None: structured
        # outputs are refused).
        self.constraints = None

    # -- requests ------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     **fields) -> Request:
        """Validate a prompt and its parameters against the limits and build a Request."""
        limits = self.limits
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{limits.vocab_size - 1})", "prompt")
        context = min(limits.max_model_len, limits.kv_capacity_tokens)
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < limits.vocab_size]
        if bad_stops:
            raise InvalidRequestError(
                f"stop token id {bad_stops[0]} is outside the vocabulary "
                f"(0..{limits.vocab_size - 1})", "stop_token_ids")
        if num_prompt > context or (num_prompt == context and params.max_tokens != 0):
            raise InvalidRequestError(
                f"prompt has {num_prompt:,} tokens; {_context_words(limits)} leaves no room for "
                f"output. Shorten the prompt{_context_fix(limits)}", "prompt", "context_length_exceeded")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = context - num_prompt
        elif num_prompt + max_tokens > context:
            raise InvalidRequestError(
                f"prompt has {num_prompt:,} tokens and max_tokens is {max_tokens:,}: together "
                f"{num_prompt + max_tokens:,}, more than {_context_words(limits)}. Lower "
                f"max_tokens to at most {context - num_prompt:,}{_context_fix(limits)}",
                "max_tokens", "context_length_exceeded")
        if params.structured_outputs is not None:
            if self.constraints is None:
                raise InvalidRequestError("this engine has no grammar engine for structured "
                                          "outputs", params.structured_outputs.param)
            self.constraints.check(params.structured_outputs)  # cached per spec after the first
        return Request(request_id, list(prompt_token_ids), params,
                       eos_token_ids=self.eos_token_ids, max_tokens=max_tokens,
                       evicts_kv=self.config.selection.kv_eviction != "none", **fields)

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                      client_id: str | None = None, priority: int = 0,
                      leader: str | None = None, shared_prefix_len: int | None = None
                      ) -> list[Request]:
        """The engine requests of one user request, one per completion (``n``).

        Completion i > 0 waits until completion 0 has computed the prompt, then shares its
        blocks; with a seed, completion i samples with ``seed + i``. ``leader`` names another
        request that computes a shared prefix of ``shared_prefix_len`` tokens first (a batch
        group); then every completion waits for it instead.
        """
        requests = []
        for index in range(params.n):
            child = params.for_completion(index)
            engine_id = request_id if params.n == 1 else f"{request_id}#{index}"
            if leader is not None:
                wait_for, shared = leader, shared_prefix_len
            else:
                wait_for, shared = (f"{request_id}#0" if index else None), None
            requests.append(self.make_request(engine_id, prompt_ids, child, client_id=client_id,
                                              priority=priority, prefill_leader=wait_for,
                                              shared_prefix_len=shared))
        return requests

    def add_request(self, request: Request) -> None:
        annotate = getattr(self.executor, "annotate", None)  # the model side's first look
        if annotate is not None:
            try:
                annotate(request)
            except Exception:  # noqa: BLE001 - a prediction is a hint; the request runs without
                log.exception("annotating request %s failed; it runs unpredicted",
                              request.request_id)
        self.scheduler.add_request(request)
        client = request.client_id or f"anon:{request.request_id}"
        self._clients[request.request_id] = client
        self.metrics.on_arrival(request.request_id, client, request.num_prompt_tokens,
                                now=request.arrival_time)

    def abort(self, request_ids: list[str],
              status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End these requests now and free their KV blocks; unknown ids are ignored."""
        for request_id in request_ids:
            if self.scheduler.abort(request_id, status) is not None:
                self.metrics.on_finished(request_id, status.finish_reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """One engine iteration: schedule, execute, update.

        Never raises for a request's sake. A failure the executor can pin on requests fails
        those alone (the others get the tokens they would have had); a failure of the whole
        step fails the step's requests, the KV accounting is checked, and the loop goes on.
        """
        try:
            plan = self.scheduler.schedule()
        except Exception as exc:  # noqa: BLE001 - the scheduler's state is unknown: fail all
            return self._step_failed(list(self.scheduler.requests), "scheduling", exc)
        if plan.is_empty and not plan.finished_request_ids and not self.kv.has_inflight:
            if self.scheduler.has_unfinished():
                return self._fail_stuck()
            return []
        started = self.clock()
        try:
            result = self._execute(plan)
        except Exception as exc:  # noqa: BLE001 - the forward itself: the step's requests fail
            # (Its copies report themselves later.) The executor may not have dropped the state
            # of requests that ended before this plan: tell it again with the next one.
            self.scheduler.requeue_finished(plan.finished_request_ids)
            return self._step_failed([c.request_id for c in plan.chunks], "execute", exc)
        self.num_steps += 1
        try:
            updates = self.scheduler.settle_copies(result.swaps_done)
            updates += self.scheduler.update(plan, result)
        except Exception as exc:  # noqa: BLE001
            return self._step_failed([c.request_id for c in plan.chunks], "update", exc)
        self.consecutive_step_failures = 0  # a step that ran through
        try:
            self._record(plan, result, updates, self.clock() - started)
        except Exception:  # noqa: BLE001 - a metrics bug must not cost anyone their tokens
            log.exception("recording step metrics failed")
        return updates

    def _execute(self, plan: StepPlan) -> StepResult:
        """``executor.execute``; when it pins the failure on requests (RequestError) or on
        copies (CopyError), those requests fail and the step runs again without them. Its copies
        started the first time (and had all finished for a CopyError), so the rerun has none."""
        failures: dict[str, str] = {}
        current = plan
        while True:
            try:
                result = self.executor.execute(current)
            except RequestError as exc:
                scheduled = {chunk.request_id for chunk in current.chunks}
                named = {rid: msg for rid, msg in exc.failures.items() if rid in scheduled}
                if not named:
                    raise
            except CopyError as exc:  # possibly nobody to fail: a victim save, say
                reason = "moving its KV between memory tiers failed: " + "; ".join(
                    exc.failures.values())
                named = {rid: reason for rid in sorted(self.kv.fail_copies(list(exc.failures)))}
            else:
                result.failed.update(failures)
                return result
            failures.update(named)
            log.warning("step %d: running it again without %s", self.num_steps + 1,
                        ", ".join(named) or "the failed copies")
            current = StepPlan(chunks=[c for c in current.chunks if c.request_id not in named],
                               finished_request_ids=plan.finished_request_ids)

    def _step_failed(self, request_ids: list[str], stage: str, exc: Exception
                     ) -> list[RequestUpdate]:
        """Fail ``request_ids`` for a step that failed as a whole, then check the KV books."""
        self.num_step_failures += 1
        self.consecutive_step_failures += 1
        self.last_step_error = f"{stage}: {type(exc).__name__}: {exc}"
        log.error("engine step failed in %s (%d in a row); failing its %d request(s)", stage,
                  self.consecutive_step_failures, len(request_ids), exc_info=exc)
        reason = f"the engine step running it failed ({type(exc).__name__}: {exc})"
        updates = [u for rid in dict.fromkeys(request_ids)
                   if (u := self.scheduler.fail(rid, reason)) is not None]
        self.check_kv_accounting()
        for update in updates:
            self.metrics.on_finished(update.request_id, update.finish_reason)
            self._clients.pop(update.request_id, None)
        return updates

    def _fail_stuck(self) -> list[RequestUpdate]:
        """Nothing can be scheduled though requests wait (none can fit the KV pool): fail them
        rather than spin."""
        reason = ("it cannot be scheduled: its KV does not fit the cache even with nothing "
                  "else running (give the KV cache more memory, --kv-cache-memory)")
        updates = [u for rid in list(self.scheduler.requests)
                   if (u := self.scheduler.fail(rid, reason)) is not None]
        for update in updates:
            self.metrics.on_finished(update.request_id, update.finish_reason)
        return updates

    def check_kv_accounting(self) -> bool:
        """Every KV block reference is owned by a live request or a copy in flight. Blocks held
        for requests that no longer exist are released; a reference count that disagrees with
        its owners cannot be repaired and marks the engine broken (``fatal_error``)."""
        orphans = self.kv.owners() - set(self.scheduler.requests)
        for request_id in orphans:
            log.error("KV blocks held for %s, which no longer exists: released", request_id)
            self.kv.free_request_id(request_id)
        try:
            self.kv.check_invariants()
        except AssertionError as exc:
            self.fatal_error = f"KV accounting is broken: {exc}"
            log.critical("%s; restart the server", self.fatal_error)
            return False
        return True

    def _record(self, plan: StepPlan, result: StepResult, updates: list[RequestUpdate],
                seconds: float) -> None:
        metrics, scheduler = self.metrics, self.scheduler
        now = self.clock()
        for chunk in plan.chunks:
            metrics.on_scheduled(chunk.request_id, now=now)
            metrics.on_service(self._clients.get(chunk.request_id, chunk.request_id),
                               chunk.num_prompt_tokens, int(chunk.sample))
            request = scheduler.requests.get(chunk.request_id)
            if request is not None and request.num_cached_tokens:
                metrics.on_cached(chunk.request_id, request.num_cached_tokens)
        for request_id in plan.preempted_request_ids:
            metrics.on_preempted(request_id)
        for done in result.swaps_done:
            metrics.on_swap(done.key.split("-", 2)[-1], done.bytes, done.seconds)
        for update in updates:
            metrics.on_tokens(update.request_id, len(update.new_token_ids), now=now)
            if update.finished:
                metrics.on_finished(update.request_id, update.finish_reason, now=now)
        for request_id in plan.finished_request_ids:
            self._clients.pop(request_id, None)
        cache = self.kv.prefix_cache
        metrics.set_prefix_cache(cache.queries, cache.hits)
        metrics.on_step(plan.num_batched_tokens, scheduler.num_running, scheduler.num_waiting,
                        scheduler.num_swapped, seconds, now=now)


def _context_words(limits: EngineLimits) -> str:
    if limits.kv_capacity_tokens < limits.max_model_len:
        return f"the KV cache holds {limits.kv_capacity_tokens:,} tokens"
    return f"this model's context is {limits.max_model_len:,} tokens"


def _context_fix(limits: EngineLimits) -> str:
    if limits.kv_capacity_tokens < limits.max_model_len:
        return ", or give the KV cache more memory (--kv-cache-memory)"
    return " (the context is set by --max-model-len, at most the model's own)"
