"""SimExperts: MoE expert offloading on a simulated device. The engine's own ``ExpertBooks``,
``ExpertCache`` and expert policies decide what is resident, loaded ahead and evicted; loads
are timed on a simulated host link; the experts each token chooses are replayed from a
recorded router trace (``tierserve moe trace``), so the policies meet real routing.

A step walks the MoE layers in order, as the forward does:

    for each layer:   hold the experts the step's tokens chose (misses start loading)
                      wait for those still loading            -> stall
                      compute the layer (the step's priced time / layers)

Prefetches and lookahead loads run on the same link meanwhile, so a load started for a later
layer overlaps this layer's compute, and a forward waits only for what it needs. The step hook
returns the stall; the executor adds it to the step's compute time.

Gate lookahead (Mixtral-offloading) reads the next layer's true choices from the trace: an
upper bound on a gate run one layer early.

With a ``host_cpu``, a miss that few rows chose runs on the host CPU instead of loading
(Fiddler): whenever its roofline time, plus the rows' two trips over the link, is below one
expert's load. The CPU is one more clock: a layer's host experts start when the layer does, one
after another, while the device computes the rest; the layer ends when both are done. Their
share of the layer's device time is still charged (a slight overestimate for the host runs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tierserve.experts.books import ON_HOST, PREFETCH_WINDOW, ExpertBooks, ExpertLoad
from tierserve.experts.policies import ExpertPolicy
from tierserve.experts.routes import (
    PredictedRoute,
    RequestTrace,
    StepRequest,
    by_votes,
    prompt_key,
    trace_layout,
)
from tierserve.sched.plan import StepPlan
from tierserve.sim.hardware import HostCPU, LinkSpec


@dataclass(slots=True)
class _Done:
    key: str
    error: None = None


class SimLoadQueue:
    """Expert loads on one simulated link, first in first out: a load finishes at
    max(submitted, link free) + overhead + bytes / bandwidth. ``now`` is the forward's own
    time inside a step (it runs ahead of the step's start as layers compute)."""

    def __init__(self, link: LinkSpec, expert_bytes: int) -> None:
        self.link = link
        self.expert_bytes = expert_bytes
        self.now = 0.0
        self.bytes_moved = 0
        self._link_free = 0.0
        self._done_at: dict[str, float] = {}

    def submit(self, key: str, ops: list[ExpertLoad]) -> None:
        start = max(self.now, self._link_free)
        nbytes = len(ops) * self.expert_bytes
        self._link_free = start + self.link.seconds(len(ops), nbytes)
        self._done_at[key] = self._link_free
        self.bytes_moved += nbytes

    def poll(self) -> list[_Done]:
        done = [key for key, at in self._done_at.items() if at <= self.now]
        for key in done:
            del self._done_at[key]
        return [_Done(key) for key in done]

    def restart(self) -> None:
        """Start the link's clock again at 0 (the loads so far were done before serving)."""
        if self._done_at:
            raise RuntimeError("loads are still in flight")
        self.now = self._link_free = 0.0

    def wait(self, keys: list[str]) -> None:
        self.now = max([self.now, *(self._done_at[k] for k in keys if k in self._done_at)])


class SimExperts:
    """Offloaded experts in a simulation: ``install`` it in a SimExecutor. Requests are matched
    to their recorded routes by prompt (submit the trace's prompts); ``predictions`` are routes
    predicted from each prompt (``tierserve moe predict``), what ``expertflow`` reads."""

    def __init__(self, policy: ExpertPolicy, num_slots: int, traces: list[RequestTrace],
                 expert_bytes: int, link: LinkSpec, num_layers: int,
                 predictions: dict[str, PredictedRoute] | None = None,
                 prefetch_window: int | None = PREFETCH_WINDOW, host_cpu: HostCPU | None = None,
                 expert_flops_per_row: float = 0.0) -> None:
        if not traces:
            raise ValueError("expert offloading in the simulator replays a router trace; it is "
                             "empty")
        self.moe_layers, num_experts, top_k = trace_layout(traces)
        if num_layers < len(self.moe_layers):
            raise ValueError(f"the trace routes {len(self.moe_layers)} MoE layers; the simulated "
                             f"model has {num_layers}")
        self.policy = policy
        self.loads = SimLoadQueue(link, expert_bytes)
        self.host_cpu, self.expert_flops_per_row = host_cpu, expert_flops_per_row
        self.host_rows = self._host_rows(link, expert_bytes) if host_cpu is not None else 0
        self._cpu_free = 0.0
        self.books = ExpertBooks(num_slots, policy, self.moe_layers, num_experts, top_k,
                                 self.loads, clock=lambda: self.loads.now,
                                 prefetch_window=prefetch_window, host_rows=self.host_rows)
        self.books.pin(policy.pinned())
        self.loads.restart()  # the static hot set loads before serving
        self.num_layers = num_layers
        self.by_prompt = {prompt_key(t.prompt): t for t in traces}
        self.predictions = predictions or {}
        if policy.needs == "predictor":
            missing = [key for key in self.by_prompt if key not in self.predictions]
            if missing:
                raise ValueError(f"{len(missing)} of the trace's {len(self.by_prompt)} prompts "
                                 "have no predicted route; write predictions for this trace "
                                 "with `tierserve moe predict`")
        self.expert_bytes = expert_bytes
        self.num_experts = num_experts
        self._routes: dict[str, RequestTrace] = {}  # live request -> its recorded routes
        self._requests: dict[str, object] = {}  # live requests whose expert_route is refreshed

    # -- hooks -------------------------------------------------------------------------------
    def annotate(self, request) -> None:
        """A request arrived: find its recorded routes; tell the policy what it may know."""
        key = prompt_key(request.prompt_token_ids)
        trace = self.by_prompt.get(key)
        if trace is None:  # EngineCore logs this; the request fails at its first step
            raise ValueError(f"request {request.request_id}'s prompt is not in the router trace; "
                             "replay the trace's own prompts")
        self._routes[request.request_id] = trace
        needs = self.policy.needs
        route = self.predictions.get(key) if needs == "predictor" else (
            trace if needs == "trace" else None)
        self.books.annotate(request.request_id, route)
        request.expert_route = self.books.hot_sets(request.request_id)
        if request.expert_route is not None:
            self._requests[request.request_id] = request

    def end_requests(self, plan: StepPlan) -> None:
        """The plan-hook: forget the requests the plan ends (every plan, chunks or not)."""
        for request_id in plan.finished_request_ids:
            self._routes.pop(request_id, None)
            self._requests.pop(request_id, None)
        self.books.forget(plan.finished_request_ids)

    def step(self, plan: StepPlan, start: float, compute_s: float) -> float:
        """Walk the step's MoE layers from ``start`` (``compute_s``: the forward's price);
        returns the seconds stalled on loads. Within a layer each expert runs once its own load
        is done, the layer's compute split evenly over its experts (the forward takes them one
        by one, as ``MoEBlock`` does)."""
        loads, stats = self.loads, self.books.stats
        loads.now = max(loads.now, start)
        stalled_before = stats.stall_seconds
        chunks = [StepRequest(c.request_id, c.start_pos, c.num_tokens) for c in plan.chunks]
        self.books.begin_step(chunks, plan.finished_request_ids)
        per_layer = compute_s / self.num_layers
        loads.now += (self.num_layers - len(self.moe_layers)) * per_layer  # dense layers
        for position, layer in enumerate(self.moe_layers):
            rows = [choice for c in chunks for choice in self._choices(c, layer)]
            if self.policy.observes:
                self.books.observe(layer, rows)
            counts = Counter(e for row in rows for e in row)
            experts = sorted(counts)
            held = self.books.hold(layer, experts, [counts[e] for e in experts])
            host_done = loads.now
            for expert in (e for e in experts if held[e] == ON_HOST):
                self._cpu_free = max(loads.now, self._cpu_free) + self.host_seconds(counts[expert])
                host_done = self._cpu_free
            if self.policy.lookahead and position + 1 < len(self.moe_layers):
                later = self.moe_layers[position + 1]
                self.books.prefetch([(later, e) for e in by_votes(
                    row for c in chunks for row in self._choices(c, later))])
            for slot in held.values():
                if slot != ON_HOST:
                    self.books.ready(slot)
                loads.now += per_layer / len(held)
            if not held:
                loads.now += per_layer
            if host_done > loads.now:  # the device waits for the host's experts
                stats.stall_seconds += host_done - loads.now
                loads.now = host_done
            self.books.release(held)
        for chunk in plan.chunks:  # the regrouping hints follow the policy's corrections
            request = self._requests.get(chunk.request_id)
            if request is not None:
                request.expert_route = self.books.hot_sets(chunk.request_id)
        return stats.stall_seconds - stalled_before

    def host_seconds(self, rows: int) -> float:
        """One expert over ``rows`` rows on the host CPU, plus the two link copies' fixed costs
        for the rows (their bytes, a few KiB, are left out)."""
        return (self.host_cpu.seconds(self.loads.expert_bytes, rows * self.expert_flops_per_row)
                + 2 * self.loads.link.overhead_s)

    def _host_rows(self, link: LinkSpec, expert_bytes: int) -> int:
        """The most rows for which the host computes an expert faster than the link loads it."""
        load = link.seconds(1, expert_bytes)
        rows = 0
        while rows < 1 << 16 and self.host_seconds(rows + 1) <= load:
            rows += 1
        return rows

    def _choices(self, chunk: StepRequest, layer: int) -> list[list[int]]:
        trace = self._routes.get(chunk.request_id)
        if trace is None:
            raise ValueError(f"request {chunk.request_id} has no recorded route (its prompt is "
                             "not in the router trace)")
        per_position = trace.routes[layer]
        stop = chunk.start_pos + chunk.num_tokens
        if stop > len(per_position):
            raise ValueError(f"request {chunk.request_id} runs past its recorded route "
                             f"({stop} > {len(per_position)} positions): replay the trace's "
                             "output lengths")
        return per_position[chunk.start_pos:stop]

    # -- report ------------------------------------------------------------------------------
    def report(self, output_tokens: int) -> dict:
        """Hit ratio (per layer too), loads, bytes per token, stall, distinct experts per step,
        resident expert bytes against all-resident."""
        counters, stats = self.books.cache.counters, self.books.stats
        per_layer = {layer: (c.hits / c.requests if c.requests else 0.0)
                     for layer, c in sorted(counters.layers.items())}
        distinct = stats.distinct_per_step + [stats.experts_this_step]
        total = self.num_experts * len(self.moe_layers)
        return {
            "expert_policy": self.policy.name,
            "hit_ratio": counters.hit_ratio,
            "hit_ratio_per_layer": per_layer,
            "late": sum(c.late for c in counters.layers.values()),
            "misses": sum(c.misses for c in counters.layers.values()),
            "loads": counters.loads,
            "prefetches": counters.prefetches,
            "prefetches_used": counters.prefetches_used,
            "gib_loaded": self.loads.bytes_moved / 2**30,
            "mib_per_token": self.loads.bytes_moved / 2**20 / max(1, output_tokens),
            "stall_s": stats.stall_seconds,
            "host_rows_limit": self.host_rows,
            "host_runs": stats.host_runs,
            "host_rows": stats.host_rows,
            "distinct_experts_per_step": sum(distinct) / max(1, len(distinct)),
            # a step wakes each distinct expert once: fewer per token is what regrouping buys
            "expert_runs_per_token": sum(distinct) / max(1, output_tokens),
            "resident_experts": self.books.cache.num_slots,
            "resident_expert_gib": self.books.cache.num_slots * self.expert_bytes / 2**30,
            "all_resident_expert_gib": total * self.expert_bytes / 2**30,
        }


def install(experts: SimExperts, executor) -> None:
    """Hook ``experts`` into a SimExecutor: arrivals, every plan's endings, every step (its
    stall is added to the step)."""
    executor.arrival_hooks.append(experts.annotate)
    executor.plan_hooks.append(experts.end_requests)
    executor.step_hooks.append(
        lambda plan, shape, compute_s: experts.step(plan, executor.clock(), compute_s))
