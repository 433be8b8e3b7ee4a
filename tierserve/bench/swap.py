"""Swap benchmark (FastSwitch's block-group figure): one preemption-heavy workload, swapped.

The same requests run with a small device pool and ``preemption_mode="swap"``, once per block
group size (default 8 and 0 = plain LRU allocation). Reported per size: copies per swap, bytes
per copy, total seconds of swap copies, output tokens/s; and whether greedy outputs are identical
across sizes (block placement must never change what the model computes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tierserve.bench.harness import RunRecord, run_variants, token_space
from tierserve.bench.stats import mean
from tierserve.bench.workloads import WorkloadSpec, describe, make_workload
from tierserve.config import EngineConfig

SWAP_COLUMNS = ("swap_outs", "swap_ins", "copies_per_swap_mean", "blocks_per_swap_mean",
                "bytes_per_copy_mean", "swap_seconds_total", "output_tokens_per_s")


@dataclass(slots=True)
class SwapSpec:
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(
        name="random", num_requests=24, input_len=96, output_len=160))
    group_sizes: tuple[int, ...] = (8, 0)

    def __post_init__(self) -> None:
        if not self.group_sizes or any(size < 0 for size in self.group_sizes):
            raise ValueError("--group-sizes takes block group sizes >= 0, e.g. 8,0")


@dataclass(slots=True)
class SwapResult:
    config: dict
    results: dict[str, dict]
    outputs_identical: bool


def variant_name(group_size: int) -> str:
    return f"block_group_size={group_size}"


def run_swap(config: EngineConfig, spec: SwapSpec, progress: bool = True) -> SwapResult:
    """Serve the workload (all at once) under each block group size with swap preemption."""
    results: dict[str, dict] = {}
    outputs: dict[str, dict[str, list[int]]] = {}

    def swap_with_groups(group_size: int):
        def adjust(variant: EngineConfig) -> None:
            variant.cache.block_group_size = group_size
            variant.scheduler.preemption_mode = "swap"

        return adjust

    requests, records = run_variants(
        config, {variant_name(g): swap_with_groups(g) for g in spec.group_sizes},
        lambda llm: make_workload(spec.workload, token_space(llm), encode=llm.tokenizer.encode),
        progress)
    for name, record in records.items():
        results[name] = swap_row(record)
        outputs[name] = record.outputs
    identical = all(o == next(iter(outputs.values())) for o in outputs.values())
    document_config = {"group_sizes": list(spec.group_sizes), "workload": asdict(spec.workload),
                       "requests": describe(requests or []), "engine": asdict(config),
                       "preemption_mode": "swap"}
    return SwapResult(document_config, results, identical)


def swap_row(record: RunRecord) -> dict:
    """Per block group size: what was copied, how, and how long it took."""
    moves = [s for s in record.swaps if s.key.startswith(("out-", "in-"))]
    copies = sum(s.num_copies for s in moves)
    swapped_bytes = sum(s.bytes for s in moves)
    return {
        "swap_outs": sum(s.key.startswith("out-") for s in moves),
        "swap_ins": sum(s.key.startswith("in-") for s in moves),
        "copies_per_swap_mean": mean([s.num_copies for s in moves]),
        "blocks_per_swap_mean": mean([s.num_blocks for s in moves]),
        "bytes_per_copy_mean": swapped_bytes / copies if copies else float("nan"),
        "swap_seconds_total": sum(s.seconds for s in moves),
        "swap_bytes_total": swapped_bytes,
        "victim_saves": sum(s.key.startswith("victim-") for s in record.swaps),
        "output_tokens_per_s": record.output_tokens / record.wall_s if record.wall_s else 0.0,
        "preemptions": record.preemptions,
        "swap_preemptions": record.swap_preemptions,
        "decided_copies_per_swap_mean": mean(record.copies_per_swap),
        "num_finished": record.summary["num_finished"],
        "wall_s": record.wall_s,
    }
