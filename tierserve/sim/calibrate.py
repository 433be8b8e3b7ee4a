"""`tierserve sim calibrate`: the simulator against this machine's real engine.

The same trace (lengths and arrivals) is replayed twice with the same engine configuration:
on the real engine (wall clock, the driver sleeping between arrivals, every step recorded) and
on the simulated one (the profiled cost model, virtual clock). Two comparisons:

- step times: the cost model's price of each recorded step's shape vs its measured seconds
  (whole ``core.step()``), as absolute percentage errors;
- end to end: TTFT and TBT P50/P99, end-to-end P50 and throughput, simulated vs measured.

Imports torch (through the engine) only when run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

from tierserve.config import EngineConfig
from tierserve.sim.driver import PromptMaker, drive
from tierserve.sim.executor import SimLinks
from tierserve.sim.hardware import LinkSpec
from tierserve.sim.model_shape import KNOWN_MODELS
from tierserve.sim.profile import RecordingExecutor, timed_step
from tierserve.sim.profiled import ProfiledCostModel
from tierserve.sim.run import SimSetup, simulate
from tierserve.sim.traces import TraceRequest, poisson_arrivals

# The CPU engine's "host tier" is a second buffer in the same RAM: copies are memcpy on the
# swap worker thread (~10 GB/s on one core of these machines, a few us to start one).
CPU_LINKS = SimLinks(LinkSpec(bandwidth=10e9, overhead_s=5e-6, efficiency=1.0),
                     LinkSpec(bandwidth=2e9, overhead_s=50e-6, efficiency=1.0))
E2E_METRICS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p50_s",
               "throughput_tokens_per_s")


@dataclass(slots=True, frozen=True)
class CalibrationWorkload:
    """Lognormal prompt/output lengths (medians), sent at ``rate`` req/s (0: all at once)."""

    name: str
    num_requests: int
    prompt_median: int
    output_median: int
    rate: float
    sigma: float = 0.6
    seed: int = 0

    def trace(self) -> list[TraceRequest]:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        prompts = np.clip(rng.lognormal(np.log(self.prompt_median), self.sigma,
                                        self.num_requests), 4, 8 * self.prompt_median)
        outputs = np.clip(rng.lognormal(np.log(self.output_median), self.sigma,
                                        self.num_requests), 2, 8 * self.output_median)
        trace = [TraceRequest(int(p), int(o)) for p, o in zip(prompts, outputs)]
        poisson_arrivals(trace, self.rate, self.seed)
        return trace


DEFAULT_WORKLOADS = (
    CalibrationWorkload("online", 48, 192, 64, rate=1.5),
    CalibrationWorkload("batch", 48, 192, 64, rate=0.0, seed=1),
)


def _percent_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured * 100.0 if measured else float("nan")


def measure_real(config: EngineConfig, trace: list[TraceRequest], seed: int = 0):
    """Replay ``trace`` on the real engine; (row of metrics, recorded step samples, limits)."""
    from tierserve.engine.loading import build_engine
    from tierserve.sim.run import SimRun

    loaded = build_engine(config)
    core = loaded.core
    recorder = RecordingExecutor(core.executor)
    core.executor = recorder
    try:
        warm = [TraceRequest(32, 4, arrival_s=0.0)]  # first-step costs out of the measurement
        drive(core, warm, time.monotonic, time.sleep, PromptMaker(loaded.arch.vocab_size, 99))
        loaded.core.metrics = type(core.metrics)(clock=core.clock)
        recorder.samples.clear()
        started = time.perf_counter()
        result = drive(core, trace, time.monotonic, time.sleep,
                       PromptMaker(loaded.arch.vocab_size, seed), step=timed_step(core, recorder))
        wall = time.perf_counter() - started
    finally:
        loaded.runner.close()
    row = SimRun(result, None, wall).row()
    return row, list(recorder.samples), core.limits


def calibrate(config: EngineConfig, cost: ProfiledCostModel,
              workloads: tuple[CalibrationWorkload, ...] = DEFAULT_WORKLOADS,
              progress: bool = True, repeat_real: bool = False) -> dict:
    """Measured vs simulated for each workload (module docstring); returns the report.

    ``repeat_real`` replays each workload on the real engine a second time: how far two real
    runs of the same code differ is the noise floor no simulator can beat on this machine."""
    report: dict = {"workloads": {}}
    step_errors_all: list[float] = []
    e2e_errors_all: list[float] = []
    repeat_all: list[float] = []
    for workload in workloads:
        if progress:
            print(f"calibrating on {workload.name}: real engine ...", flush=True)
        measured, samples, limits = measure_real(config, workload.trace(), workload.seed)
        timed = [s for s in samples if s.step_s]
        step_errors = [_percent_error(cost.step_seconds(s.shape), s.step_s) for s in timed]
        # Only the vocabulary and the KV block size of the shape matter with a profiled cost.
        shape = replace(KNOWN_MODELS["smollm2-135m"], name=config.model.model,
                        vocab_size=limits.vocab_size)
        setup = SimSetup(shape,
                         None, cost, config, limits.kv_capacity_tokens, limits.max_model_len,
                         block_bytes=limits.bytes_per_block, links=CPU_LINKS)
        simulated = simulate(setup, workload.trace(), workload.seed).row()
        e2e = {name: {"measured": measured[name], "simulated": simulated[name],
                      "error_pct": _percent_error(simulated[name], measured[name])}
               for name in E2E_METRICS}
        if repeat_real:
            again, _, _ = measure_real(config, workload.trace(), workload.seed)
            for name in E2E_METRICS:
                e2e[name]["measured_again"] = again[name]
                e2e[name]["repeat_diff_pct"] = _percent_error(again[name], measured[name])
            repeat_all += [e2e[name]["repeat_diff_pct"] for name in E2E_METRICS]
        report["workloads"][workload.name] = {
            "workload": {"num_requests": workload.num_requests, "rate": workload.rate,
                         "prompt_median": workload.prompt_median,
                         "output_median": workload.output_median},
            "steps": {"count": len(step_errors),
                      "median_abs_error_pct": statistics.median(step_errors),
                      "p90_abs_error_pct": _quantile(step_errors, 0.9),
                      "measured_s_total": sum(s.step_s for s in samples),
                      "predicted_s_total": sum(cost.step_seconds(s.shape) for s in samples),
                      "by_kind": _by_kind(timed, cost)},
            "e2e": e2e,
            "median_abs_e2e_error_pct": statistics.median(v["error_pct"] for v in e2e.values()),
            "measured": measured, "simulated": simulated,
        }
        step_errors_all += step_errors
        e2e_errors_all += [v["error_pct"] for v in e2e.values()]
    report["median_abs_step_error_pct"] = statistics.median(step_errors_all)
    report["median_abs_e2e_error_pct"] = statistics.median(e2e_errors_all)
    if repeat_all:
        report["median_abs_real_repeat_diff_pct"] = statistics.median(repeat_all)
    return report


def _kind(shape) -> str:
    decodes = len(shape.decodes)
    if decodes == len(shape.chunks):
        for bound, name in ((4, "decode 1-4"), (16, "decode 5-16"), (64, "decode 17-64")):
            if decodes <= bound:
                return name
        return "decode >64"
    return "prefill only" if not decodes else "mixed"


def _by_kind(samples, cost) -> dict:
    """Where the step model misses: per kind of step, count, median |error| and median signed
    error (simulated - measured, % of measured; > 0: the model is slow)."""
    groups: dict[str, list[float]] = {}
    for sample in samples:
        signed = (cost.step_seconds(sample.shape) - sample.step_s) / sample.step_s * 100.0
        groups.setdefault(_kind(sample.shape), []).append(signed)
    return {kind: {"count": len(values),
                   "median_abs_error_pct": statistics.median(abs(v) for v in values),
                   "median_signed_error_pct": statistics.median(values)}
            for kind, values in sorted(groups.items())}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
