"""Online serving benchmark: Poisson arrivals into the in-process engine, one run per policy.

Every policy serves the same seeded workload and the same arrival times, back to back in one
process, each on a freshly built engine. Reported per policy: TTFT and TBT percentiles from the
core's own timestamps, P99 end-to-end latency, output tokens/s and preemptions.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from tierserve.bench.harness import RunRecord, policy_variants, run_variants, token_space
from tierserve.bench.stats import poisson_arrivals
from tierserve.bench.workloads import BenchRequest, WorkloadSpec, describe, make_workload
from tierserve.config import EngineConfig

ONLINE_COLUMNS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p99_s",
                  "throughput_tokens_per_s", "preemptions")


@dataclass(slots=True)
class OnlineSpec:
    """Arrivals and policies of an online run; the workload's lengths are in ``workload``."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    request_rate: float = 1.0  # requests/s
    duration: float | None = 60.0  # seconds of arrivals (None: --num-requests decides)
    num_requests: int | None = None
    policies: tuple[str, ...] = ("sarathi", "fcfs-prefill-first")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("give at least one policy in --policies")


@dataclass(slots=True)
class OnlineResult:
    """The JSON document's config and results, plus raw samples for plotting."""

    config: dict
    results: dict[str, dict]
    samples: dict[str, dict[str, list[float]]]  # policy -> {"ttft": [...], "tbt": [...]}


def build_requests(spec: OnlineSpec, llm) -> list[BenchRequest]:
    """The seeded workload with Poisson arrival offsets (the same for every policy)."""
    arrivals = poisson_arrivals(spec.request_rate, np.random.default_rng([spec.seed, 1]),
                                duration=spec.duration, num_requests=spec.num_requests)
    workload = copy.copy(spec.workload)
    workload.num_requests = len(arrivals)
    requests = make_workload(workload, token_space(llm), encode=llm.tokenizer.encode)
    for request, arrival in zip(requests, arrivals):
        request.arrival_s = arrival
    return requests[: len(arrivals)]


def run_online(config: EngineConfig, spec: OnlineSpec, progress: bool = True) -> OnlineResult:
    """Serve the workload under each policy in ``spec.policies``, one after the other."""
    results: dict[str, dict] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    requests, records = run_variants(config, policy_variants(spec.policies),
                                     lambda llm: build_requests(spec, llm), progress)
    for policy, record in records.items():
        results[policy] = online_row(record)
        samples[policy] = {"ttft": [t.ttft for t in record.timelines if t.ttft is not None],
                           "tbt": [gap for t in record.timelines for gap in t.tbts]}
    long_threshold = spec.workload.long_prompt_len[0]
    info = describe(requests or [])
    info["num_long_prompts"] = sum(len(r.prompt_token_ids) >= long_threshold
                                   for r in requests or [])
    document_config = {"request_rate": spec.request_rate, "duration_s": spec.duration,
                       "num_requests": spec.num_requests, "seed": spec.seed,
                       "policies": list(spec.policies), "workload": asdict(spec.workload),
                       "requests": info, "engine": asdict(config)}
    return OnlineResult(document_config, results, samples)


def online_row(record: RunRecord) -> dict:
    """The per-policy numbers of an online run."""
    summary = record.summary
    return {
        "ttft_p50_s": summary["ttft"]["p50"], "ttft_p99_s": summary["ttft"]["p99"],
        "tbt_p50_s": summary["tbt"]["p50"], "tbt_p99_s": summary["tbt"]["p99"],
        "tbt_max_s": max((gap for t in record.timelines for gap in t.tbts), default=0.0),
        "e2e_p99_s": summary["e2e_latency"]["p99"],
        "throughput_tokens_per_s": summary["throughput_tokens_per_s"],
        "preemptions": record.preemptions,
        "swap_preemptions": record.swap_preemptions,
        "num_finished": summary["num_finished"],
        "output_tokens": summary["output_tokens"],
        "wall_s": record.wall_s,
        "num_steps": record.num_steps,
        "prefix_cache_hit_rate": summary["prefix_cache_hit_rate"],
        "clipped_requests": record.clipped,
    }
