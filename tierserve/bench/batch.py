"""`tierserve bench batch`: the same offline batch three ways (BatchLLM planner, FCFS with LRU
prefix caching, no prefix caching): wall time, prefill tokens computed against the optimum (the
distinct blocks of the batch's prefix tree), output tokens/s, peak KV blocks."""

from __future__ import annotations

import copy
import math
import time

from tierserve.batch.planner import prefill_optimum
from tierserve.bench.harness import open_engine, token_space
from tierserve.bench.workloads import WorkloadSpec, make_workload
from tierserve.config import EngineConfig
from tierserve.request import SamplingParams

MODES = ("planner", "lru", "no-cache")
# Also runnable: the planner reserving every request's declared max_tokens at admission instead
# of its template's history (only differs with --declared-max-tokens).
ALL_MODES = MODES + ("planner-max-tokens",)


def run_batch_bench(config: EngineConfig, spec: WorkloadSpec, modes=MODES,
                    progress: bool = True, pool_share: float | None = None,
                    victim_buffer: bool = False, declared_max_tokens: int | None = None) -> dict:
    """Results per mode, and whether every mode produced the same greedy tokens.

    ``pool_share`` sizes the KV pool to that share of the batch's distinct prefix-tree blocks
    (what the optimum computes), at least two of the longest request. Evicted prefix blocks then
    have nowhere else to go unless ``victim_buffer``: the host tier's copy of evicted blocks is
    off, as in vLLM's LRU prefix cache, so the pool is the whole cache.

    ``declared_max_tokens``: the planner is told every request may produce this many tokens,
    while each really stops at its drawn length (as if at EOS); the plan and admission then
    work from a loose budget, as with real requests."""
    results, tokens_by_mode = {}, {}
    config = copy.deepcopy(config)
    pool = None
    if pool_share is not None:
        pool = _size_pool(config, spec, pool_share)
        config.cache.num_blocks = pool["num_blocks"]
        config.cache.save_evicted_to_host = victim_buffer
        pool["victim_buffer"] = victim_buffer
    for mode in modes:
        mode_config = copy.deepcopy(config)
        mode_config.cache.enable_prefix_caching = mode != "no-cache"
        llm = open_engine(mode_config)
        requests = make_workload(spec, token_space(llm))
        prompts = [r.prompt_token_ids for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
                  for r in requests]
        peak = _track_peak_blocks(llm)
        computed_before = llm.core.scheduler.num_prompt_tokens_computed
        started = time.perf_counter()
        planner = mode.startswith("planner")
        options = {"output_estimate": "max_tokens" if mode == "planner-max-tokens" else "history"}
        if declared_max_tokens:
            options["declared_max_tokens"] = [max(declared_max_tokens, r.max_tokens)
                                               for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=progress, batch_mode=planner,
                               batch_options=options if planner else None)
        wall = time.perf_counter() - started
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        prefill = llm.core.scheduler.num_prompt_tokens_computed - computed_before
        prompt_tokens = sum(map(len, prompts))
        optimum = prefill_optimum(prompts, llm.core.kv.block_size)
        results[mode] = {
            "wall_s": round(wall, 3),
            "prefill_tokens": prefill,
            "prefill_optimum": optimum,
            # share of the possible saving (prompt tokens minus the optimum) this mode got
            "saving_vs_optimum": round((prompt_tokens - prefill) / (prompt_tokens - optimum), 4)
            if prompt_tokens > optimum else 1.0,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "output_tokens_per_s": round(output_tokens / wall, 2),
            "peak_kv_blocks": peak(),
            "preemptions": llm.core.scheduler.num_preemptions,
        }
        tokens_by_mode[mode] = [o.outputs[0].token_ids for o in outputs]
        dtype = str(llm.engine.runner.model.dtype).removeprefix("torch.")
        llm.engine.runner.close()
    first = tokens_by_mode[modes[0]]
    for mode in modes:  # requests whose greedy output differs from the first mode's
        results[mode]["differing_outputs"] = sum(
            a != b for a, b in zip(first, tokens_by_mode[mode]))
    return {"results": results, "pool": pool, "dtype": dtype,
            "same_tokens": all(row["differing_outputs"] == 0 for row in results.values())}


def _size_pool(config: EngineConfig, spec: WorkloadSpec, share: float) -> dict:
    """Blocks for ``share`` of the batch's distinct prefix KV, plus one request's worth per
    64 concurrent sequences' output and question (so a tight pool still runs)."""
    llm = open_engine(config, warmup=False)
    try:
        block = llm.core.kv.block_size
        requests = make_workload(spec, token_space(llm))
        prompts = [r.prompt_token_ids for r in requests]
        distinct = math.ceil(prefill_optimum(prompts, block) / block)
        longest = max(len(p) + r.max_tokens for p, r in zip(prompts, requests))
        blocks = max(math.ceil(share * distinct), 2 * math.ceil(longest / block))
    finally:
        llm.engine.runner.close()
    return {"share": share, "distinct_prefix_blocks": distinct, "num_blocks": blocks}


def _track_peak_blocks(llm):
    """Wrap the core's step to record the most device blocks in use after any step."""
    core, peak = llm.core, [0]
    step = core.step

    def tracked():
        updates = step()
        peak[0] = max(peak[0], core.kv.pool.num_used)
        return updates

    core.step = tracked
    return lambda: peak[0]


BATCH_COLUMNS = ("wall_s", "prefill_tokens", "prefill_optimum", "saving_vs_optimum",
                 "prompt_tokens", "output_tokens", "output_tokens_per_s", "peak_kv_blocks",
                 "preemptions", "differing_outputs")


def add_batch_subcommand(sub, add_common) -> None:
    """``tierserve bench batch``: hooked into the bench CLI's subparsers."""
    batch = sub.add_parser(
        "batch", help="offline batch: BatchLLM planner vs FCFS+LRU prefix cache vs no cache",
        description="The same seeded batch run three ways: the BatchLLM planner (batch_mode), "
        "plain FCFS with LRU prefix caching, and no prefix caching. Reports wall time, prompt "
        "tokens computed, output tokens/s and peak KV blocks, and checks greedy outputs match.")
    add_common(batch, plot_help="bars of wall time, prefill tokens and output tokens/s")
    batch.add_argument("--modes", default=",".join(MODES),
                       help="comma-separated subset of planner,lru,no-cache,planner-max-tokens "
                       "(default: planner,lru,no-cache)")
    batch.add_argument("--pool-share", type=float, default=None,
                       help="size the KV pool to this share of the batch's distinct prefix KV "
                       "(e.g. 0.25 with --workload many-groups: the prefixes do not all fit); "
                       "evicted prefix blocks are then dropped, not kept in the host tier")
    batch.add_argument("--declared-max-tokens", type=int, default=None,
                       help="tell the planner each request may write this many tokens while it "
                       "stops at its drawn length, as real requests stop at EOS (compare "
                       "planner and planner-max-tokens)")
    batch.add_argument("--victim-buffer", action="store_true",
                       help="with --pool-share: keep evicted prefix blocks in the host tier "
                       "(tierserve's default) instead of dropping them")
    batch.set_defaults(func=cmd_batch, workload="shared-prefix", num_prefixes=32,
                       num_requests=512, prefix_len=96, question_len=16, output_len=16,
                       input_len=112)


def cmd_batch(args) -> int:
    from tierserve.bench import cli
    from tierserve.bench.report import plot_bars

    spec = cli._workload_spec(args, args.num_requests or 512)
    unknown = set(cli._names(args.modes)) - set(ALL_MODES)
    if unknown:
        raise ValueError(f"unknown --modes {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(ALL_MODES)}")
    if args.pool_share is not None and not 0 < args.pool_share <= 4:
        raise ValueError(f"--pool-share must be in (0, 4], got {args.pool_share}")
    outcome = run_batch_bench(cli._engine_config(args), spec,
                              tuple(cli._names(args.modes)), progress=not args.no_progress,
                              pool_share=args.pool_share, victim_buffer=args.victim_buffer,
                              declared_max_tokens=args.declared_max_tokens)
    if outcome["pool"]:
        pool = outcome["pool"]
        print(f"KV pool: {pool['num_blocks']} blocks, {pool['share']} of the batch's "
              f"{pool['distinct_prefix_blocks']} distinct prefix-tree blocks; evicted blocks "
              f"{'kept in the host tier' if pool['victim_buffer'] else 'dropped'}")
    cli._finish(args, {"workload": spec.name, "num_requests": spec.num_requests,
                       "num_prefixes": spec.num_prefixes, "prefix_len": spec.prefix_len,
                       "question_len": spec.question_len, "output_len": spec.output_len,
                       "scale": spec.scale, "pool": outcome["pool"]},
                outcome["results"], BATCH_COLUMNS, extra={"same_tokens": outcome["same_tokens"]})
    differing = {mode: row["differing_outputs"] for mode, row in outcome["results"].items()}
    print(f"greedy outputs identical across modes: {outcome['same_tokens']} (requests differing "
          f"from {next(iter(differing))}: {differing})")
    if args.plot:
        plot_bars(outcome["results"], [("wall_s", "wall seconds"),
                                       ("prefill_tokens", "prompt tokens computed"),
                                       ("output_tokens_per_s", "output tokens/s")],
                  args.plot, f"offline batch: {spec.name}, {spec.num_requests} requests")
        print(f"wrote {args.plot}")
    # float32 is batch-invariant here, so any difference is a bug; bfloat16 rounds differently
    # with a step's batch and chunks (as every engine's does), and a near tie may flip a token.
    return 0 if outcome["same_tokens"] or outcome["dtype"] != "float32" else 1
