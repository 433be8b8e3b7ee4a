"""Benchmark statistics beyond tierserve.metrics: Poisson arrivals, CDF points, per-client service.

Pure Python and numpy; percentiles come from tierserve.metrics so every number agrees with the
server's /metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tierserve.metrics import RequestTimeline, jain_index, percentile


def poisson_arrivals(rate: float, rng: np.random.Generator, *, duration: float | None = None,
                     num_requests: int | None = None) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of ``rate`` requests/s: exponential gaps
    of mean ``1 / rate``. Stops after ``num_requests`` arrivals or at ``duration`` seconds,
    whichever comes first (give at least one). ``rate`` = inf puts every arrival at 0.
    """
    if duration is None and num_requests is None:
        raise ValueError("give --duration or --num-requests (or both)")
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {rate}")
    if rate == float("inf"):
        if num_requests is None:
            raise ValueError("an infinite --request-rate needs --num-requests")
        return [0.0] * num_requests
    arrivals: list[float] = []
    now = 0.0
    while num_requests is None or len(arrivals) < num_requests:
        now += float(rng.exponential(1.0 / rate))
        if duration is not None and now > duration:
            break
        arrivals.append(now)
    return arrivals


def cdf_points(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """(sorted values, fraction of values <= each), for a step plot of the empirical CDF."""
    ordered = sorted(values)
    count = len(ordered)
    return ordered, [(i + 1) / count for i in range(count)]


def latency_stats(timelines: Sequence[RequestTimeline]) -> dict[str, float]:
    """P50/P99 of TTFT and TBT, P99 of end-to-end latency, over finished timelines (seconds)."""
    ttfts = [t.ttft for t in timelines if t.ttft is not None]
    tbts = [gap for t in timelines for gap in t.tbts]
    e2es = [t.e2e_latency for t in timelines if t.e2e_latency is not None]
    return {
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "tbt_p50_s": percentile(tbts, 50), "tbt_p99_s": percentile(tbts, 99),
        "e2e_p99_s": percentile(e2es, 99),
    }


def service_events(timeline: RequestTimeline) -> list[tuple[float, int]]:
    """(time, tokens) served to one request: its prompt counted when the first token came out
    (the prompt was computed by then), then one token at each output token's time."""
    if timeline.first_token_time is None:
        return []
    return [(timeline.first_token_time, timeline.num_prompt_tokens)] + [
        (at, 1) for at in timeline.token_times]


def cumulative_service(timelines: Sequence[RequestTimeline], start: float
                       ) -> dict[str, tuple[list[float], list[int]]]:
    """Per client: (seconds since ``start``, cumulative prompt + output tokens served)."""
    events: dict[str, list[tuple[float, int]]] = {}
    for timeline in timelines:
        events.setdefault(timeline.client_id, []).extend(service_events(timeline))
    series = {}
    for client, client_events in sorted(events.items()):
        client_events.sort(key=lambda event: event[0])  # stable: a prompt before its tokens
        times, totals, total = [], [], 0
        for at, tokens in client_events:
            total += tokens
            times.append(at - start)
            totals.append(total)
        series[client] = (times, totals)
    return series


def service_until(timelines: Sequence[RequestTimeline], clients: Iterable[str],
                  until: float) -> dict[str, int]:
    """Tokens served to each of ``clients`` at or before monotonic time ``until``."""
    served = dict.fromkeys(clients, 0)
    for timeline in timelines:
        if timeline.client_id in served:
            served[timeline.client_id] += sum(
                tokens for at, tokens in service_events(timeline) if at <= until)
    return served


def windowed_jain(timelines: Sequence[RequestTimeline], clients: Iterable[str],
                  until: float) -> float:
    """Jain's index over the clients' service up to ``until``."""
    return jain_index(list(service_until(timelines, clients, until).values()))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
