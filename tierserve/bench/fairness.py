"""Fairness benchmark: one heavy client floods the engine while light clients send now and then.

Per policy: P99 TTFT of the light and of the heavy client's requests, Jain's index over the
clients' service, total output tokens/s and preemptions. Jain's index is taken over tokens
served (prompt + output) from the start to the last light arrival, the window in which every
client has work queued; over the whole run it would only reflect how much each client asked for.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from tierserve.bench.harness import RunRecord, policy_variants, run_variants, token_space
from tierserve.bench.stats import cumulative_service, latency_stats, service_until, windowed_jain
from tierserve.bench.workloads import BenchRequest, TokenSpace, WorkloadSpec, make_workload
from tierserve.config import EngineConfig
from tierserve.metrics import jain_index

FAIRNESS_COLUMNS = ("light_ttft_p50_s", "light_ttft_p99_s", "heavy_ttft_p99_s", "jain_index",
                    "throughput_tokens_per_s", "preemptions", "swap_preemptions")
HEAVY = "heavy"


@dataclass(slots=True)
class FairnessSpec:
    """The heavy flood, the light clients, and the policies to compare."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)  # lengths of every request
    heavy_requests: int = 32
    heavy_rate: float | None = None  # requests/s; None: the whole flood arrives at t=0
    light_clients: int = 3
    light_rate: float = 0.1  # requests/s per light client
    duration: float = 30.0  # seconds over which light clients send
    policies: tuple[str, ...] = ("fair", "sarathi")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heavy_requests < 1 or self.light_clients < 1:
            raise ValueError("the fairness benchmark needs a heavy client and >= 1 light client")
        if self.light_rate <= 0 or self.duration <= 0:
            raise ValueError("--light-rate and --duration must be positive")


@dataclass(slots=True)
class FairnessResult:
    config: dict
    results: dict[str, dict]
    service: dict[str, dict[str, tuple[list[float], list[int]]]]  # policy -> client -> series


def build_requests(spec: FairnessSpec, tokens: TokenSpace) -> list[BenchRequest]:
    """The heavy flood then each light client's Poisson stream, all seeded by ``spec.seed``."""
    heavy = _lengths(spec, tokens, spec.heavy_requests, [spec.seed, 2])
    rng = np.random.default_rng([spec.seed, 3])
    gaps = (rng.exponential(1.0 / spec.heavy_rate, size=len(heavy)) if spec.heavy_rate
            else np.zeros(len(heavy)))
    for request, arrival in zip(heavy, np.cumsum(gaps)):
        request.client_id, request.arrival_s = HEAVY, float(arrival)
    requests = heavy
    for client in range(spec.light_clients):
        rng = np.random.default_rng([spec.seed, 4, client])
        arrivals, now = [], float(rng.exponential(1.0 / spec.light_rate))
        while now <= spec.duration:
            arrivals.append(now)
            now += float(rng.exponential(1.0 / spec.light_rate))
        light = _lengths(spec, tokens, len(arrivals), [spec.seed, 5, client])
        for request, arrival in zip(light, arrivals):
            request.client_id, request.arrival_s = f"light-{client}", arrival
        requests += light
    return requests


def _lengths(spec: FairnessSpec, tokens: TokenSpace, count: int, seed: list[int]
             ) -> list[BenchRequest]:
    workload = copy.copy(spec.workload)
    workload.num_requests, workload.seed = count, int(
        np.random.SeedSequence(seed).generate_state(1)[0])
    return make_workload(workload, tokens) if count else []


def run_fairness(config: EngineConfig, spec: FairnessSpec, progress: bool = True
                 ) -> FairnessResult:
    """Serve the same flood and light streams under each policy in ``spec.policies``."""
    results: dict[str, dict] = {}
    service: dict[str, dict] = {}
    requests, records = run_variants(config, policy_variants(spec.policies),
                                     lambda llm: build_requests(spec, token_space(llm)), progress)
    for policy, record in records.items():
        last_light = max(r.arrival_s or 0.0 for r in requests if r.client_id != HEAVY)
        results[policy] = fairness_row(record, record.start + last_light)
        service[policy] = cumulative_service(record.timelines, record.start)
    light = [r for r in requests or [] if r.client_id != HEAVY]
    document_config = {
        "heavy_requests": spec.heavy_requests, "heavy_rate": spec.heavy_rate,
        "light_clients": spec.light_clients, "light_rate_per_client": spec.light_rate,
        "duration_s": spec.duration, "num_light_requests": len(light), "seed": spec.seed,
        "policies": list(spec.policies), "workload": asdict(spec.workload),
        "engine": asdict(config)}
    return FairnessResult(document_config, results, service)


def fairness_row(record: RunRecord, window_end: float) -> dict:
    """Per-policy numbers; ``window_end`` (monotonic) closes the Jain's index window."""
    heavy = [t for t in record.timelines if t.client_id == HEAVY]
    light = [t for t in record.timelines if t.client_id != HEAVY]
    light_stats, heavy_stats = latency_stats(light), latency_stats(heavy)
    clients = sorted({t.client_id for t in record.timelines})
    served = service_until(record.timelines, clients, window_end)
    total = {c: sum(t.num_prompt_tokens + t.num_output_tokens for t in record.timelines
                    if t.client_id == c) for c in clients}
    return {
        "light_ttft_p50_s": light_stats["ttft_p50_s"],
        "light_ttft_p99_s": light_stats["ttft_p99_s"],
        "light_e2e_p99_s": light_stats["e2e_p99_s"],
        "heavy_ttft_p50_s": heavy_stats["ttft_p50_s"],
        "heavy_ttft_p99_s": heavy_stats["ttft_p99_s"],
        "jain_index": windowed_jain(record.timelines, clients, window_end),
        "jain_index_whole_run": jain_index(list(total.values())),
        "service_in_window": served,
        "throughput_tokens_per_s": record.summary["throughput_tokens_per_s"],
        "preemptions": record.preemptions,
        "swap_preemptions": record.swap_preemptions,
        "num_finished": record.summary["num_finished"],
        "wall_s": record.wall_s,
    }
