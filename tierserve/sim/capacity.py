"""Sarathi-Serve's capacity: the highest Poisson request rate whose P99 time between tokens
meets the SLO while the median scheduling delay stays within a bound (2 s in the paper), found
by binary search, each probe a fresh replay of the same trace at that rate.

The search itself (``bisect_rate``) is shared with ``tierserve bench capacity``, which probes
the real engine instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class RateProbe:
    """One probed rate and what it measured."""

    rate: float
    met: bool
    tbt_p99_s: float = math.nan
    queue_p50_s: float = math.nan
    row: dict = field(default_factory=dict, compare=False)


def bisect_rate(meets: Callable[[float], bool], lo: float, hi: float, iterations: int
                ) -> float | None:
    """The highest rate in [lo, hi] for which ``meets`` holds, assuming it holds below some
    threshold and not above. Probes ``lo`` (a miss: None), then ``hi`` (a pass: ``hi``), then
    bisects ``iterations`` times: the answer is within ``(hi - lo) / 2**iterations`` below the
    threshold."""
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min rate <= max rate, got {lo} and {hi}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not meets(lo):
        return None
    if hi == lo or meets(hi):
        return hi
    good, bad = lo, hi
    for _ in range(iterations):
        middle = (good + bad) / 2
        if meets(middle):
            good = middle
        else:
            bad = middle
    return good


@dataclass(slots=True, frozen=True)
class CapacitySLO:
    """Sarathi-Serve's criterion: P99 TBT <= ``tbt_p99_s`` and median scheduling delay <=
    ``max_queue_p50_s``."""

    tbt_p99_s: float
    max_queue_p50_s: float = 2.0

    def __post_init__(self) -> None:
        if self.tbt_p99_s <= 0 or self.max_queue_p50_s <= 0:
            raise ValueError("the TBT SLO and the scheduling-delay bound must be positive")

    def met(self, row: dict) -> bool:
        tbt, queue = row["tbt_p99_s"], row["queue_p50_s"]
        return (not math.isnan(tbt) and tbt <= self.tbt_p99_s
                and not math.isnan(queue) and queue <= self.max_queue_p50_s)


def search_capacity(run_at: Callable[[float], dict], slo: CapacitySLO, lo: float, hi: float,
                    iterations: int) -> tuple[float | None, list[RateProbe]]:
    """Capacity under ``slo``; ``run_at(rate)`` replays the trace at that rate and returns its
    row (``tbt_p99_s``, ``queue_p50_s``, ...). Returns (capacity, probes in the order run)."""
    probes: list[RateProbe] = []

    def meets(rate: float) -> bool:
        row = run_at(rate)
        probes.append(RateProbe(rate, slo.met(row), row["tbt_p99_s"], row["queue_p50_s"], row))
        return probes[-1].met

    return bisect_rate(meets, lo, hi, iterations), probes
