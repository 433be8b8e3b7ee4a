"""`tierserve sim profile`: measure this machine's real engine by operator into a ProfileTable,
and the recording wrappers that calibration shares.

The engine runs as it serves (EngineCore, scheduler, ModelRunner, native kernels); steps are
shaped by crafted requests and timed whole (``core.step()``) and inside (``execute``):

    linear       one chunk of T tokens at context 0 (T = 1 .. 512)
    attn_prefill chunks of N tokens at contexts N, 2N, ... (one long prompt, budget N), less
                 the same chunk's linear time
    attn_decode  B decodes at context C (B = 1 .. 64, distinct prompts), less linear(B)
    overhead     step wall time less execute time, by chunks

Each point is the median of ``repeats`` steps. Imports torch (through the engine) only when run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

from tierserve.config import EngineConfig
from tierserve.sched.plan import StepPlan, StepResult
from tierserve.sim.cost import BatchShape
from tierserve.sim.executor import SimExecutor
from tierserve.sim.profiled import ProfiledCostModel, ProfilePoint, ProfileTable


@dataclass(slots=True, frozen=True)
class ProfileGrid:
    """The step shapes measured (defaults: SmolLM2 serving on a 2-core CPU)."""

    linear_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    prefill_chunks: tuple[int, ...] = (32, 128, 512)
    prefill_max_context: int = 2048
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (64, 256, 768, 1536)


@dataclass(slots=True)
class StepSample:
    """One real step: its shape, the executor's seconds and the whole step's seconds."""

    shape: BatchShape
    execute_s: float
    step_s: float = 0.0


class RecordingExecutor:
    """Wraps an executor; records each plan's shape and how long ``execute`` took."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.samples: list[StepSample] = []

    def __getattr__(self, name):  # annotate, close, ... of the wrapped runner
        return getattr(self.inner, name)

    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        result = self.inner.execute(plan)
        if plan.chunks:
            self.samples.append(StepSample(SimExecutor.batch_shape(plan),
                                           time.perf_counter() - started))
        return result


def timed_step(core, recorder: RecordingExecutor):
    """``core.step`` that also stamps the whole step's seconds on the recorder's last sample."""
    def step():
        count = len(recorder.samples)
        started = time.perf_counter()
        updates = core.step()
        if len(recorder.samples) > count:
            recorder.samples[-1].step_s = time.perf_counter() - started
        return updates
    return step


def profile_config(config: EngineConfig, grid: ProfileGrid, repeats: int) -> EngineConfig:
    """The engine as profiled: prefix caching off (every step computes what it is shaped to),
    a KV pool that holds the largest decode point without preempting."""
    block = config.cache.block_size
    longest = max(grid.decode_contexts) + 2 * max(grid.decode_batches) + repeats + 64
    blocks = max(grid.decode_batches) * -(-longest // block) + 2 * -(-(
        grid.prefill_max_context + max(grid.prefill_chunks)) // block)
    return replace(config, cache=replace(config.cache, enable_prefix_caching=False,
                                         num_blocks=max(config.cache.num_blocks or 0, blocks)))


def run_profile(config: EngineConfig, repeats: int = 5, progress: bool = True,
                grid: ProfileGrid = ProfileGrid()) -> ProfileTable:
    """Measure ``grid`` on the engine ``config`` loads."""
    from tqdm import tqdm

    from tierserve.engine.loading import build_engine

    loaded = build_engine(profile_config(config, grid, repeats))
    core = loaded.core
    recorder = RecordingExecutor(core.executor)
    core.executor = recorder
    step = timed_step(core, recorder)
    vocab = loaded.arch.vocab_size
    jobs = ([("linear", t) for t in grid.linear_tokens]
            + [("prefill", (n, grid.prefill_max_context)) for n in grid.prefill_chunks]
            + [("decode", (b, c)) for c in grid.decode_contexts for b in grid.decode_batches])
    measured: dict[tuple, list[StepSample]] = {}
    try:
        _warm_up(core, step, vocab)
        for kind, arg in tqdm(jobs, desc="profiling", unit="point", disable=not progress):
            for _ in range(repeats if kind != "decode" else 1):
                recorder.samples.clear()
                _GRID[kind](core, step, vocab, arg, repeats)
                for sample in recorder.samples:
                    key = _key(kind, arg, sample.shape)
                    if key is not None:
                        measured.setdefault(key, []).append(sample)
    finally:
        loaded.runner.close()
    return _table(measured, config)


_counter = iter(range(10**9))


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(16, vocab) for _ in range(length)]


def _run(core, step, requests) -> None:
    from tierserve.request import SamplingParams

    for prompt, max_tokens in requests:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        core.add_request(core.make_request(f"profile-{next(_counter)}", prompt, params))
    while core.has_unfinished():
        step()


def _with_budget(core, budget: int) -> int:
    """Set the scheduler's token budget; returns the old one."""
    scheduler = core.scheduler.config
    old = scheduler.max_num_batched_tokens
    scheduler.max_num_batched_tokens = budget
    return old


def _budget(core) -> int:
    return core.scheduler.config.max_num_batched_tokens


def _warm_up(core, step, vocab: int) -> None:
    _run(core, step, [(_prompt(vocab, 64, 1), 4)])


def _linear(core, step, vocab: int, tokens: int, repeats: int) -> None:
    old = _with_budget(core, max(tokens, _budget(core)))
    try:
        _run(core, step, [(_prompt(vocab, tokens, next(_counter)), 1)])
    finally:
        _with_budget(core, old)


def _prefill(core, step, vocab: int, arg: tuple[int, int], repeats: int) -> None:
    chunk, max_context = arg
    old = _with_budget(core, chunk)
    try:
        _run(core, step, [(_prompt(vocab, max_context + chunk, next(_counter)), 1)])
    finally:
        _with_budget(core, old)


def _decode(core, step, vocab: int, arg: tuple[int, int], repeats: int) -> None:
    batch, context = arg
    # Distinct prompts: rows sharing one cached prompt would read the same KV from cache, and
    # measure decode attention faster than real traffic (by 10-16% at 5-64 rows here).
    prompts = [_prompt(vocab, context, next(_counter)) for _ in range(batch)]
    budget = max(_budget(core), 2048)
    # Requests that finished their prefill decode while the others prefill: give each enough
    # tokens that `repeats` steps with all `batch` rows decoding still follow.
    prefill_steps = -(-batch * context // max(1, budget - batch)) + batch
    old = _with_budget(core, budget)
    try:
        _run(core, step, [(prompt, repeats + 2 + prefill_steps) for prompt in prompts])
    finally:
        _with_budget(core, old)


_GRID = {"linear": _linear, "prefill": _prefill, "decode": _decode}


def _key(kind: str, arg, shape: BatchShape) -> tuple | None:
    """Which grid point a recorded step measures (None: a set-up step). Decode steps are keyed
    by their nominal context (it grows by one a step)."""
    chunks = shape.chunks
    if kind in ("linear", "prefill") and len(chunks) == 1:
        chunk = chunks[0]
        return ("prefill", chunk.num_tokens, chunk.context)
    if kind == "decode" and len(chunks) == arg[0] and all(c.is_decode for c in chunks):
        return ("decode", *arg)
    return None


def _table(measured: dict[tuple, list[StepSample]], config: EngineConfig) -> ProfileTable:
    def median(samples: list[StepSample], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    linear = {n: median(samples, "execute_s") for (kind, n, ctx), samples in measured.items()
              if kind == "prefill" and ctx == 0}
    table = ProfileTable(meta=_machine(config))
    for tokens, seconds in sorted(linear.items()):
        table.points.append(ProfilePoint("linear", tokens, 0, 0, seconds))
    probe = ProfiledCostModel(table)  # linear interpolation only, so far

    for (kind, n, ctx), samples in sorted(measured.items()):
        if kind == "prefill" and ctx > 0:
            table.points.append(ProfilePoint("attn_prefill", n, 1, ctx,
                                             median(samples, "execute_s") - probe.linear_seconds(n)))
    for (kind, batch, _), samples in sorted(measured.items()):
        if kind == "decode":
            context = statistics.median(sum(c.context for c in s.shape.chunks) for s in samples)
            table.points.append(ProfilePoint("attn_decode", batch, batch, int(context),
                                             median(samples, "execute_s")
                                             - probe.linear_seconds(batch)))
    overhead: dict[int, list[float]] = {}
    for samples in measured.values():
        for s in samples:
            if s.step_s:
                overhead.setdefault(len(s.shape.chunks), []).append(s.step_s - s.execute_s)
    for chunks, values in sorted(overhead.items()):
        table.points.append(ProfilePoint("overhead", chunks, 0, 0, statistics.median(values)))
    return table


def _machine(config: EngineConfig) -> dict:
    from tierserve.bench.report import machine_info

    return {"machine": machine_info(config.model.dtype), "prefill_at_zero_in_linear": True,
            "model": config.model.model,
            "dtype": config.model.dtype, "threads": config.model.num_threads,
            "block_size": config.cache.block_size, "date": time.strftime("%Y-%m-%d")}
