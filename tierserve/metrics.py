"""Serving metrics: per-request timelines, engine-wide counters, summaries and Prometheus text.

The engine calls a ``MetricsCollector``'s ``on_*`` hooks; the server renders it with
``render_prometheus``, benchmarks read ``summary()``. Pure Python; times are clock() seconds.
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import accumulate

# Upper bounds (seconds) of the latency histograms; +Inf is implicit.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TBT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
STEP_HISTORY = 64  # steps kept for the recent tokens/s estimate


@dataclass(slots=True)
class RequestTimeline:
    """Milestones and counts of one request, from arrival to finish."""

    request_id: str
    client_id: str  # fairness key (OpenAI `user`); anonymous requests get their own id
    arrival_time: float
    num_prompt_tokens: int
    scheduled_time: float | None = None  # first step that included it
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # every output token, first included
    finished_time: float | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    swapped_bytes: int = 0
    swap_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens is {self.num_prompt_tokens}; it must be >= 0")

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to the first step that scheduled it (None if never scheduled)."""
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tbts(self) -> list[float]:
        """Gaps between consecutive output tokens (tokens emitted together give 0.0 gaps)."""
        times = self.token_times
        return [later - earlier for earlier, later in zip(times, times[1:])]

    @property
    def e2e_latency(self) -> float | None:
        """Seconds from arrival to finish."""
        return None if self.finished_time is None else self.finished_time - self.arrival_time


class Histogram:
    """Prometheus-style histogram: ``counts[i]`` observations <= ``buckets[i]``, last is +Inf."""

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or not all(math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"buckets {bounds} must be finite and strictly increasing "
                             "(+Inf is implicit)")
        self.buckets = tuple(bounds)
        self._per_bucket = [0] * (len(bounds) + 1)  # not cumulative; the last slot is > max bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation (``le`` is inclusive, as in Prometheus)."""
        self._per_bucket[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    @property
    def counts(self) -> list[int]:
        """Cumulative counts, one per bound plus +Inf (so ``counts[-1] == count``)."""
        return list(accumulate(self._per_bucket))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) by linear interpolation, as numpy's default method.

    Empty input gives NaN, so a summary of a run with no finished requests still renders.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} must be in [0, 100]")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 when all equal, 1/n when one has all.

    Empty or all-zero input gives 1.0: nobody received more service than anybody else, and 1.0
    is the limit of the index as equal allocations shrink to zero (the formula itself is 0/0).
    """
    if any(v < 0 for v in values):
        raise ValueError(f"jain_index needs non-negative service amounts, got {list(values)}")
    square_sum = sum(v * v for v in values)
    if square_sum == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * square_sum)


def _stats(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


class MetricsCollector:
    """Collects timelines and engine-wide counters; cheap to call every step.

    Unknown request ids in ``on_*`` calls are ignored (the request may have been dropped or
    evicted); no hook raises. Active timelines live until ``on_finished``; at most
    ``max_finished`` finished ones are kept, oldest dropped first. Counters never reset.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_finished: int = 100_000) -> None:
        if max_finished < 1:
            raise ValueError(f"max_finished is {max_finished}; keep at least 1 finished timeline")
        self.clock = clock
        # NOTE: the engine thread writes while the server thread renders; one uncontended lock
        # keeps a histogram's buckets and count consistent with each other.
        self._lock = threading.Lock()
        self._active: dict[str, RequestTimeline] = {}
        self._finished: deque[RequestTimeline] = deque(maxlen=max_finished)
        self._client_service: dict[str, dict[str, int]] = {}
        self._steps: deque[tuple[int, float]] = deque(maxlen=STEP_HISTORY)  # (tokens, seconds)
        self.requests_total: dict[str, int] = {}  # by finish reason
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preemptions_total = 0
        self.swap_bytes_total = 0
        self.swap_seconds_total = 0.0
        self.tokens_generated_total = 0
        self.prompt_tokens_total = 0
        self.steps_total = 0
        self.batched_tokens_total = 0
        self.last_step: dict[str, int] = {"running": 0, "waiting": 0, "swapped": 0}
        self.ttft_histogram = Histogram(TTFT_BUCKETS)
        self.tbt_histogram = Histogram(TBT_BUCKETS)
        self.e2e_histogram = Histogram(E2E_BUCKETS)

    # ---- hooks called by the engine -------------------------------------------------------
    def on_arrival(self, request_id: str, client_id: str, num_prompt_tokens: int,
                   now: float | None = None) -> None:
        """Start a timeline; a repeated arrival of an active id is ignored."""
        with self._lock:
            if request_id in self._active:
                return
            arrival = self.clock() if now is None else now
            self._active[request_id] = RequestTimeline(request_id, client_id, arrival,
                                                       max(0, num_prompt_tokens))
            self.prompt_tokens_total += max(0, num_prompt_tokens)

    def on_scheduled(self, request_id: str, now: float | None = None) -> None:
        """Mark the first step that included the request; later calls change nothing."""
        with self._lock:
            timeline = self._active.get(request_id)
            if timeline is not None and timeline.scheduled_time is None:
                timeline.scheduled_time = self.clock() if now is None else now

    def on_tokens(self, request_id: str, count: int = 1, now: float | None = None) -> None:
        """Record ``count`` output tokens emitted at ``now`` (TTFT and TBT are observed here)."""
        with self._lock:
            timeline = self._active.get(request_id)
            if timeline is None or count <= 0:
                return
            at = self.clock() if now is None else now
            if timeline.first_token_time is None:
                timeline.first_token_time = at
                self.ttft_histogram.observe(at - timeline.arrival_time)
            elif timeline.token_times:
                self.tbt_histogram.observe(at - timeline.token_times[-1])
            for _ in range(count - 1):  # tokens emitted together are 0 s apart
                self.tbt_histogram.observe(0.0)
            timeline.token_times.extend([at] * count)
            timeline.num_output_tokens += count
            self.tokens_generated_total += count

    def on_cached(self, request_id: str, num_tokens: int) -> None:
        """Set how many prompt tokens the prefix cache served (a later report replaces it)."""
        with self._lock:
            timeline = self._active.get(request_id)
            if timeline is not None:
                timeline.num_cached_tokens = num_tokens

    def on_preempted(self, request_id: str) -> None:
        """Count one preemption of the request."""
        with self._lock:
            timeline = self._active.get(request_id)
            if timeline is not None:
                timeline.num_preemptions += 1
                self.preemptions_total += 1

    def on_swap(self, request_id: str, num_bytes: int, seconds: float) -> None:
        """Add one swap (either direction) of the request's KV blocks."""
        with self._lock:
            timeline = self._active.get(request_id)
            if timeline is not None:
                timeline.swapped_bytes += num_bytes
                timeline.swap_seconds += seconds
                self.swap_bytes_total += num_bytes
                self.swap_seconds_total += seconds

    def on_finished(self, request_id: str, reason: str | Enum, now: float | None = None) -> None:
        """Close the timeline, count it under ``reason`` and observe its end-to-end latency."""
        with self._lock:
            timeline = self._active.pop(request_id, None)
            if timeline is None:
                return
            timeline.finished_time = self.clock() if now is None else now
            timeline.finish_reason = str(reason.value if isinstance(reason, Enum) else reason)
            self.requests_total[timeline.finish_reason] = (
                self.requests_total.get(timeline.finish_reason, 0) + 1)
            self.e2e_histogram.observe(timeline.finished_time - timeline.arrival_time)
            self._finished.append(timeline)

    def on_service(self, client_id: str, prompt_tokens: int, output_tokens: int) -> None:
        """Add tokens served to ``client_id`` (reporting only; fair scheduling keeps its own)."""
        with self._lock:
            served = self._client_service.setdefault(
                client_id, {"prompt_tokens": 0, "output_tokens": 0})
            served["prompt_tokens"] += prompt_tokens
            served["output_tokens"] += output_tokens

    def on_step(self, num_batched_tokens: int, num_running: int, num_waiting: int,
                num_swapped: int, step_seconds: float, now: float | None = None) -> None:
        """Record one engine step: its batch size in tokens, queue depths and duration.

        ``now`` is accepted so every hook has the same shape; tokens/s uses ``step_seconds``.
        """
        with self._lock:
            self.steps_total += 1
            self.batched_tokens_total += num_batched_tokens
            self.last_step = {"running": num_running, "waiting": num_waiting,
                              "swapped": num_swapped}
            self._steps.append((num_batched_tokens, step_seconds))

    def set_prefix_cache(self, queries: int, hits: int) -> None:
        """Set the prefix cache's cumulative query and hit counts (in tokens or blocks)."""
        with self._lock:
            self.prefix_cache_queries = queries
            self.prefix_cache_hits = hits

    # ---- readers --------------------------------------------------------------------------
    def get(self, request_id: str) -> RequestTimeline | None:
        """The timeline of an active request, or None."""
        return self._active.get(request_id)

    def finished_timelines(self) -> list[RequestTimeline]:
        """The kept finished timelines, oldest first."""
        with self._lock:
            return list(self._finished)

    def client_service(self) -> dict[str, dict[str, int]]:
        """Tokens served per client: ``{client: {"prompt_tokens": p, "output_tokens": o}}``."""
        with self._lock:
            return {client: dict(served) for client, served in self._client_service.items()}

    def recent_tokens_per_second(self) -> float:
        """Batched (prompt + output) tokens per second of step time over the last steps."""
        with self._lock:
            seconds = sum(s for _, s in self._steps)
            return sum(t for t, _ in self._steps) / seconds if seconds > 0 else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits over queries; 0.0 before the first query."""
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0

    def summary(self) -> dict:
        """Latency percentiles over kept finished requests, throughput, counters and fairness.

        Throughput is output tokens of the kept finished requests over the span from their
        first arrival to their last finish. Jain's index is over each client's prompt + output
        tokens served (from ``on_service``).
        """
        finished = self.finished_timelines()
        service = self.client_service()
        output_tokens = sum(t.num_output_tokens for t in finished)
        span = (max(t.finished_time for t in finished) - min(t.arrival_time for t in finished)
                if finished else 0.0)
        return {
            "num_finished": len(finished),
            "queue_time": _stats([t.queue_time for t in finished if t.queue_time is not None]),
            "ttft": _stats([t.ttft for t in finished if t.ttft is not None]),
            "tbt": _stats([gap for t in finished for gap in t.tbts]),
            "e2e_latency": _stats([t.e2e_latency for t in finished]),
            "output_tokens": output_tokens,
            "throughput_tokens_per_s": output_tokens / span if span > 0 else 0.0,
            "requests_total": dict(self.requests_total),
            "preemptions_total": self.preemptions_total,
            "swap_bytes_total": self.swap_bytes_total,
            "swap_seconds_total": self.swap_seconds_total,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "client_service": service,
            "jain_index": jain_index([s["prompt_tokens"] + s["output_tokens"]
                                      for s in service.values()]),
        }


# ---- Prometheus text exposition format 0.0.4 ------------------------------------------------
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GAUGE_HELP = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "num_requests_swapped": "Requests whose KV cache is swapped out.",
    "kv_cache_usage": "Fraction of KV cache blocks in use, by tier.",
    "prefix_cache_hit_rate": "Prefix cache hits over queries since start.",
}


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and newline, as the format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(float(value))


def _family(name: str, kind: str, help_text: str) -> list[str]:
    # Help texts are ours and hold no backslash or newline, so they need no escaping.
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _histogram_lines(name: str, help_text: str, histogram: Histogram) -> list[str]:
    lines = _family(name, "histogram", help_text)
    bounds = [_format_value(float(b)) for b in histogram.buckets] + ["+Inf"]
    for bound, cumulative in zip(bounds, histogram.counts):
        lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f"{name}_sum {_format_value(histogram.sum)}")
    lines.append(f"{name}_count {histogram.count}")
    return lines


def render_prometheus(collector: MetricsCollector, gauges: dict[str, float] | None = None,
                      prefix: str = "tierserve") -> str:
    """Render counters, latency histograms and ``gauges`` as Prometheus text (format 0.0.4).

    A gauge key is a metric name, optionally with labels already written out, e.g.
    ``kv_cache_usage{tier="gpu"}``; keys sharing a name share one HELP/TYPE header.
    """
    if not _METRIC_NAME.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} is not a valid metric name; use letters, digits, _")
    p = prefix + "_"
    c = collector
    lines: list[str] = []
    with c._lock:  # one consistent snapshot of counters and histograms
        lines += _family(p + "requests_total", "counter", "Finished requests by finish reason.")
        for status, count in sorted(c.requests_total.items()):
            lines.append(f'{p}requests_total{{status="{escape_label_value(status)}"}} {count}')
        counters = [
            ("prompt_tokens_total", "Prompt tokens received.", c.prompt_tokens_total),
            ("generation_tokens_total", "Output tokens generated.", c.tokens_generated_total),
            ("preemptions_total", "Requests preempted.", c.preemptions_total),
            ("swap_bytes_total", "KV cache bytes swapped between tiers.", c.swap_bytes_total),
            ("swap_seconds_total", "Seconds spent swapping KV cache.", c.swap_seconds_total),
            ("prefix_cache_queries_total", "Prefix cache queries.", c.prefix_cache_queries),
            ("prefix_cache_hits_total", "Prefix cache hits.", c.prefix_cache_hits),
        ]
        for name, help_text, value in counters:
            lines += _family(p + name, "counter", help_text)
            lines.append(f"{p}{name} {_format_value(value)}")
        lines += _histogram_lines(p + "time_to_first_token_seconds",
                                  "Time from arrival to first output token.", c.ttft_histogram)
        lines += _histogram_lines(p + "time_between_tokens_seconds",
                                  "Time between consecutive output tokens.", c.tbt_histogram)
        lines += _histogram_lines(p + "e2e_request_latency_seconds",
                                  "Time from arrival to finish.", c.e2e_histogram)
    by_name: dict[str, list[tuple[str, float]]] = {}
    for key, value in (gauges or {}).items():
        name, _, labels = key.partition("{")
        if not _METRIC_NAME.fullmatch(name) or (labels and not labels.endswith("}")):
            raise ValueError(f"gauge key {key!r} must be a metric name, optionally with "
                             'labels like kv_cache_usage{tier="gpu"}')
        by_name.setdefault(name, []).append(("{" + labels if labels else "", value))
    for name, samples in by_name.items():
        lines += _family(p + name, "gauge", _GAUGE_HELP.get(name, f"Engine gauge {name}."))
        lines += [f"{p}{name}{labels} {_format_value(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"
