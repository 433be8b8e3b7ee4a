"""A fake executor and engine builder for scheduler tests: no torch, no model."""

from __future__ import annotations

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig
from tierserve.engine.core import EngineCore, EngineLimits
from tierserve.kv.tiers_types import Tier
from tierserve.sched.plan import CopyError, RequestError, StepPlan, StepResult, SwapDone

VOCAB = 1000


class FakeExecutor:
    """Samples a token that depends only on the request's own tokens, like a real model would.

    It keeps its own copy of each request's KV "content" per block slot, written through the
    block table, so a wrong block table or a stale block shows up as a wrong token.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        # (tier, block) -> the token ids written in that block's slots
        self.blocks: dict[tuple[Tier, int], dict[int, int]] = {}
        self.plans: list[StepPlan] = []
        self.copies = 0
        self.fail_next_copy: str | None = None  # the next copy whose key starts so fails
        self.failed_copies: list = []
        self._done_later: list[SwapDone] = []  # copies run by a step that then raised

    def _slots(self, tier: Tier, block: int) -> dict[int, int]:
        return self.blocks.setdefault((tier, block), {})

    def copy_only(self, plan: StepPlan) -> list[SwapDone]:
        """Run the plan's copies (in order) and report them (in the next result if this step
        raises); the first copy whose key starts with ``fail_next_copy`` fails, and if the step
        needed it (``wait``) the step raises CopyError, as the runner's wait does."""
        done, needed_failed = [], []
        for order in plan.swap_orders:  # copies run in order, before the forward
            if self.fail_next_copy and order.key.startswith(self.fail_next_copy):
                self.fail_next_copy = None
                self.failed_copies.append(order)
                done.append(SwapDone(order.key, order.num_blocks, error="injected copy error"))
                if order.wait:
                    needed_failed.append(order.key)
                continue
            for op in order.ops:
                for run in op.runs:
                    self.copies += 1
                    for i in range(run.length):
                        src = self.blocks.get((op.src_tier, run.src_start + i), {})
                        self.blocks[(op.dst_tier, run.dst_start + i)] = dict(src)
            done.append(SwapDone(order.key, order.num_blocks, order.num_copies))
        self._done_later += done
        if needed_failed:
            raise CopyError({key: "injected copy error" for key in needed_failed})
        return done

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        result = StepResult()
        self.copy_only(plan)
        result.swaps_done, self._done_later = self._done_later, []
        for chunk in plan.chunks:
            table = chunk.block_table
            for offset, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + offset
                self._slots(Tier.DEVICE, table[pos // self.block_size])[pos % self.block_size] = token
            if chunk.sample:
                end = chunk.start_pos + chunk.num_tokens
                context = [self.blocks[(Tier.DEVICE, table[p // self.block_size])].get(
                    p % self.block_size) for p in range(end)]
                truth = (chunk.prompt_token_ids + chunk.output_token_ids)[:end]
                if context != truth:  # the KV read back is not what the request wrote
                    bad = next(p for p in range(end) if context[p] != truth[p])
                    raise AssertionError(
                        f"{chunk.request_id}: position {bad} reads {context[bad]}, wrote "
                        f"{truth[bad]} (block {table[bad // self.block_size]}, step "
                        f"{len(self.plans)}, table {table})")
                result.sampled_token_ids[chunk.request_id] = _next_token(context)
        return result


def _next_token(context: list[int]) -> int:
    value = 7
    for pos, token in enumerate(context):
        value = (value * 31 + token * (pos + 1)) % 1_000_003
    return 3 + value % (VOCAB - 3)


def make_core(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_num_seqs: int = 64,
              prefix_caching: bool = True, max_model_len: int = 4096, host_blocks: int = 0,
              disk_blocks: int = 0, policy: str = "sarathi", preemption: str = "auto",
              group_size: int = 8, save_evicted: bool = True, update_interval: int = 1
              ) -> tuple[EngineCore, FakeExecutor]:
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=prefix_caching, num_host_blocks=host_blocks,
                          num_disk_blocks=disk_blocks, block_group_size=group_size,
                          save_evicted_to_host=save_evicted),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                  policy=policy, preemption_mode=preemption,
                                  priority_update_interval=update_interval),
    )
    executor = FakeExecutor(num_blocks, block_size)
    limits = EngineLimits(max_model_len, VOCAB, num_blocks * block_size)
    return EngineCore(config, executor, limits, eos_token_ids=frozenset({2})), executor


def run_to_completion(core: EngineCore, max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if not core.has_unfinished():
            return
        core.step()
    raise AssertionError("engine did not finish")


class FaultyExecutor:
    """Wraps an executor (the fake above or the real ModelRunner) and injects faults:

    - ``fail``: request ids reported failed in ``StepResult.failed`` (the rest of the step runs);
    - ``raise_for``: request ids whose presence in a plan makes ``execute`` raise RequestError
      naming them, before anything runs (as the runner does for malformed step inputs);
      ``raise_when`` does the same for chunks a predicate picks;
    - ``raise_on_calls``: call numbers (1-based) on which ``execute`` raises RuntimeError, as
      a forward that breaks does, after the plan's copies have run.
    """

    def __init__(self, inner, fail=(), raise_for=(), raise_on_calls=(), raise_when=None) -> None:
        self.inner = inner
        self.raise_when = raise_when
        self.fail, self.raise_for = set(fail), set(raise_for)
        self.raise_on_calls = set(raise_on_calls)
        self.calls = 0
        self.plans = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.calls += 1
        self.plans.append(plan)
        named = {c.request_id for c in plan.chunks
                 if c.request_id in self.raise_for or (self.raise_when and self.raise_when(c))}
        if named:
            self._start_copies(plan)  # the contract: copies start before anything can raise
            raise RequestError({rid: "injected: bad inputs" for rid in sorted(named)})
        if self.calls in self.raise_on_calls:
            self._start_copies(plan)
            raise RuntimeError(f"injected forward failure on call {self.calls}")
        result = self.inner.execute(plan)
        for chunk in plan.chunks:
            if chunk.request_id in self.fail:
                result.sampled_token_ids.pop(chunk.request_id, None)
                result.logprobs.pop(chunk.request_id, None)
                result.failed[chunk.request_id] = "injected: its sampling failed"
        return result

    def _start_copies(self, plan: StepPlan) -> None:
        if hasattr(self.inner, "copy_only"):  # the fake: copies run now, reported next call
            self.inner.copy_only(plan)
        else:  # the real ModelRunner
            self.inner._start_copies(plan)
