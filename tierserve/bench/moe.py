"""``tierserve bench moe``: expert offloading policies side by side on one MoE model and one
seeded text workload, all requests at once at a fixed concurrency.

First every expert resident (the reference tokens, tok/s and the bench prompts' true routes,
which the oracle replays), then each policy with ``--expert-cache`` slots and the disk (or host)
tier, the page cache of the expert files dropped before each run. Per policy: hit ratio (per
layer too), prefetch precision, the predictor's precision and recall on these prompts, distinct
experts per step, bytes per tier per output token, stall seconds, output tok/s, resident expert
bytes, and whether the tokens equal all-resident.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tierserve.request import SamplingParams

MOE_COLUMNS = ("hit_ratio", "prefetch_precision", "distinct_experts_per_step", "stall_s",
               "disk_mib_per_token", "output_tokens_per_s", "resident_expert_mib",
               "same_tokens")


@dataclass(slots=True)
class MoeSpec:
    model: str
    policies: tuple[str, ...] = ("lru", "static", "lookahead", "expertflow", "oracle",
                                 "expertflow+regroup")
    expert_cache: str = "25%"
    num_requests: int = 32
    concurrency: int = 32
    seed: int = 1
    scale: float = 0.25
    train_trace: str | None = None  # static's frequencies, the predictor's training
    predictor: str | None = None
    host_format: str = "none"
    threads: int | None = None
    replay_routes: str | None = None  # force these traces' routes (a random-weight model)
    victim_buffer: str = "25%"  # experts in the buffer of the "+victim" runs
    host_compute: int = 4  # the "+cpu" runs' --expert-host-compute (rows)


@dataclass(slots=True)
class MoeResult:
    config: dict
    results: dict[str, dict] = field(default_factory=dict)
    per_layer_hits: dict[str, list[float]] = field(default_factory=dict)


VARIANTS = ("regroup", "pin", "victim", "window0", "cpu")  # "+name" suffixes of a policy


def run_moe(spec: MoeSpec, progress: bool = True) -> MoeResult:
    from tierserve.engine.llm import LLM
    from tierserve.experts.routes import read_traces, write_traces
    from tierserve.experts.trace import RouteRecorder, RouteReplay, text_requests

    for name in spec.policies:
        unknown = set(name.split("+")[1:]) - set(VARIANTS)
        if unknown:
            raise ValueError(f"{name}: unknown variant(s) {', '.join(sorted(unknown))}; a policy "
                             f"takes +{', +'.join(VARIANTS)}")
        if "cpu" in name.split("+")[1:] and spec.host_format == "none":
            raise ValueError(f"{name}: +cpu runs missed experts on the host tier's weights; "
                             "give --expert-host-format float|q8|q4")
    work = Path(tempfile.mkdtemp(prefix="tierserve-bench-moe-"))
    base = dict(swap_space=0, max_num_seqs=spec.concurrency, num_threads=spec.threads)
    replay = read_traces(spec.replay_routes) if spec.replay_routes else None
    llm = LLM(spec.model, **base)
    if replay:
        RouteReplay(llm.engine.runner, replay)
    requests = text_requests(llm.tokenizer, spec.num_requests, spec.seed, spec.scale)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in requests]
    recorder = RouteRecorder(llm.engine.runner, lookahead=False)  # this run is timed
    distinct: list[int] = []
    llm.engine.runner.step_hooks.append(lambda plan: distinct.append(0))
    for layer in llm.engine.runner.model.layers:  # count each step's distinct experts
        block = layer.mlp
        if getattr(block, "on_route", None) is not None:
            record = block.on_route

            def counting(index, ids, record=record):
                record(index, ids)
                distinct[-1] += len(set(ids.flatten().tolist()))
            block.on_route = counting
    arch = llm.engine.arch
    num_moe_layers = sum(arch.is_moe_layer(i) for i in range(arch.num_layers))
    total_experts = arch.num_experts * num_moe_layers
    outputs, reference, seconds = _timed_generate(llm, prompts, params, progress)
    traces = [recorder.trace(o.request_id, p, t)
              for o, (p, _), t in zip(outputs, requests, reference)]
    llm.engine.runner.close()
    oracle_trace = work / "bench-trace.jsonl"
    write_traces(oracle_trace, traces)
    num_output = sum(len(t) for t in reference)
    from tierserve.experts.build import expert_bytes

    one_expert = expert_bytes(arch, llm.engine.runner.model.dtype)
    slots = _slots(spec.expert_cache, total_experts)
    result = MoeResult({"model": spec.model, "replay_routes": spec.replay_routes, "num_requests": spec.num_requests,
                        "concurrency": spec.concurrency, "seed": spec.seed, "scale": spec.scale,
                        "expert_cache_slots": slots, "total_experts": total_experts,
                        "expert_bytes": one_expert, "host_format": spec.host_format,
                        "victim_buffer": spec.victim_buffer,
                        "output_tokens": num_output})
    result.results["all-resident"] = {
        "hit_ratio": 1.0, "distinct_experts_per_step": _mean(distinct) / num_moe_layers,
        "output_tokens_per_s": num_output / seconds, "stall_s": 0.0, "disk_mib_per_token": 0.0,
        "resident_expert_mib": total_experts * one_expert / 2**20, "same_tokens": True}
    # A quantized host tier changes the experts' weights: its runs are checked against every
    # expert loaded once from that tier into fast slots (a row of its own).
    if spec.host_format in ("q8", "q4"):
        name = f"all-resident-{spec.host_format}"
        llm = LLM(spec.model, **base, expert_cache=str(total_experts),
                  expert_host_format=spec.host_format)
        if replay:
            RouteReplay(llm.engine.runner, replay)
        llm.engine.runner.experts.settle()
        _, reference, seconds = _timed_generate(llm, prompts, params, progress)
        llm.engine.runner.close()
        result.results[name] = {**result.results["all-resident"], "same_tokens": True,
                                "output_tokens_per_s": num_output / seconds}
    result.config["tokens_checked_against"] = (
        f"every expert resident from the {spec.host_format} host tier"
        if spec.host_format in ("q8", "q4") else "all-resident")
    for name in spec.policies:
        policy, *extras = name.split("+")
        options = dict(base, expert_cache=str(slots), expert_policy=policy,
                       expert_host_format=spec.host_format)
        if "regroup" in extras:
            options["scheduling_policy"] = "expert-grouped"
        if "pin" in extras:  # LSM-GNN's hybrid: half the slots pinned from the training trace
            options.update(expert_pin_fraction=0.5, expert_trace=spec.train_trace)
        if "victim" in extras:
            options["expert_victim_buffer"] = str(_slots(spec.victim_buffer, total_experts))
        if "window0" in extras:
            options["expert_prefetch_window"] = 0
        if "cpu" in extras:
            options["expert_host_compute"] = spec.host_compute
        if policy == "static":
            options["expert_trace"] = spec.train_trace
        if policy == "oracle":
            options["expert_trace"] = str(oracle_trace)
        if policy == "expertflow":
            options["expert_predictor"] = spec.predictor
        llm = LLM(spec.model, **options)  # drops the expert files' page cache
        if replay:
            RouteReplay(llm.engine.runner, replay)
        offload = llm.engine.runner.experts
        _, tokens, seconds = _timed_generate(llm, prompts, params, progress)
        offload.check_invariants()
        counters, stats = offload.cache.counters, offload.stats
        row = {
            "hit_ratio": counters.hit_ratio,
            "late_ratio": sum(c.late for c in counters.layers.values()) / max(1, counters.requests),
            "prefetch_precision": (counters.prefetches_used / counters.prefetches
                                   if counters.prefetches else None),
            "distinct_experts_per_step": _mean(stats.distinct_per_step) / num_moe_layers,
            "stall_s": stats.stall_seconds,
            "disk_mib_per_token": stats.bytes_loaded.get("disk", 0) / 2**20 / max(1, num_output),
            "host_mib_per_token": stats.bytes_loaded.get("host", 0) / 2**20 / max(1, num_output),
            "victim_mib_per_token": (stats.bytes_loaded.get("victim", 0) / 2**20
                                     / max(1, num_output)),
            "victim_hit_ratio": offload.victims.hit_ratio if offload.victims else None,
            "output_tokens_per_s": num_output / seconds,
            "resident_expert_mib": offload.resident_bytes() / 2**20,
            "same_tokens": tokens == reference,
            "loads": counters.loads, "evictions": counters.evictions,
            "host_runs": stats.host_runs,
        }
        if policy == "expertflow" and offload.predictor is not None:
            row.update(_predictor_quality(offload.predictor, traces, arch.num_experts))
        result.results[name] = row
        result.per_layer_hits[name] = [counters.layers[i].hits / max(1, counters.layers[i].requests)
                                       for i in sorted(counters.layers)]
        llm.engine.runner.close()
    return result


def _predictor_quality(predictor, traces, num_experts: int) -> dict:
    """Precision and recall of the predicted hot experts on the bench prompts."""
    import torch

    from tierserve.experts.predictor import hot_precision_recall, target_shares

    layers = predictor.spec.layers
    truth = torch.stack([target_shares(t, layers, num_experts) for t in traces])
    with torch.inference_mode():
        guess = predictor([t.prompt for t in traces]).exp()
    precision, recall = hot_precision_recall(guess, truth, num_experts)
    return {"predictor_precision": precision, "predictor_recall": recall}


def _timed_generate(llm, prompts, params, progress: bool):
    """(outputs, each output's token ids, wall seconds) of one generate over ``prompts``."""
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    seconds = time.perf_counter() - started
    return outputs, [list(o.outputs[0].token_ids) for o in outputs], seconds


def _slots(cache: str, total: int) -> int:
    cache = cache.strip()
    if cache.endswith("%"):
        return max(1, round(total * float(cache[:-1]) / 100))
    return int(cache)


def _mean(values) -> float:
    """The mean over steps that ran anything."""
    values = [v for v in values if v]
    return sum(values) / len(values) if values else 0.0


def make_mixtral_like(out: str | Path, like: str, hidden: int = 512, expert_ffn: int = 256,
                      seed: int = 0) -> Path:
    """A random-weight Mixtral-shaped folder with the layers, experts, top-k and tokenizer of
    MoE folder ``like`` (its routes replayed onto it with ``replay_routes``): expert sizes of a
    real model at a size this machine runs (defaults: 1.5 MiB per expert in float32)."""
    import shutil

    import torch
    import transformers

    from tierserve.model.loader_hf import hf_arch_config

    arch = hf_arch_config(Path(like))
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=arch.vocab_size, hidden_size=hidden, intermediate_size=expert_ffn,
        num_hidden_layers=arch.num_layers, num_attention_heads=8, num_key_value_heads=2,
        num_local_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_tok,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=arch.bos_token_id, eos_token_id=list(arch.eos_token_ids)[:1] or None)
    model = transformers.MixtralForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(like) / name).is_file():
            shutil.copy(Path(like) / name, out / name)
    return out
