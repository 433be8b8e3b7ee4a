"""`tierserve bench capacity`: the binary search on a fake monotone measure, and the command on
the tiny model."""

from __future__ import annotations

import json

import pytest

from tierserve.bench.capacity import describe_capacity, search_capacity
from tierserve.bench.cli import main


def _linear_tbt(seconds_per_rate: float, calls: list[float]):
    """A monotone fake: P99 TBT grows linearly with the rate."""
    def measure(rate: float) -> float:
        calls.append(rate)
        return seconds_per_rate * rate

    return measure


def test_search_finds_the_highest_rate_within_one_bisection_step():
    calls: list[float] = []
    capacity, probes = search_capacity(_linear_tbt(0.1, calls), slo=0.5, lo=1.0, hi=9.0,
                                       iterations=6)
    assert 5.0 - 8.0 / 2**6 <= capacity <= 5.0
    assert calls[:2] == [1.0, 9.0] and len(calls) == 2 + 6
    assert [p.met for p in probes] == [p.tbt_p99_s <= 0.5 for p in probes]


def test_when_even_the_lowest_rate_misses_the_search_stops_there():
    calls: list[float] = []
    capacity, probes = search_capacity(_linear_tbt(1.0, calls), slo=0.5, lo=1.0, hi=9.0,
                                       iterations=4)
    assert capacity is None and calls == [1.0] and not probes[0].met
    assert "below --min-rate" in describe_capacity(capacity, 1.0, 9.0, 4)


def test_when_the_highest_rate_meets_it_is_the_answer():
    calls: list[float] = []
    capacity, probes = search_capacity(_linear_tbt(0.01, calls), slo=0.5, lo=1.0, hi=9.0,
                                       iterations=4)
    assert capacity == 9.0 and calls == [1.0, 9.0] and all(p.met for p in probes)
    assert "at least --max-rate" in describe_capacity(capacity, 1.0, 9.0, 4)


def test_a_nan_measurement_counts_as_a_miss():
    capacity, probes = search_capacity(lambda rate: float("nan"), slo=1.0, lo=1.0, hi=2.0,
                                       iterations=3)
    assert capacity is None and len(probes) == 1


@pytest.mark.parametrize("lo, hi, slo, iterations, flag", [
    (2.0, 1.0, 1.0, 3, "--min-rate"), (0.0, 1.0, 1.0, 3, "--min-rate"),
    (1.0, 2.0, 0.0, 3, "--tbt-slo"), (1.0, 2.0, 1.0, -1, "--iterations")])
def test_bad_search_bounds_name_the_flag(lo, hi, slo, iterations, flag):
    with pytest.raises(ValueError, match=flag):
        search_capacity(lambda rate: 0.0, slo=slo, lo=lo, hi=hi, iterations=iterations)


def test_capacity_command_reports_each_probe(tiny_llama_dir, tmp_path):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "capacity.json"
    try:
        code = main(["capacity", "--model", str(tiny_llama_dir), "--tbt-slo", "1000",
                     "--min-rate", "4", "--max-rate", "16", "--iterations", "2", "--duration",
                     "5", "--num-requests", "3", "--scale", "0.05", "--max-output-len", "8",
                     "--threads", "1", "--num-blocks", "64", "--no-progress", "--json", str(out),
                     "--plot", str(tmp_path / "capacity.png")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    document = json.loads(out.read_text())
    # A 1000 s SLO is met everywhere: the low then the high end, no bisection.
    assert document["capacity"]["sarathi"]["rate"] == 16.0
    rows = list(document["results"].values())
    assert [row["rate"] for row in rows] == [4.0, 16.0]
    assert all(row["met_slo"] and "tbt_p99_s" in row for row in rows)
    assert (tmp_path / "capacity.png").stat().st_size > 0
