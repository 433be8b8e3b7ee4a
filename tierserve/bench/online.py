"""Online serving benchmark: Poisson arrivals into the in-process engine, one run per policy,
or into running servers over HTTP (``--url``), one run per server.

Every policy (or server) serves the same seeded workload and the same arrival times, one after
the other; in process each policy gets a freshly built engine. Reported per run: TTFT and TBT
percentiles (in process from the core's own timestamps, over HTTP from the client's, see
``tierserve.bench.remote``), P99 end-to-end latency, output tokens/s and preemptions.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from tierserve.bench.harness import (
    RunRecord,
    local_prompt_space,
    policy_variants,
    run_variants,
    token_space,
)
from tierserve.bench.remote import ServerClient, Target, drive_remote, host_port
from tierserve.bench.stats import poisson_arrivals
from tierserve.bench.workloads import (
    BenchRequest,
    TokenSpace,
    WorkloadSpec,
    describe,
    make_workload,
)
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
    errors: dict[str, list[str]] = field(default_factory=dict)  # run -> failed requests


def build_requests(spec: OnlineSpec, space: TokenSpace, encode) -> list[BenchRequest]:
    """The seeded workload with Poisson arrival offsets (the same for every policy); prompts
    drawn from ``space``, a dataset's text through ``encode``."""
    arrivals = poisson_arrivals(spec.request_rate, np.random.default_rng([spec.seed, 1]),
                                duration=spec.duration, num_requests=spec.num_requests)
    workload = copy.copy(spec.workload)
    workload.num_requests = len(arrivals)
    requests = make_workload(workload, space, encode=encode)
    for request, arrival in zip(requests, arrivals):
        request.arrival_s = arrival
    return requests[: len(arrivals)]


def run_online(config: EngineConfig, spec: OnlineSpec, progress: bool = True) -> OnlineResult:
    """Serve the workload under each policy in ``spec.policies``, one after the other."""
    requests, records = run_variants(
        config, policy_variants(spec.policies),
        lambda llm: build_requests(spec, token_space(llm), llm.tokenizer.encode), progress)
    document_config = {**_spec_config(spec, requests), "policies": list(spec.policies),
                       "engine": asdict(config)}
    return _result(document_config, records)


def run_online_remote(targets: list[Target], spec: OnlineSpec, model_path,
                      api_key: str | None = None, progress: bool = True) -> OnlineResult:
    """Send the workload to each server in ``targets``, one after the other. ``model_path`` is
    the model the servers run, read locally for its tokenizer (prompts are token ids)."""
    tokenizer, space = local_prompt_space(model_path)
    requests = build_requests(spec, space, tokenizer.encode)
    records, served = {}, {}
    for target in targets:
        client = ServerClient(target.url, api_key)
        model, max_model_len = client.served_model()
        served[target.name] = {"host": host_port(target.url), "model": model}
        records[target.name] = drive_remote(client, requests, model, max_model_len,
                                            progress=target.name if progress else None)
    document_config = {**_spec_config(spec, requests), "servers": served,
                       "timing": "client side: TTFT to the first streamed chunk with text, TBT "
                       "between chunks with text, output tokens from usage"}
    return _result(document_config, records)


def _spec_config(spec: OnlineSpec, requests: list[BenchRequest]) -> dict:
    long_threshold = spec.workload.long_prompt_len[0]
    info = describe(requests)
    info["num_long_prompts"] = sum(len(r.prompt_token_ids) >= long_threshold for r in requests)
    return {"request_rate": spec.request_rate, "duration_s": spec.duration,
            "num_requests": spec.num_requests, "seed": spec.seed,
            "workload": asdict(spec.workload), "requests": info}


def _result(document_config: dict, records: dict[str, RunRecord]) -> OnlineResult:
    results: dict[str, dict] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    for name, record in records.items():
        results[name] = online_row(record)
        samples[name] = {"ttft": [t.ttft for t in record.timelines if t.ttft is not None],
                         "tbt": [gap for t in record.timelines for gap in t.tbts]}
    return OnlineResult(document_config, results, samples,
                        {name: record.errors for name, record in records.items()})


def online_row(record: RunRecord) -> dict:
    """The per-policy numbers of an online run."""
    summary = record.summary
    return {
        "ttft_p50_s": summary["ttft"]["p50"], "ttft_p99_s": summary["ttft"]["p99"],
        "ttft_mean_s": summary["ttft"]["mean"],
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
        "failed_requests": len(record.errors),
        "server_ttft_mean_s": record.server_ttft_mean_s,
    }
