"""`tierserve sim reproduce batchllm`: BatchLLM's planner against an LRU prefix cache, simulated.

BatchLLM (Zheng et al., arXiv 2412.03594) runs offline batches whose prompts share prefixes: a
global prefix tree instead of an LRU prefix cache (vLLM, SGLang), requests grouped and ordered by
it and by their decode ratio, memory-centric batching. It reports 1.1-2x the throughput of
vLLM and SGLang on A100.

Here the real ``BatchRunner`` (planner: tree walk, leaders, output-length history,
memory-centric admission) and the plain engine with its LRU prefix cache (every request
submitted at once in the batch's order, as ``LLM.generate`` does) run the batch workloads of
``tierserve bench batch`` (many-groups, nested, shared-prefix) on the roofline cost model:
LLaMA-3-8B on one A100-80GB, token budget 2048, with the device KV pool either what fits beside
the weights or a share of the batch's distinct prefix KV (so the LRU cache must evict).
Measured: prefill tokens computed (the token saving) and output tokens per simulated second.
Detokenization is not simulated (no text): the runner's output processor gets a tokenizer that
decodes every id to "".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierserve.batch.planner import prefill_optimum
from tierserve.bench.workloads import TokenSpace, WorkloadSpec, make_workload
from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig
from tierserve.request import SamplingParams
from tierserve.sim.run import build_engine, make_setup, run_pool

PAPER = "1.1-2x the throughput of vLLM and SGLang (A100)"
MODEL, HARDWARE = "llama-3-8b", "a100-80gb-sxm"


class SilentTokenizer:
    """Decodes every id to "": the simulator has tokens, not text."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


@dataclass(slots=True, frozen=True)
class BatchCase:
    workload: str
    pool_share: float | None  # None: the whole device pool
    num_requests: int = 512

    @property
    def name(self) -> str:
        pool = "full KV pool" if self.pool_share is None else f"pool {self.pool_share:g} of distinct prefix KV"
        return f"{self.workload}, {pool}"


def batchllm_cases() -> list[BatchCase]:
    return [BatchCase(workload, share) for workload in ("many-groups", "nested", "shared-prefix")
            for share in (None, 0.25)]


def _requests(case: BatchCase, vocab: int):
    spec = WorkloadSpec(name=case.workload, num_requests=case.num_requests, seed=0,
                        output_len=128, prefix_len=1024, num_prefixes=16)
    return make_workload(spec, TokenSpace(vocab, frozenset(range(16))))


def run_case(job: tuple[BatchCase, str]) -> dict:
    """One mode (planner | lru) on one case."""
    from tierserve.batch.runner import BatchRunner
    from tierserve.engine.output import OutputProcessor

    case, mode = job
    probe = make_setup(_engine(), 8192, MODEL, HARDWARE)
    requests = _requests(case, probe.model.vocab_size)
    prompts = [r.prompt_token_ids for r in requests]
    block = probe.engine.cache.block_size
    optimum = prefill_optimum(prompts, block)
    capacity = probe.kv_capacity_tokens
    if case.pool_share is not None:
        longest = max(len(p) + r.max_tokens for p, r in zip(prompts, requests))
        capacity = max(math.ceil(case.pool_share * optimum), 2 * longest)
    setup = make_setup(_engine(), 8192, MODEL, HARDWARE, kv_capacity_tokens=capacity)
    core, executor, clock = build_engine(setup)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
              for r in requests]
    if mode == "planner":
        BatchRunner(core, OutputProcessor(SilentTokenizer())).run(
            [(None, p) for p in prompts], params)
    else:
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            core.add_request(core.make_request(f"lru-{index}", prompt, param, arrival_time=0.0))
        while core.has_unfinished():
            core.step()
    computed = core.scheduler.num_prompt_tokens_computed
    output = sum(r.max_tokens for r in requests)
    prompt_tokens = sum(map(len, prompts))
    return {"case": case.name, "mode": mode, "prefill_tokens": computed,
            "prefill_optimum": optimum, "prompt_tokens": prompt_tokens,
            "saving_vs_optimum": (prompt_tokens - computed) / (prompt_tokens - optimum)
            if prompt_tokens > optimum else 1.0,
            "output_tokens_per_s": output / clock.now, "simulated_s": clock.now,
            "kv_capacity_tokens": capacity, "preemptions": core.scheduler.num_preemptions,
            "num_steps": executor.num_steps}


def _engine() -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=16, enable_prefix_caching=True, swap_space=0,
                          save_evicted_to_host=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=256,
                                  policy="sarathi", preemption_mode="recompute"))


def reproduce_batchllm(workers: int = 2, progress: bool = True) -> dict:
    jobs = [(case, mode) for case in batchllm_cases() for mode in ("planner", "lru")]
    cases: dict[str, dict] = {}
    for result in run_pool(run_case, jobs, workers, progress and (
            lambda r: f"{r['case']}: {r['mode']} computed {r['prefill_tokens']:,} prompt "
            f"tokens, {r['output_tokens_per_s']:.0f} output tok/s")):
        cases.setdefault(result["case"], {})[result["mode"]] = result
    for by_mode in cases.values():
        ours, base = by_mode["planner"], by_mode["lru"]
        by_mode["throughput_ratio"] = ours["output_tokens_per_s"] / base["output_tokens_per_s"]
        by_mode["prefill_ratio"] = base["prefill_tokens"] / max(1, ours["prefill_tokens"])
    return {"cases": cases, "paper": PAPER, "model": MODEL, "hardware": HARDWARE}


def markdown_table(report: dict) -> str:
    lines = ["| case | prefill tokens planner / LRU (optimum) | throughput planner / LRU "
             "(output tok/s) | ratio |", "| --- | --- | --- | --- |"]
    for case, by_mode in report["cases"].items():
        ours, base = by_mode["planner"], by_mode["lru"]
        lines.append(f"| {case} | {ours['prefill_tokens']:,} / {base['prefill_tokens']:,} "
                     f"({ours['prefill_optimum']:,}) | {ours['output_tokens_per_s']:.0f} / "
                     f"{base['output_tokens_per_s']:.0f} | {by_mode['throughput_ratio']:.2f}x |")
    return "\n".join(lines)


def plot_batchllm(report: dict, path: str) -> None:
    """Prefill tokens computed and output throughput, planner vs LRU, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["cases"])
    fig, (tokens_axis, speed_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for axis, key, label in ((tokens_axis, "prefill_tokens", "prompt tokens computed"),
                             (speed_axis, "output_tokens_per_s", "output tokens / s")):
        for offset, mode in ((-0.2, "planner"), (0.2, "lru")):
            axis.bar([i + offset for i in x], [report["cases"][n][mode][key] for n in names],
                     0.4, label="BatchLLM planner" if mode == "planner" else "LRU prefix cache")
        axis.set_xticks(list(x), [n.replace(", pool 0.25 of distinct prefix KV", "\n1/4 pool")
                                  .replace(", full KV pool", "\nfull pool") for n in names],
                        fontsize=8)
        axis.set_ylabel(label)
    tokens_axis.plot([i - 0.2 for i in x], [report["cases"][n]["planner"]["prefill_optimum"]
                                            for n in names], "k_", markersize=20,
                     label="optimum (distinct prefix blocks)")
    tokens_axis.legend(fontsize=7)
    fig.suptitle(f"BatchLLM, simulated: {report['model']} on {report['hardware']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
