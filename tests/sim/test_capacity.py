"""Capacity search: bisection to the threshold, Sarathi-Serve's two-part criterion."""

import math

import pytest

from tierserve.sim.capacity import CapacitySLO, bisect_rate, search_capacity


def test_bisection_converges_below_the_threshold():
    probed = []

    def meets(rate):
        probed.append(rate)
        return rate <= 3.3

    found = bisect_rate(meets, 0.1, 10.0, iterations=8)
    assert 3.3 - (10 - 0.1) / 2**8 <= found <= 3.3
    assert probed[:2] == [0.1, 10.0] and len(probed) == 10


def test_bisection_edges():
    assert bisect_rate(lambda r: False, 1, 5, 4) is None
    assert bisect_rate(lambda r: True, 1, 5, 4) == 5
    with pytest.raises(ValueError, match="min rate"):
        bisect_rate(lambda r: True, 5, 1, 4)


def test_capacity_needs_both_the_tbt_slo_and_the_scheduling_delay():
    slo = CapacitySLO(tbt_p99_s=0.1, max_queue_p50_s=2.0)
    assert slo.met({"tbt_p99_s": 0.09, "queue_p50_s": 1.0})
    assert not slo.met({"tbt_p99_s": 0.11, "queue_p50_s": 1.0})
    assert not slo.met({"tbt_p99_s": 0.05, "queue_p50_s": 2.5})  # queues build up
    assert not slo.met({"tbt_p99_s": math.nan, "queue_p50_s": 0.1})

    def run_at(rate):  # TBT fine everywhere; the queue explodes past 2 req/s
        return {"tbt_p99_s": 0.05, "queue_p50_s": 0.1 if rate <= 2 else 30.0}

    capacity, probes = search_capacity(run_at, slo, 0.5, 8.0, 6)
    assert 2 - 7.5 / 64 <= capacity <= 2
    assert [p.met for p in probes[:2]] == [True, False]
