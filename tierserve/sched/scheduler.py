"""Scheduler: the token-budget loop. Admission, chunking, preemption and swap mechanics.

Each step grants requests ``num_new_tokens`` within one token budget; there are no prefill and
decode phases. The policy orders requests and names victims; this class moves them:

    WAITING --admit--> RUNNING --finish--> FINISHED
       ^                 |  \\
       | recompute       |   \\ swap out (blocks to host/disk, async)
       +--- PREEMPTED <--+    --> SWAPPED --swap in (blocks back)--> RUNNING
"""

from __future__ import annotations

import logging

from tierserve.config import SchedulerConfig
from tierserve.kv.manager import KVCacheManager
from tierserve.request import BACKGROUND_PRIORITY, Request, RequestStatus
from tierserve.sched.plan import RequestUpdate, ScheduledChunk, StepPlan, StepResult, SwapDone
from tierserve.sched.policies import Policy, make_policy
from tierserve.sched.preemption import PreemptionMixin

log = logging.getLogger(__name__)


class Scheduler(PreemptionMixin):
    """Owns the waiting, swapped and running sets and the per-step token budget."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 policy: Policy | None = None, bytes_per_block: int = 0) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(
            config.policy, update_interval=config.priority_update_interval,
            preempt_margin=float(config.max_num_batched_tokens))
        self.bytes_per_block = bytes_per_block  # for the swap-or-recompute cost estimate
        # This step's token budget left for background prompt chunks (None: no limit), and
        # whether an online request waits (see _share_background).
        self._background_budget: int | None = None
        self._online_waiting = False
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # new and recompute-preempted
        self.swapped: list[Request] = []
        self.running: list[Request] = []
        self._finished_since_plan: list[str] = []
        self._demand: dict[str, list] = {}  # waiting request -> its block hashes (static score)
        self._prefetched: dict[str, str] = {}  # swapped request whose blocks are coming in -> key
        self.admission_reserve = max(1, kv.num_blocks // 100) if kv.num_blocks > 8 else 0
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_swap_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prefill work actually done (cache hits excluded)

    # -- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._track_demand(request)

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
              ) -> Request | None:
        """End a request now, freeing its blocks in every tier; unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def fail(self, request_id: str, reason: str) -> RequestUpdate | None:
        """End a request with an error (something went wrong on its behalf), freeing its
        blocks in every tier; the update carries the reason for its client."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        log.warning("request %s failed: %s", request_id, reason)
        self._finish(request, RequestStatus.FINISHED_ERROR)
        return RequestUpdate(request_id, [], finished=True, finish_reason="error", error=reason)

    def requeue_finished(self, request_ids: list[str]) -> None:
        """Report these ended requests again in the next plan (their step failed)."""
        self._finished_since_plan[:0] = request_ids

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    # -- the step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's chunks and copies within the token budget."""
        self.num_steps += 1
        self.policy.on_step(self.num_steps, list(self.requests.values()))
        plan = StepPlan(finished_request_ids=self._finished_since_plan)
        self._finished_since_plan = []
        try:
            budget = self.config.max_num_batched_tokens
            if self.policy.prefill_first and self._schedule_whole_prefills(plan, budget):
                return self._close(plan)
            self._make_room_for_waiting(plan)
            preempted_before = len(plan.preempted_request_ids)
            budget = self._schedule_running(plan, budget)
            if len(plan.preempted_request_ids) == preempted_before:  # memory did not run out
                self._schedule_queued(plan, budget)
                self._prefetch_next(plan)
            return self._close(plan)
        except BaseException:  # the next plan still tells the executor who ended
            self.requeue_finished(plan.finished_request_ids)
            raise

    def _close(self, plan: StepPlan) -> StepPlan:
        plan.swap_orders = self.kv.take_pending_orders()  # every copy, in the order decided
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        queue = self.policy.select_running(self.policy.order_running(self.running))
        self._share_background()
        index = 0
        while index < len(queue) and budget > 0:
            request = queue[index]
            due = self._tokens_due(request)
            num_new = self._background_tokens(request, min(due, budget), due > 1, pause=True)
            if num_new == 0:  # a background prompt that waits this step
                index += 1
                continue
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

    def _share_background(self) -> None:
        """This step's rule for background (Batch API) prompt chunks: they pause while an
        online request waits (its start needs the budget; their decodes go on), and while
        online requests run they share config.background_token_share of the budget."""
        self._online_waiting = any(r.priority < BACKGROUND_PRIORITY for r in self.waiting)
        self._background_budget = None
        if self.config.background_token_share < 1 and (self._online_waiting or any(
                r.priority < BACKGROUND_PRIORITY for r in self.running)):
            self._background_budget = int(self.config.max_num_batched_tokens
                                          * self.config.background_token_share)

    def _background_tokens(self, request: Request, num_new: int, prompt: bool,
                           pause: bool) -> int:
        """How many of ``num_new`` tokens the request's chunk may take now: all of them unless
        it is a background prompt chunk (then 0 while an online request waits, with ``pause``,
        and at most what is left of the background share, which it spends)."""
        if not prompt or request.priority < BACKGROUND_PRIORITY:
            return num_new
        if pause and self._online_waiting:
            return 0
        if self._background_budget is None:
            return num_new
        num_new = min(num_new, self._background_budget)
        self._background_budget -= num_new
        return num_new

    def _schedule_queued(self, plan: StepPlan, budget: int, whole: bool = False) -> int:
        """Admit swapped and waiting requests in one policy order while budget and memory last."""
        queue = self.policy.order_waiting(self.swapped + self.waiting)
        # Prefetched requests go first: they already hold device blocks (and would otherwise
        # keep the head of the queue from fitting).
        queue.sort(key=lambda r: r.request_id not in self._prefetched)
        for request in queue:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.status is RequestStatus.SWAPPED:
                num_new = self._resume(request, plan, budget)
            elif self._waits_for_leader(request):
                continue
            else:
                num_new = self._admit(request, plan, budget, whole)
            if num_new is None:
                break  # nobody jumps the head of the queue in policy order
            budget -= num_new
        return budget

    def _resume(self, request: Request, plan: StepPlan, budget: int) -> int | None:
        """Swap a request's blocks back in (unless prefetched) and give it its next chunk."""
        if request.request_id in plan.preempted_request_ids:
            return None  # swapped out this very step: its copy has not even run
        num_new = min(self._tokens_due(request), budget)
        if request.request_id in self._prefetched:
            if not self.kv.can_allocate(request, num_new):
                return None
            # Usually long done: the copy overlapped an earlier step.
            plan.wait_keys.append(self._prefetched.pop(request.request_id))
        else:
            growth = self.kv.blocks_for(request.num_kv_tokens + num_new)
            if growth + self.admission_reserve > self.kv.num_free_blocks:
                return None
            if self.kv.swap_in(request) is None:
                return None
        self.swapped.remove(request)
        self._start_running(request)
        self.kv.allocate(request, num_new)
        plan.chunks.append(self._chunk(request, num_new))
        return num_new

    def _admit(self, request: Request, plan: StepPlan, budget: int, whole: bool) -> int | None:
        # Cached blocks have no logits: a request still owed prompt logprobs computes them all
        # (vLLM does the same). Its blocks are cached afterwards as usual.
        # A request that evicts KV after its prefill rewrites its blocks: it neither shares
        # cached blocks nor publishes its own (their content depends on its query window).
        use_cache = not request.needs_prompt_logprobs and not request.evicts_kv
        cached, _ = self.kv.lookup_prefix(request, use_cache)  # copy-ups from host/disk queued
        remaining = self._tokens_due(request, cached)
        num_new = remaining if whole else self._background_tokens(
            request, min(remaining, budget), remaining > 1, pause=False)
        request.num_computed_tokens = cached
        reserve = self.admission_reserve if self.running else 0
        if (num_new == 0 or (whole and plan.chunks and num_new > budget)
                or not self.kv.can_allocate(request, num_new, reserve=reserve)):
            self.kv.free(request)  # a queued copy-up still runs; its blocks stay held until then
            request.num_computed_tokens = 0
            return None
        self.kv.allocate(request, num_new)
        if request.num_preemptions == 0:
            request.num_cached_tokens = cached
        self.waiting.remove(request)
        self._start_running(request)
        plan.chunks.append(self._chunk(request, num_new))
        return num_new

    def _schedule_whole_prefills(self, plan: StepPlan, budget: int) -> bool:
        """fcfs-prefill-first: if any new prompt fits, this step is prompts only, each whole."""
        if not self.waiting:
            return False
        self._schedule_queued(plan, max(budget, 1), whole=True)
        return bool(plan.chunks)

    def _waits_for_leader(self, request: Request) -> bool:
        leader = self.requests.get(request.prefill_leader) if request.prefill_leader else None
        if leader is None:
            return False
        shared = request.shared_prefix_len or leader.num_prompt_tokens
        return leader.num_computed_tokens < min(shared, leader.num_prompt_tokens)

    def _start_running(self, request: Request) -> None:
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        self._untrack_demand(request)

    @staticmethod
    def _tokens_due(request: Request, computed: int | None = None) -> int:
        """Tokens the request has left to compute; a request that evicts KV after its prompt
        stops its chunk at the prompt's end (the eviction runs there, also when a recompute
        after preemption runs its output tokens again)."""
        computed = request.num_computed_tokens if computed is None else computed
        if request.evicts_kv and not request.kv_evicted and computed < request.num_prompt_tokens:
            return request.num_prompt_tokens - computed
        return request.num_tokens - computed

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            start_pos=start,
            block_table=self.kv.block_table(request.request_id),
            sample=start + num_new == request.num_tokens and request.max_tokens > 0,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
            kv_offset=request.num_evicted_tokens,
            evict_at=(request.num_prompt_tokens if request.evicts_kv and not request.kv_evicted
                      and request.max_tokens > 0 else None),
        )

    # -- after the step ------------------------------------------------------------------------
    def settle_copies(self, swaps_done: list[SwapDone]) -> list[RequestUpdate]:
        """Release what finished copies held; fail the requests a failed copy left with
        garbage KV (its own request, and any holding a block it or a later copy wrote)."""
        updates = []
        for done in swaps_done:
            if done.error is None:
                self.kv.copy_done(done.key)
                continue
            for request_id in sorted(self.kv.fail_copies([done.key])):
                update = self.fail(request_id, "moving its KV between memory tiers failed: "
                                               f"{done.error}")
                if update is not None:
                    updates.append(update)
        return updates

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestUpdate]:
        """Advance counters, append sampled tokens, finish requests that stop. (Copies are
        settled apart, by ``settle_copies``, first: they must be even if this raises.)

        Requests the executor failed (``result.failed``) end with an error first; the step's
        other requests go on as if they had run alone."""
        updates = []
        for request_id, reason in result.failed.items():
            if (update := self.fail(request_id, reason)) is not None:
                updates.append(update)
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.finished:
                continue  # aborted while the step ran, or failed just above
            request.num_computed_tokens += chunk.num_tokens
            self.num_prompt_tokens_computed += chunk.num_prompt_tokens
            if chunk.evicts:
                request.kv_evicted = True
                request.num_evicted_tokens += result.evicted.get(request.request_id, 0)
                self.kv.trim(request)
            self.kv.commit(request)
            self.policy.on_service(request, chunk.num_prompt_tokens, int(chunk.sample))
            scored = self._new_prompt_logprobs(request, result)
            if chunk.sample and request.request_id not in result.sampled_token_ids:
                update = self.fail(request.request_id, "the executor returned no token for it")
            elif chunk.sample:
                update = self._append_token(request, result)
            elif request.max_tokens == 0 and request.num_computed_tokens >= request.num_tokens:
                update = RequestUpdate(request.request_id, [], finished=True,
                                       finish_reason=RequestStatus.FINISHED_LENGTH.finish_reason)
                self._finish(request, RequestStatus.FINISHED_LENGTH)  # scored, nothing to make
            elif scored:
                update = RequestUpdate(request.request_id, [])
            else:
                continue
            update.new_prompt_logprobs = scored
            updates.append(update)
        return updates

    @staticmethod
    def _new_prompt_logprobs(request: Request, result: StepResult) -> list:
        """This step's prompt logprobs of the request that it has not had yet (a recompute
        after preemption scores positions again; they are sent once)."""
        scored = result.prompt_logprobs.get(request.request_id)
        if scored is None:
            return []
        skip = max(0, request.prompt_logprobs_next - scored.first_position)
        entries = scored.entries[skip:]
        request.prompt_logprobs_next = max(request.prompt_logprobs_next,
                                           scored.first_position + len(scored.entries))
        return entries

    def _append_token(self, request: Request, result: StepResult) -> RequestUpdate:
        token = result.sampled_token_ids[request.request_id]
        request.output_token_ids.append(token)
        update = RequestUpdate(request.request_id, [token])
        if request.request_id in result.logprobs:
            update.new_logprobs.append(result.logprobs[request.request_id])
        status = self._stop_status(request, token)
        if status is not None:
            self._finish(request, status)
            update.finished = True
            update.finish_reason = status.finish_reason
            update.stop_reason = request.stop_reason
        return update

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
        self._prefetched.pop(request.request_id, None)
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
                break
        self._untrack_demand(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_since_plan.append(request.request_id)
