"""Preemption and prefetch, the memory half of the Scheduler (kept apart to keep each file one
idea): who is preempted for whom, swap or recompute, the waiting-demand score of the lower KV
tiers, and LSM-GNN's prefetch of the next swapped request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tierserve.request import BACKGROUND_PRIORITY, Request, RequestStatus
from tierserve.sched.plan import StepPlan

if TYPE_CHECKING:
    from tierserve.sched.scheduler import Scheduler

log = logging.getLogger("tierserve.sched.scheduler")


class PreemptionMixin:
    """Methods of Scheduler that move requests out of memory and back."""

    def _make_room_for_waiting(self: Scheduler, plan: StepPlan) -> None:
        """Preempt running requests for the waiting one first in policy order when it cannot
        start: under every policy, background requests (the Batch API's) for an online one;
        under a policy that preempts for waiting requests (fair), whom it ranks lower.

        A swapped-out victim's blocks free only once its copy has run (after this step), so
        what the victims will free is counted as they go: the loop stops when they make room,
        instead of swapping out every candidate for one arrival."""
        candidates = self.policy.order_waiting(self.waiting + self.swapped)
        if not candidates:
            return
        head = candidates[0]
        if head.status is not RequestStatus.SWAPPED and self._waits_for_leader(head):
            return  # it could not start anyway
        need = self.kv.blocks_for(min(head.num_tokens, self.config.max_num_batched_tokens))
        freeing = 0  # blocks the victims so far hold (an upper bound: some may be shared)

        def blocked() -> bool:
            return (len(self.running) >= self.config.max_num_seqs
                    or need + self.admission_reserve > self.kv.num_free_blocks + freeing)

        def preempt(victim: Request, swap_preferred: bool = False) -> None:
            nonlocal freeing
            freeing += self.kv.num_blocks_of(victim.request_id)
            self._preempt(victim, plan, swap_preferred=swap_preferred)

        if head.priority < BACKGROUND_PRIORITY:
            background = [r for r in self.running if r.priority >= BACKGROUND_PRIORITY]
            held = sum(self.kv.num_blocks_of(r.request_id) for r in background)
            seats_short = len(self.running) >= self.config.max_num_seqs
            # Preempting is only worth it if enough of them would make room.
            if background and (seats_short or need + self.admission_reserve
                               <= self.kv.num_free_blocks + held):
                while blocked() and background:
                    victim = self.policy.pick_victim(background)
                    background.remove(victim)
                    log.debug("preempting background %s for %s", victim.request_id,
                              head.request_id)
                    preempt(victim)  # swap or recompute, whichever costs less
        if not self.policy.preempts_for_waiting:
            return
        while blocked():
            victim = self.policy.preempt_for(head, self.running)
            # Only a cheap context switch is worth it: preempting to recompute would throw the
            # victim's work away and can livelock two clients whose service stays close.
            if victim is None or not self._should_swap(victim, swap_preferred=True):
                return
            preempt(victim, swap_preferred=True)

    def _prefetch_next(self: Scheduler, plan: StepPlan) -> None:
        """LSM-GNN's preemptive prefetch: start bringing in the next swapped request while
        memory is plentiful, so its copy overlaps this step instead of stalling a later one."""
        for request in self.policy.order_waiting(self.swapped):
            if request.request_id in self._prefetched:
                continue
            if request.request_id in plan.preempted_request_ids:
                return
            needed = self.kv.num_swapped_blocks(request.request_id) + 1
            if self.kv.num_free_blocks - needed < self.kv.num_blocks // 4:
                return
            order = self.kv.swap_in(request, wait=False)
            if order is not None:
                self._prefetched[request.request_id] = order.key
            return  # one per step: the head of the queue

    # -- preemption ----------------------------------------------------------------------------
    def _preempt(self: Scheduler, request: Request, plan: StepPlan, swap_preferred: bool = False) -> None:
        """Swap the request's KV out, or drop it to recompute later, as the mode and costs say."""
        self.running.remove(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted_request_ids.append(request.request_id)
        order = self.kv.swap_out(request) if self._should_swap(request, swap_preferred) else None
        if order is not None:
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
            self.num_swap_preemptions += 1
            log.debug("swapped out %s (%d blocks)", request.request_id, order.num_blocks)
            return
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_evicted_tokens = 0  # recomputed from the start, evicted again after it
        request.kv_evicted = False
        request.status = RequestStatus.PREEMPTED
        self.waiting.append(request)
        self._track_demand(request)
        log.debug("preempted %s for recompute (%d tokens)", request.request_id, request.num_tokens)

    def _should_swap(self: Scheduler, request: Request, swap_preferred: bool) -> bool:
        mode = self.config.preemption_mode
        if mode == "recompute" or not self.kv.can_swap_out(request):
            return False
        if mode == "swap" or swap_preferred:
            return True
        blocks = self.kv.num_blocks_of(request.request_id)
        swap_s = 2 * blocks * self.bytes_per_block / self.config.swap_bytes_per_s
        recompute_s = request.num_computed_tokens / self.config.recompute_tokens_per_s
        return swap_s < recompute_s

    def _track_demand(self: Scheduler, request: Request) -> None:
        if self.kv.lower:
            hashes = self.kv.request_hashes(request)
            self._demand[request.request_id] = hashes
            self.kv.waiting_demand.update(hashes)

    def _untrack_demand(self: Scheduler, request: Request) -> None:
        demand = self.kv.waiting_demand
        for block_hash in self._demand.pop(request.request_id, ()):
            if demand[block_hash] <= 1:
                del demand[block_hash]
            else:
                demand[block_hash] -= 1
