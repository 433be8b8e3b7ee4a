"""Metrics: percentile and Jain's index, request timelines under a fake clock, Prometheus text."""

from __future__ import annotations

import enum
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from tierserve.metrics import (
    Histogram,
    MetricsCollector,
    RequestTimeline,
    jain_index,
    percentile,
    render_prometheus,
)


class FakeClock:
    """A clock that moves only when told; times are multiples of 0.25 so sums are exact."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _run_request(collector, clock, request_id, *, queue, first, gaps, client="c", prompt=4):
    """Drive one request through the hooks: wait `queue`, first token after `first`, then gaps."""
    collector.on_arrival(request_id, client, prompt)
    clock.advance(queue)
    collector.on_scheduled(request_id)
    clock.advance(first - queue)
    collector.on_tokens(request_id)
    for gap in gaps:
        clock.advance(gap)
        collector.on_tokens(request_id)
    collector.on_finished(request_id, "stop")


# ---- percentile and Jain's index ------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(size):
    data = np.random.default_rng(size).normal(size=size).tolist()
    for q in [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100]:
        expected = float(np.percentile(data, q, method="linear"))
        assert math.isclose(percentile(data, q), expected, rel_tol=1e-12, abs_tol=1e-12), q


def test_percentile_of_empty_is_nan_and_q_is_checked():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_jain_index_equal_one_hot_and_known_example():
    assert jain_index([3.0, 3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([0.0, 0.0, 5.0, 0.0]) == pytest.approx(1 / 4)
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / 42)  # 6^2 / (3 * 14)
    assert jain_index([]) == 1.0
    assert jain_index([0, 0]) == 1.0


# ---- timelines ------------------------------------------------------------------------------
def test_scripted_timeline_gives_exact_queue_ttft_tbt_e2e():
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    collector.on_arrival("r1", "alice", 8)
    clock.advance(0.5)
    collector.on_scheduled("r1")
    clock.advance(0.25)
    collector.on_scheduled("r1")  # a later step must not move the scheduled time
    clock.advance(0.25)
    collector.on_tokens("r1")
    clock.advance(0.25)
    collector.on_tokens("r1")
    clock.advance(0.5)
    collector.on_tokens("r1", count=2)  # two tokens in one step: a 0 s gap
    clock.advance(0.5)
    collector.on_finished("r1", "length")

    [timeline] = collector.finished_timelines()
    assert timeline.queue_time == 0.5
    assert timeline.ttft == 1.0
    assert timeline.tbts == [0.25, 0.5, 0.0]
    assert timeline.e2e_latency == 2.25
    assert timeline.num_output_tokens == 4
    assert timeline.finish_reason == "length"
    assert collector.requests_total == {"length": 1}
    assert collector.tokens_generated_total == 4
    assert collector.prompt_tokens_total == 8
    assert collector.get("r1") is None  # no longer active
    # The histograms saw the same gaps as the timeline (0.0 included), one TTFT and one e2e.
    assert collector.tbt_histogram.count == 3 and collector.tbt_histogram.sum == 0.75
    assert (collector.ttft_histogram.sum, collector.e2e_histogram.sum) == (1.0, 2.25)


def test_timeline_properties_are_none_until_the_milestone():
    timeline = RequestTimeline("r", "c", arrival_time=1.0, num_prompt_tokens=3)
    assert (timeline.queue_time, timeline.ttft, timeline.e2e_latency) == (None, None, None)
    assert timeline.tbts == []
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        RequestTimeline("r", "c", arrival_time=1.0, num_prompt_tokens=-1)


def test_summary_percentiles_over_finished_requests():
    clock = FakeClock(0.0)
    collector = MetricsCollector(clock=clock)
    # Sequential requests: queue 0.25*k, ttft 1*k, tbt gaps as listed, for k = 1..4.
    for k in range(1, 5):
        _run_request(collector, clock, f"r{k}", queue=0.25 * k, first=1.0 * k, gaps=[0.5] * k)
    summary = collector.summary()

    assert summary["num_finished"] == 4
    assert summary["ttft"]["p50"] == pytest.approx(2.5)
    assert summary["ttft"]["p90"] == pytest.approx(3.7)
    assert summary["ttft"]["p99"] == pytest.approx(3.97)
    assert summary["ttft"]["mean"] == pytest.approx(2.5)
    assert summary["queue_time"]["p50"] == pytest.approx(0.625)
    assert summary["tbt"]["p99"] == pytest.approx(0.5)  # all 10 gaps are 0.5 s
    # e2e = k + 0.5k = 1.5k -> 1.5, 3, 4.5, 6
    assert summary["e2e_latency"]["p90"] == pytest.approx(float(np.percentile([1.5, 3, 4.5, 6], 90)))
    # 1+2+3+4 tokens + one first token each = 14 tokens over the whole span of 15 s.
    assert summary["output_tokens"] == 14
    assert summary["throughput_tokens_per_s"] == pytest.approx(14 / 15.0)


def test_summary_of_nothing_is_nan_not_an_error():
    summary = MetricsCollector().summary()
    assert summary["num_finished"] == 0
    assert math.isnan(summary["ttft"]["p50"]) and math.isnan(summary["tbt"]["mean"])
    assert summary["throughput_tokens_per_s"] == 0.0
    assert summary["jain_index"] == 1.0


def test_counters_for_preemption_swap_cache_and_prefix_hit_rate():
    collector = MetricsCollector(clock=FakeClock())
    collector.on_arrival("r", "c", 16)
    collector.on_cached("r", 8)
    collector.on_preempted("r")
    collector.on_preempted("r")
    collector.on_swap("r", 4096, 0.25)
    collector.on_swap("r", 4096, 0.5)
    collector.set_prefix_cache(queries=10, hits=4)
    timeline = collector.get("r")
    assert (timeline.num_cached_tokens, timeline.num_preemptions) == (8, 2)
    assert (timeline.swapped_bytes, timeline.swap_seconds) == (8192, 0.75)
    summary = collector.summary()
    assert summary["preemptions_total"] == 2
    assert summary["swap_bytes_total"] == 8192 and summary["swap_seconds_total"] == 0.75
    assert summary["prefix_cache_hit_rate"] == pytest.approx(0.4)


def test_finish_reason_enum_is_counted_by_value():
    class Reason(enum.Enum):
        ABORT = "abort"

    collector = MetricsCollector(clock=FakeClock())
    collector.on_arrival("r", "c", 1)
    collector.on_finished("r", Reason.ABORT)
    assert collector.requests_total == {"abort": 1}


def test_on_step_keeps_recent_tokens_per_second():
    collector = MetricsCollector(clock=FakeClock())
    collector.on_step(100, num_running=3, num_waiting=2, num_swapped=1, step_seconds=0.5)
    collector.on_step(300, num_running=4, num_waiting=0, num_swapped=0, step_seconds=0.5)
    assert collector.steps_total == 2 and collector.batched_tokens_total == 400
    assert collector.last_step == {"running": 4, "waiting": 0, "swapped": 0}
    assert collector.recent_tokens_per_second() == pytest.approx(400.0)
    for _ in range(200):  # the history is short: old steps fall out
        collector.on_step(10, 1, 0, 0, step_seconds=1.0)
    assert collector.recent_tokens_per_second() == pytest.approx(10.0)


def test_per_client_service_and_jain_over_clients():
    collector = MetricsCollector(clock=FakeClock())
    collector.on_service("alice", prompt_tokens=10, output_tokens=20)
    collector.on_service("alice", prompt_tokens=0, output_tokens=10)
    collector.on_service("bob", prompt_tokens=20, output_tokens=0)
    collector.on_service("carol", prompt_tokens=0, output_tokens=60)
    assert collector.client_service() == {
        "alice": {"prompt_tokens": 10, "output_tokens": 30},
        "bob": {"prompt_tokens": 20, "output_tokens": 0},
        "carol": {"prompt_tokens": 0, "output_tokens": 60},
    }
    summary = collector.summary()
    assert summary["client_service"] == collector.client_service()
    # Service is prompt + output: 40, 20, 60 -> 120^2 / (3 * 5600).
    assert summary["jain_index"] == pytest.approx(120**2 / (3 * 5600))


def test_max_finished_keeps_only_the_newest():
    clock = FakeClock()
    collector = MetricsCollector(clock=clock, max_finished=3)
    for k in range(5):
        _run_request(collector, clock, f"r{k}", queue=0.25, first=0.5, gaps=[])
    assert [t.request_id for t in collector.finished_timelines()] == ["r2", "r3", "r4"]
    assert collector.summary()["num_finished"] == 3
    assert collector.requests_total == {"stop": 5}  # counters are not bounded


def test_unknown_request_ids_are_ignored():
    collector = MetricsCollector(clock=FakeClock())
    collector.on_scheduled("ghost")
    collector.on_tokens("ghost", count=3)
    collector.on_cached("ghost", 5)
    collector.on_preempted("ghost")
    collector.on_swap("ghost", 100, 1.0)
    collector.on_finished("ghost", "stop")
    assert collector.requests_total == {}
    assert collector.tokens_generated_total == 0
    assert collector.preemptions_total == 0 and collector.swap_bytes_total == 0
    assert collector.ttft_histogram.count == 0 and collector.e2e_histogram.count == 0
    assert collector.finished_timelines() == []


def test_metrics_module_imports_without_torch():
    code = "import sys, tierserve.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- Prometheus -----------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse(text: str):
    """Parse exposition text: {family: type}, and samples as (name, labels, value)."""
    types, helps, samples = {}, set(), []
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helps, f"TYPE before HELP for {name}"
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"unparsable line {line!r}"
            name, label_text, value = match.groups()
            labels = {k: _unescape(v) for k, v in _LABEL.findall(label_text or "")}
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"sample {name} has no TYPE line before it"
            samples.append((name, labels, float(value)))
    return types, samples


def test_histogram_buckets_are_cumulative_and_le_is_inclusive():
    histogram = Histogram([0.1, 1.0])
    for value in [0.05, 0.1, 0.5, 1.0, 7.0]:
        histogram.observe(value)
    assert histogram.counts == [2, 4, 5]
    assert histogram.count == 5 and histogram.sum == pytest.approx(8.65)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([1.0, 0.5])


def test_render_prometheus_parses_with_help_type_buckets_and_escaping():
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    for k in range(3):
        _run_request(collector, clock, f"r{k}", queue=0.25, first=0.5 + k, gaps=[0.25] * (k + 1))
    collector.on_arrival("odd", "c", 2)
    collector.on_finished("odd", 'we"ird\\reason\nhere')
    gauges = {"num_requests_running": 2, 'kv_cache_usage{tier="gpu"}': 0.5,
              'kv_cache_usage{tier="cpu"}': 0.25}
    text = render_prometheus(collector, gauges)
    types, samples = _parse(text)

    assert types["tierserve_requests_total"] == "counter"
    assert types["tierserve_time_to_first_token_seconds"] == "histogram"
    assert types["tierserve_kv_cache_usage"] == "gauge"
    assert text.count("# TYPE tierserve_kv_cache_usage ") == 1
    statuses = {s[1]["status"]: s[2] for s in samples if s[0] == "tierserve_requests_total"}
    assert statuses == {"stop": 3.0, 'we"ird\\reason\nhere': 1.0}
    usage = {s[1]["tier"]: s[2] for s in samples if s[0] == "tierserve_kv_cache_usage"}
    assert usage == {"gpu": 0.5, "cpu": 0.25}
    assert ("tierserve_generation_tokens_total", {}, 9.0) in samples

    observed = {"time_to_first_token": 3, "time_between_tokens": 6, "e2e_request_latency": 4}
    for family, num_observed in observed.items():
        name = f"tierserve_{family}_seconds"
        buckets = [(s[1]["le"], s[2]) for s in samples if s[0] == name + "_bucket"]
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert buckets[-1] == ("+Inf", num_observed)
        [count] = [s[2] for s in samples if s[0] == name + "_count"]
        assert count == num_observed


def test_render_prometheus_rejects_bad_gauge_names():
    with pytest.raises(ValueError, match="gauge key"):
        render_prometheus(MetricsCollector(), {"kv usage": 1.0})
