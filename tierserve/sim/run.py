"""Build a simulated engine (the real EngineCore over a SimExecutor) and replay a trace on it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tierserve.config import EngineConfig
from tierserve.engine.core import EngineCore, EngineLimits
from tierserve.metrics import MetricsCollector, percentile
from tierserve.sim.cost import CostModel, Parallelism
from tierserve.sim.driver import DriveResult, PromptMaker, drive
from tierserve.sim.executor import SimExecutor, SimLinks, VirtualClock
from tierserve.sim.hardware import HardwareProfile
from tierserve.sim.model_shape import ModelShape
from tierserve.sim.traces import TraceRequest


@dataclass(slots=True)
class SimSetup:
    """A simulated deployment: model, hardware, parallelism, cost model, engine configuration.

    ``kv_capacity_tokens`` is the device tier's size (the roofline model derives it from the
    hardware's memory); the engine config's cache and scheduler sections are used as they are.
    """

    model: ModelShape
    hardware: HardwareProfile | None  # None: no copy links (a profiled CPU run without tiers)
    cost: CostModel
    engine: EngineConfig
    kv_capacity_tokens: int
    max_model_len: int
    parallel: Parallelism = field(default_factory=Parallelism)
    block_bytes: int | None = None  # one KV block, all layers (None: from the model's shape)
    links: SimLinks | None = None  # copy links (None: the hardware's host link)

    @property
    def bytes_per_block(self) -> int:
        if self.block_bytes is not None:
            return self.block_bytes
        return self.model.kv_bytes_per_token * self.engine.cache.block_size


@dataclass(slots=True)
class SimRun:
    """A finished replay: the engine's summary plus the simulation's own counters."""

    result: DriveResult
    executor: SimExecutor | None  # None for a real-engine replay (calibration)
    wall_s: float  # real seconds the simulation took
    metrics: MetricsCollector | None = None  # the engine's, for percentiles beyond the summary

    def percentile(self, metric: str, q: float) -> float:
        """``ttft``, ``tbt`` or ``e2e`` at percentile ``q`` over finished requests."""
        timelines = self.metrics.finished_timelines()
        values = {"ttft": [t.ttft for t in timelines if t.ttft is not None],
                  "tbt": [gap for t in timelines for gap in t.tbts],
                  "e2e": [t.e2e_latency for t in timelines]}[metric]
        return percentile(values, q)

    def row(self) -> dict:
        summary = self.result.summary
        return {
            "num_finished": summary["num_finished"],
            "ttft_p50_s": summary["ttft"]["p50"], "ttft_p99_s": summary["ttft"]["p99"],
            "tbt_p50_s": summary["tbt"]["p50"], "tbt_p99_s": summary["tbt"]["p99"],
            "queue_p50_s": summary["queue_time"]["p50"],
            "e2e_p50_s": summary["e2e_latency"]["p50"],
            "throughput_tokens_per_s": summary["throughput_tokens_per_s"],
            "preemptions": summary["preemptions_total"],
            "swap_bytes": summary["swap_bytes_total"],
            "prefix_cache_hit_rate": summary["prefix_cache_hit_rate"],
            "num_steps": self.result.num_steps,
            "simulated_s": self.result.clock_s,
            "busy_s": self.executor.busy_s if self.executor is not None else None,
            "wall_s": self.wall_s,
        }


def make_setup(engine: EngineConfig, max_model_len: int, model: str = "mistral-7b",
               hardware: str = "a100-80gb-sxm", tensor_parallel: int = 1,
               pipeline_parallel: int = 1, interconnect: str | None = None,
               cost: str = "roofline", cpu_overhead_s: float | None = None,
               kv_capacity_tokens: int | None = None) -> SimSetup:
    """A SimSetup from names: a model shape, a hardware profile, and a cost model spec
    (``roofline``, ``profile:FOLDER`` or ``vidur:FOLDER``). The device KV capacity defaults to
    what fits beside the weights."""
    from tierserve.sim.cost import Efficiency, RooflineCostModel
    from tierserve.sim.hardware import get_hardware
    from tierserve.sim.model_shape import load_model_shape
    from tierserve.sim.profiled import ProfiledCostModel, ProfileTable, read_vidur_profile

    shape = load_model_shape(model)
    profile = get_hardware(hardware, interconnect)
    parallel = Parallelism(tensor_parallel, pipeline_parallel)
    efficiency = Efficiency() if cpu_overhead_s is None else Efficiency(
        step_overhead_s=cpu_overhead_s)
    roofline = RooflineCostModel(shape, profile, efficiency, parallel)
    kind, _, folder = cost.partition(":")
    if kind == "roofline":
        cost_model: CostModel = roofline
    elif kind == "profile" and folder:
        cost_model = ProfiledCostModel(ProfileTable.read(folder), cpu_overhead_s)
    elif kind == "vidur" and folder:
        cost_model = ProfiledCostModel(read_vidur_profile(folder, shape, tensor_parallel),
                                       cpu_overhead_s)
    else:
        raise ValueError(f"--cost {cost!r}: write roofline, profile:FOLDER or vidur:FOLDER")
    capacity = kv_capacity_tokens or roofline.kv_capacity_tokens()
    return SimSetup(shape, profile, cost_model, engine, capacity, max_model_len, parallel)


def build_engine(setup: SimSetup, record_steps: bool = False
                 ) -> tuple[EngineCore, SimExecutor, VirtualClock]:
    """The real EngineCore with a SimExecutor under a fresh virtual clock."""
    clock = VirtualClock()
    # Each tensor-parallel rank copies its 1/t shard of a block over its own host link.
    link_bytes = setup.bytes_per_block // setup.parallel.tensor
    links = setup.links
    if links is None and setup.hardware is not None:
        links = SimLinks(setup.hardware.host_link)
    executor = SimExecutor(setup.cost, clock, link_bytes, links, record_steps=record_steps)
    limits = EngineLimits(setup.max_model_len, setup.model.vocab_size,
                          setup.kv_capacity_tokens, setup.bytes_per_block)
    core = EngineCore(setup.engine, executor, limits, clock=clock)
    return core, executor, clock


def simulate(setup: SimSetup, trace: list[TraceRequest], seed: int = 0,
             record_steps: bool = False, progress=None, before_step=None,
             prepare=None) -> SimRun:
    """Replay ``trace`` (arrivals assigned) on a fresh simulated engine; ``prepare(executor)``
    installs models of capabilities the cost model does not know (experts, KV selection)."""
    core, executor, clock = build_engine(setup, record_steps)
    if prepare is not None:
        prepare(executor)
    started = time.perf_counter()
    result = drive(core, trace, clock, clock.advance, PromptMaker(setup.model.vocab_size, seed),
                   progress=progress, before_step=before_step)
    return SimRun(result, executor, time.perf_counter() - started, core.metrics)


def run_pool(function, jobs: list, workers: int, describe=None) -> list:
    """``function`` over ``jobs`` in ``workers`` processes (the simulator is single-threaded),
    results in job order; ``describe(result)`` (if given, not False) is printed as each arrives."""
    from concurrent.futures import ProcessPoolExecutor

    def collect(outcomes) -> list:
        results = []
        for result in outcomes:
            results.append(result)
            if describe:
                print(describe(result), flush=True)
        return results

    if workers <= 1:  # in this process: no fork (a large parent may not be able to)
        return collect(map(function, jobs))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return collect(pool.map(function, jobs))
