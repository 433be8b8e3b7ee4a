"""SimExecutor: runs StepPlans under a cost model on a virtual clock, no model and no torch.

Each step advances the clock by the cost model's price of the plan's batch. KV copies between
tiers run on simulated links, one FIFO queue per direction (a swap-out and a swap-in overlap,
as on full-duplex PCIe with two copy streams): a copy finishes at max(submitted, link free) +
per-copy overhead x runs + bytes / bandwidth, so FastSwitch's block groups (fewer, longer runs)
cost less. The forward waits for the orders it needs (``wait`` orders and ``wait_keys``), as the
real runner's swap worker makes it; the others are reported done in the first step that ends
after they finish, with their simulated seconds.

Sampled tokens are a constant id: a simulated request's output length is its ``max_tokens``
(submit with ``ignore_eos``), which is what trace replay needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tierserve.kv.tiers_types import Tier
from tierserve.sched.plan import ScheduledChunk, StepPlan, StepResult, SwapDone
from tierserve.sim.cost import BatchShape, ChunkShape, CostModel
from tierserve.sim.hardware import LinkSpec

SIM_TOKEN_ID = 3  # what every simulated step samples


class VirtualClock:
    """Seconds since the simulation started; moves only when told."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the clock cannot go back ({seconds} s)")
        self.now += seconds

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)


@dataclass(slots=True)
class _Copy:
    key: str
    num_blocks: int
    num_copies: int
    bytes: int
    submitted: float
    done_at: float


@dataclass(slots=True)
class SimLinks:
    """The copy links between KV tiers; ``disk`` is host <-> disk (device <-> disk goes at the
    slower of the two)."""

    host: LinkSpec
    disk: LinkSpec = field(default_factory=lambda: LinkSpec(bandwidth=7e9, overhead_s=50e-6))

    def link(self, src: Tier, dst: Tier) -> LinkSpec:
        tiers = {src, dst}
        if tiers == {Tier.DEVICE, Tier.HOST}:
            return self.host
        if tiers == {Tier.HOST, Tier.DISK}:
            return self.disk
        return min(self.host, self.disk, key=lambda link: link.bandwidth)


@dataclass(slots=True)
class StepRecord:
    """One simulated step, for reports and calibration."""

    start: float
    seconds: float  # forward (cost model) only
    waited_s: float  # stalled on copies before the forward
    num_tokens: int
    num_chunks: int


class SimExecutor:
    """The Executor protocol over a cost model (see the module docstring).

    Two hooks model capabilities the cost model does not know:

    - ``step_hooks`` add seconds to a step (an expert-load model: experts fetched for the
      step's tokens): each is called with the plan, its batch shape and the cost model's
      price of it, returns extra seconds;
    - ``attended`` maps a chunk to the KV tokens its attention reads (default: all of its
      context); KV selection (MPCache, Quest) reads a budget of them;
    - ``evicted`` maps a chunk that ends a prompt under static KV eviction to the prompt
      tokens evicted (the runner's report; the scheduler frees their blocks);
    - ``arrival_hooks`` see each request as the engine admits it (the runner's ``annotate``:
      an expert model looks up the request's routes there);
    - ``plan_hooks`` see every plan, with or without chunks, before it runs (the requests it
      ends, as the runner's expert provider does).
    """

    def __init__(self, cost: CostModel, clock: VirtualClock, bytes_per_block: int,
                 links: SimLinks | None = None, record_steps: bool = False) -> None:
        self.cost = cost
        self.clock = clock
        self.bytes_per_block = bytes_per_block
        self.links = links
        self.step_hooks: list[Callable[[StepPlan, BatchShape, float], float]] = []
        self.attended: Callable[[ScheduledChunk], int] | None = None
        self.evicted: Callable[[ScheduledChunk], int] | None = None
        self.arrival_hooks: list[Callable[[object], None]] = []
        self.plan_hooks: list[Callable[[StepPlan], None]] = []
        self.record_steps = record_steps
        self.steps: list[StepRecord] = []
        self.busy_s = 0.0  # forward time simulated
        self.num_steps = 0
        self._link_free: dict[tuple[Tier, Tier], float] = {}
        self._outstanding: dict[str, _Copy] = {}

    def annotate(self, request) -> None:
        """EngineCore calls this as a request arrives (as it does the model runner's)."""
        for hook in self.arrival_hooks:
            hook(request)

    @staticmethod
    def batch_shape(plan: StepPlan, attended: Callable[[ScheduledChunk], int] | None = None
                    ) -> BatchShape:
        """The cost model's view of a plan: per chunk, new tokens and the KV it attends."""
        return BatchShape(tuple(
            ChunkShape(chunk.num_tokens,
                       attended(chunk) if attended else chunk.start_pos - chunk.kv_offset,
                       chunk.sample)
            for chunk in plan.chunks))

    def execute(self, plan: StepPlan) -> StepResult:
        started = self.clock.now
        for hook in self.plan_hooks:
            hook(plan)
        for order in plan.swap_orders:
            self._submit(order.key, order.ops, started)
        needed = [*plan.wait_keys, *(order.key for order in plan.swap_orders if order.wait)]
        ready = max((self._outstanding[key].done_at for key in needed
                     if key in self._outstanding), default=started)
        self.clock.advance_to(ready)
        result = StepResult()
        seconds = 0.0
        if plan.chunks:
            shape = self.batch_shape(plan, self.attended)
            seconds = self.cost.step_seconds(shape)
            seconds += sum(hook(plan, shape, seconds) for hook in self.step_hooks)
            self.clock.advance(seconds)
            for chunk in plan.chunks:
                if chunk.sample:
                    result.sampled_token_ids[chunk.request_id] = SIM_TOKEN_ID
                if chunk.evicts and self.evicted is not None:
                    result.evicted[chunk.request_id] = self.evicted(chunk)
            if self.record_steps:
                self.steps.append(StepRecord(started, seconds, ready - started,
                                             plan.num_batched_tokens, len(plan.chunks)))
            self.busy_s += seconds
            self.num_steps += 1
        elif self._outstanding:  # idle: the runner waits for its copies
            self.clock.advance_to(max(copy.done_at for copy in self._outstanding.values()))
        now = self.clock.now
        for key in [k for k, copy in self._outstanding.items() if copy.done_at <= now]:
            copy = self._outstanding.pop(key)
            result.swaps_done.append(SwapDone(key, copy.num_blocks, copy.num_copies, copy.bytes,
                                              copy.done_at - copy.submitted))
        return result

    def _submit(self, key: str, ops, now: float) -> None:
        if self.links is None:
            raise RuntimeError("the plan moves KV between tiers but the simulation has no "
                               "links (give the hardware profile a host link)")
        done_at, blocks, copies, size = now, 0, 0, 0
        for op in ops:  # an order's ops run in sequence
            link = self.links.link(op.src_tier, op.dst_tier)
            direction = (op.src_tier, op.dst_tier)
            nbytes = op.num_blocks * self.bytes_per_block
            start = max(done_at, self._link_free.get(direction, 0.0))
            done_at = start + link.seconds(len(op.runs), nbytes)
            self._link_free[direction] = done_at
            blocks, copies, size = blocks + op.num_blocks, copies + len(op.runs), size + nbytes
        self._outstanding[key] = _Copy(key, blocks, copies, size, now, done_at)
