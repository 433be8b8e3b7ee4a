"""BatchRunner: drive a planned batch through the engine.

Requests go in plan order (a walk of the batch's prefix tree); each waits for its leader, the
first request of the deepest subtree it shares, to compute the shared tokens, then finds those
blocks in the prefix cache. A node's KV thus lives while its subtree runs. Admission is memory-centric: requests enter the
engine while the KV they may need (prompt + max_tokens, minus a shared prefix) fits the pool, not
up to a request count, so decode-heavy phases still fill the machine and nothing is preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tierserve.batch.planner import (
    BatchItem,
    OutputLengthHistory,
    PlannedRequest,
    plan_batch,
    prefill_optimum,
)
from tierserve.engine.core import EngineCore
from tierserve.engine.output import OutputProcessor
from tierserve.outputs import RequestOutput
from tierserve.request import Request, SamplingParams


@dataclass(slots=True)
class BatchStats:
    """What a batch run cost."""

    num_requests: int = 0
    num_groups: int = 0
    num_shared_nodes: int = 0  # prefix tree nodes with two or more requests below
    shared_prefix_tokens_saved: int = 0  # planned: prompt tokens each request reuses, summed
    prefill_tokens: int = 0  # prompt tokens actually computed
    prefill_optimum: int = 0  # the fewest a block-granular prefix cache can compute
    output_tokens: int = 0
    peak_kv_blocks: int = 0
    wall_s: float = 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


@dataclass(slots=True)
class _Pending:
    index: int
    text: str | None
    requests: list[Request]
    prompt_tokens: int  # prompt tokens it computes (its own, not the shared prefix)
    declared: list[int]  # each completion's declared output budget
    group: int  # template (deepest shared prefix node); -1: none
    need_tokens: int = 0  # KV tokens reserved at admission


def expected_output(limits, ids: list[int], params: SamplingParams, cap: int,
                    declared: int | None = None) -> int:
    """The output budget a plan sees for a prompt: its declared length (``max_tokens``; a
    request that leaves it open, up to the context end, is planned at ``cap``)."""
    room = min(limits.max_model_len, limits.kv_capacity_tokens) - len(ids)
    asked = declared or params.max_tokens or room
    return max(1, min(asked, room, cap))


def reserved_tokens(prompt_tokens: int, declared: list[int], group: int,
                    history: OutputLengthHistory | None) -> int:
    """What memory-centric admission reserves for a request: the prompt tokens it computes
    (not a shared prefix) plus each completion's output estimate (its template's history, or
    the declared length without one)."""
    if history is None:
        return prompt_tokens + sum(declared)
    return prompt_tokens + sum(history.estimate(group, d) for d in declared)


class BatchRunner:
    """Runs many requests with the BatchLLM plan over one EngineCore."""

    def __init__(self, core: EngineCore, processor: OutputProcessor,
                 memory_fraction: float = 0.95, output_estimate_cap: int = 512,
                 output_estimate: str = "history") -> None:
        if output_estimate not in ("history", "max_tokens"):
            raise ValueError(f"output_estimate must be history or max_tokens, got "
                             f"{output_estimate!r}")
        self.core = core
        self.processor = processor
        self.capacity_tokens = int(core.kv.num_blocks * core.kv.block_size * memory_fraction)
        # A request's declared output is its max_tokens; one that leaves it open (up to the
        # context end) is planned as if it wanted at most this many tokens.
        self.output_estimate_cap = output_estimate_cap
        # What admission reserves for outputs: the declared length, or, once requests of the
        # same template have finished, what they produced (OutputLengthHistory).
        self.output_estimate = output_estimate

    def run(self, prompts: list[tuple[str | None, list[int]]], params: list[SamplingParams],
            on_output: Callable[[int, RequestOutput], None] | None = None,
            on_step: Callable[[BatchStats, int], None] | None = None,
            id_prefix: str = "batch", declared_max_tokens: list[int] | None = None) -> BatchStats:
        """Run every prompt; ``on_output(index, output)`` gets each result as it finishes.

        ``declared_max_tokens`` overrides the output budget the plan sees per prompt (default:
        each one's max_tokens); benchmarks use it to stand a loose declared budget beside the
        lengths the requests really produce. Prompts must be valid (``EngineCore.make_request``
        raises otherwise, before anything runs)."""
        self._id_prefix = id_prefix
        self._declared = declared_max_tokens
        self._history = OutputLengthHistory()
        config = self.core.scheduler.config
        seq_cap, config.max_num_seqs = config.max_num_seqs, 1 << 30  # memory decides, not a count
        try:
            return self._run(prompts, params, on_output, on_step)
        finally:
            config.max_num_seqs = seq_cap

    def _run(self, prompts, params, on_output, on_step) -> BatchStats:
        started = time.perf_counter()
        stats = BatchStats(num_requests=len(prompts))
        computed_before = self.core.scheduler.num_prompt_tokens_computed
        queue = deque(self._plan(prompts, params, stats))
        in_flight: dict[str, _Pending] = {}
        used = 0
        while queue or in_flight:
            while queue and (not in_flight
                             or used + self._need(queue[0]) <= self.capacity_tokens):
                pending = queue.popleft()
                pending.need_tokens = self._need(pending)
                for request in pending.requests:
                    self.core.add_request(request)
                in_flight[pending.requests[0].request_id.split("#")[0]] = pending
                used += pending.need_tokens
            outputs, _ = self.processor.step(self.core)
            stats.peak_kv_blocks = max(stats.peak_kv_blocks, self.core.kv.pool.num_used)
            for output in outputs:
                if not output.finished:
                    continue
                pending = in_flight.pop(output.request_id)
                used -= pending.need_tokens
                stats.output_tokens += sum(len(c.token_ids) for c in output.outputs)
                for completion in output.outputs:
                    self._history.observe(pending.group, len(completion.token_ids))
                if on_output is not None:
                    on_output(pending.index, output)
            if on_step is not None:
                on_step(stats, len(in_flight))
        stats.prefill_tokens = self.core.scheduler.num_prompt_tokens_computed - computed_before
        stats.wall_s = time.perf_counter() - started
        return stats

    def _plan(self, prompts, params, stats: BatchStats) -> list[_Pending]:
        declared = self._declared or [None] * len(prompts)
        items = [BatchItem(i, ids, self._expected_output(ids, params[i], declared[i]))
                 for i, (_, ids) in enumerate(prompts)]
        block_size = self.core.kv.block_size
        plan = plan_batch(items, block_size)
        stats.num_groups = plan.num_groups
        stats.num_shared_nodes = plan.num_nodes
        stats.shared_prefix_tokens_saved = plan.saved_tokens
        stats.prefill_optimum = prefill_optimum([ids for _, ids in prompts], block_size)
        first_request: dict[int, str] = {}
        return [self._pending(planned, prompts, params, first_request)
                for planned in plan.requests]

    def _expected_output(self, ids: list[int], params: SamplingParams,
                         declared: int | None = None) -> int:
        return expected_output(self.core.limits, ids, params, self.output_estimate_cap,
                               declared)

    def _need(self, pending: _Pending) -> int:
        """KV tokens to reserve for a request about to be admitted."""
        history = None if self.output_estimate == "max_tokens" else self._history
        return reserved_tokens(pending.prompt_tokens, pending.declared, pending.group, history)

    def _pending(self, planned: PlannedRequest, prompts, params,
                 first_request: dict[int, str]) -> _Pending:
        index = planned.item.index
        text, ids = prompts[index]
        shared = planned.shared_len if planned.leader is not None else 0
        requests = self.core.make_requests(
            f"{self._id_prefix}-{index}", ids, params[index],
            leader=first_request[planned.leader] if shared else None,
            shared_prefix_len=shared or None)
        first_request[index] = requests[0].request_id
        self.processor.add(f"{self._id_prefix}-{index}", text, requests)
        declared = self._declared[index] if self._declared else None
        return _Pending(index, text, requests, prompt_tokens=(len(ids) - shared) * len(requests),
                        declared=[self._expected_output(ids, r.sampling_params, declared)
                                  for r in requests], group=planned.group)
