"""Scheduler: the token-budget loop. Admission, chunking, preemption mechanics; policies order.

Each step grants every scheduled request ``num_new_tokens`` within one token budget. There are no
prefill and decode phases: running requests (decodes and partly computed prompts) are served
first, in policy order, then waiting requests are admitted while budget and memory last. A long
prompt is simply granted what is left of the budget, step after step (chunked prefill).
"""

from __future__ import annotations

import logging

from tierserve.config import SchedulerConfig
from tierserve.kv.manager import KVCacheManager
from tierserve.request import Request, RequestStatus
from tierserve.sched.plan import RequestUpdate, ScheduledChunk, StepPlan, StepResult
from tierserve.sched.policies import Policy, make_policy

log = logging.getLogger(__name__)


class Scheduler:
    """Owns the waiting and running sets and the per-step token budget."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 policy: Policy | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(config.policy)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_since_plan: list[str] = []
        # Keep a few blocks free when admitting, so running decodes are not preempted at once.
        self.admission_reserve = max(1, kv.num_blocks // 100) if kv.num_blocks > 8 else 0
        self.num_preemptions = 0

    # -- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
              ) -> Request | None:
        """End a request now, freeing its blocks; unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's chunks within the token budget."""
        plan = StepPlan(finished_request_ids=self._finished_since_plan)
        self._finished_since_plan = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(plan, budget)
        if not plan.preempted_request_ids:
            self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        queue = self.policy.order_running(self.running)
        index = 0
        while index < len(queue) and budget > 0:
            request = queue[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                later = queue[index + 1 :]
                victim = self.policy.pick_victim(later) if later else request
                queue.remove(victim)
                self._preempt(victim, plan)
                if victim is request:
                    return budget  # not even this one fits: nothing after it will either
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        for request in self.policy.order_waiting(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if self._waits_for_leader(request):
                continue
            cached = self.kv.lookup_prefix(request)
            num_new = min(request.num_tokens - cached, budget)
            request.num_computed_tokens = cached
            reserve = self.admission_reserve if self.running else 0
            if not self.kv.can_allocate(request, num_new, reserve=reserve):
                self.kv.free(request)
                request.num_computed_tokens = 0
                return  # FCFS within the policy's order: nobody jumps the head of the queue
            self.kv.allocate(request, num_new)
            if request.num_preemptions == 0:
                request.num_cached_tokens = cached
            self.waiting.remove(request)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _waits_for_leader(self, request: Request) -> bool:
        leader = self.requests.get(request.prefill_leader) if request.prefill_leader else None
        return leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            start_pos=start,
            block_table=self.kv.block_table(request.request_id),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
        )

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, go back to waiting."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.running.remove(request)
        self.waiting.append(request)
        self.num_preemptions += 1
        plan.preempted_request_ids.append(request.request_id)
        log.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    # -- after the step ------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[RequestUpdate]:
        """Advance counters, append sampled tokens, finish requests that stop."""
        updates = []
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += chunk.num_tokens
            self.kv.commit(request)
            if not chunk.sample:
                continue
            token = result.sampled_token_ids[chunk.request_id]
            request.output_token_ids.append(token)
            update = RequestUpdate(chunk.request_id, [token])
            if chunk.request_id in result.logprobs:
                update.new_logprobs.append(result.logprobs[chunk.request_id])
            status = self._stop_status(request, token)
            if status is not None:
                self._finish(request, status)
                update.finished = True
                update.finish_reason = status.finish_reason
                update.stop_reason = request.stop_reason
            updates.append(update)
        return updates

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens > params.min_tokens:  # the sampler masked stops before
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.finished:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_since_plan.append(request.request_id)
