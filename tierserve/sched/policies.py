"""Scheduling policies: who runs first and who is preempted. They never touch memory.

A policy is a small class registered by name; the Scheduler owns the budget loop and the
mechanics of allocation, swapping and preemption. Lower ``priority`` values go first in every
policy (explicit priority classes sit above the policy's own order).
"""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.request import Request


class Policy:
    """Base policy: first come, first served; the newest running request is the victim."""

    name = "base"
    # True: whenever a new prompt can be admitted, a step runs only whole prefills (no decodes).
    prefill_first = False
    # True: the policy may preempt running requests for a waiting one (see preempt_for).
    preempts_for_waiting = False

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """Running requests, the first served first."""
        return sorted(running, key=self.key)

    def order_waiting(self, waiting: Sequence[Request]) -> list[Request]:
        """Waiting (new, preempted or swapped) requests, the first admitted first."""
        return sorted(waiting, key=self.key)

    def select_running(self, ordered: list[Request]) -> list[Request]:
        """The running requests that get tokens this step, in order (default: all of them)."""
        return ordered

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when memory runs out."""
        return max(candidates, key=self.key)

    def preempt_for(self, request: Request, running: Sequence[Request]) -> Request | None:
        """A running request to preempt so that waiting ``request`` can run now, or None."""
        return None

    def on_step(self, step: int, requests: Sequence[Request]) -> None:
        """Called before each schedule() with every live request."""

    def on_service(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Tokens computed for ``request`` in the last step."""


class FCFSPolicy(Policy):
    """First come, first served within priority classes (vLLM's default order): running
    requests in arrival order, the newest preempted first when memory runs out."""

    name = "fcfs"


class SarathiPolicy(Policy):
    """Sarathi-Serve's stall-free order: every running decode, then partly computed prompts
    (oldest first); new prompts are admitted after, chunked to the remaining budget."""

    name = "sarathi"

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        def decode_first(request: Request) -> tuple:
            prefilling = request.num_tokens - request.num_computed_tokens > 1
            return (request.priority, prefilling, request.arrival_time, request.request_id)

        return sorted(running, key=decode_first)


class PrefillFirstPolicy(Policy):
    """The classic baseline (vLLM's old default): a new prompt's whole prefill runs in a step of
    its own and running decodes wait for it."""

    name = "fcfs-prefill-first"
    prefill_first = True


class FairPolicy(Policy):
    """FastSwitch's fairness-aware scheduling over Virtual Token Counter service accounting.

    Each client accrues ``prompt_weight * prompt tokens + output_weight * output tokens``. Every
    ``update_interval`` steps the order is refreshed from the counters; the least served client
    goes first, and when it waits while the most served client runs, that client's request is
    preempted (the scheduler swaps it out). A client that appears (or returns after idling) is
    lifted to the smallest counter among active clients, so it cannot bank idle time.
    """

    name = "fair"
    preempts_for_waiting = True

    def __init__(self, update_interval: int = 1, prompt_weight: float = 1.0,
                 output_weight: float = 2.0, preempt_margin: float = 16.0) -> None:
        self.update_interval = max(1, update_interval)
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.preempt_margin = preempt_margin  # service gap (tokens) that justifies a preemption
        self.counters: dict[str, float] = {}
        self._snapshot: dict[str, float] = {}
        self._active: set[str] = set()

    @staticmethod
    def client(request: Request) -> str:
        return request.client_id or f"anon:{request.request_id}"

    def key(self, request: Request) -> tuple:
        service = self._snapshot.get(self.client(request), 0.0)
        return (request.priority, service, request.arrival_time, request.request_id)

    def on_step(self, step: int, requests: Sequence[Request]) -> None:
        active = {self.client(r) for r in requests}
        if active:
            floor = min((self.counters[c] for c in active & self._active), default=0.0)
            for client in active - self._active:  # new or returning: lift to the floor
                self.counters[client] = max(self.counters.get(client, 0.0), floor)
        self._active = active
        if step % self.update_interval == 0 or not self._snapshot.keys() >= active:
            self._snapshot = dict(self.counters)

    def on_service(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        client = self.client(request)
        self.counters[client] = self.counters.get(client, 0.0) + (
            self.prompt_weight * prompt_tokens + self.output_weight * output_tokens)

    def preempt_for(self, request: Request, running: Sequence[Request]) -> Request | None:
        mine = self._snapshot.get(self.client(request), 0.0)
        candidates = [r for r in running if r.priority > request.priority or (
            r.priority == request.priority
            and self._snapshot.get(self.client(r), 0.0) > mine + self.preempt_margin)]
        return self.pick_victim(candidates) if candidates else None


class ExpertGroupedPolicy(SarathiPolicy):
    """ExpertFlow's token regrouping for MoE models whose experts are offloaded: each step runs
    a group of the running decodes whose predicted routes (``Request.expert_route``) overlap, so
    the step wakes fewer experts; the others run in a later step.

    The group is ``group_fraction`` of the running decodes (at least ``min_group``), grown
    greedily from the request that has waited longest by the one adding the fewest experts not
    yet in the group. No one starves: a request left out ``max_skip`` steps in a row goes first.
    Prompts (chunks of several tokens) always run, as in sarathi; admission is sarathi's.
    """

    name = "expert-grouped"

    def __init__(self, group_fraction: float = 0.5, min_group: int = 4, max_skip: int = 2) -> None:
        self.group_fraction = group_fraction
        self.min_group = min_group
        self.max_skip = max_skip
        self._skipped: dict[str, int] = {}  # running decode -> steps left out in a row

    def select_running(self, ordered: list[Request]) -> list[Request]:
        decodes = [r for r in ordered if r.num_tokens - r.num_computed_tokens <= 1]
        size = max(self.min_group, int(len(decodes) * self.group_fraction + 0.5))
        if len(decodes) <= size or not any(r.expert_route for r in decodes):
            self._skipped = {}
            return ordered
        waited = sorted(decodes, key=lambda r: -self._skipped.get(r.request_id, 0))
        group = [r for r in waited if self._skipped.get(r.request_id, 0) >= self.max_skip]
        group = group[:size] or waited[:1]
        union = _union(group)
        rest = [r for r in decodes if r not in group]
        while len(group) < size and rest:
            best = min(rest, key=lambda r: _new_experts(r, union))
            rest.remove(best)
            group.append(best)
            union = _union([best], union)
        chosen = {r.request_id for r in group}
        self._skipped = {r.request_id: 0 if r.request_id in chosen
                         else self._skipped.get(r.request_id, 0) + 1 for r in decodes}
        return [r for r in ordered if r.request_id in chosen or r not in decodes]


def _union(requests: Sequence[Request], union: list[set[int]] | None = None) -> list[set[int]]:
    union = [set(s) for s in union] if union else []
    for request in requests:
        for layer, experts in enumerate(request.expert_route or ()):
            if layer == len(union):
                union.append(set())
            union[layer] |= experts
    return union


def _new_experts(request: Request, union: list[set[int]]) -> int:
    route = request.expert_route or ()
    return sum(len(experts - (union[i] if i < len(union) else set()))
               for i, experts in enumerate(route)) if route else 1 << 30


POLICIES: dict[str, type[Policy]] = {
    FCFSPolicy.name: FCFSPolicy,
    SarathiPolicy.name: SarathiPolicy,
    PrefillFirstPolicy.name: PrefillFirstPolicy,
    FairPolicy.name: FairPolicy,
    ExpertGroupedPolicy.name: ExpertGroupedPolicy,
}


def make_policy(name: str, **options) -> Policy:
    """Instantiate a registered policy by name (options go to policies that take them)."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    return cls(**options) if cls is FairPolicy else cls()
