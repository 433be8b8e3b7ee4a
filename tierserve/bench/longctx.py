"""`tierserve bench longctx`: decode step time, attention and selection time, KV bytes read and
held, for each KV-selection and static-eviction policy and budget at long contexts, side by side
in one run.

The cache is filled with random keys and values (their bounds computed as the engine does), not
by prefilling: a step's cost does not depend on what the keys say, and 16 prefills of 8k tokens
would take minutes on a laptop CPU. Quality is measured elsewhere, on real prompts.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tierserve.bench.report import machine_info, machine_line, write_json
from tierserve.bench.roofline import _median_seconds
from tierserve.config import SelectionConfig
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk
from tierserve.selection.bounds import update_bounds
from tierserve.selection.eviction import compact, make_eviction
from tierserve.selection.policies import make_policy

# Static policies: evict once after prefill to `budget` of the prompt, then decode densely over
# what is left. Their rows also carry the one-time eviction cost.
STATIC = {"snapkv": "snapkv", "mpcache-static": "mpcache"}


def _fill_cache(runner, tables: list[list[int]], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.tensor(sorted({b for table in tables for b in table}))
    cache = runner.kv_cache  # (blocks, layers, 2, nkv, rows, hd)
    fill = torch.full((len(blocks),), runner.block_size)
    for layer in range(cache.shape[1]):
        sample = torch.randn((len(blocks), 2, *cache.shape[3:]), generator=gen)
        cache[blocks, layer] = sample.to(cache.dtype)
        k_cache, _, (key_max, key_min) = runner.model._layer_cache(cache, layer, True)
        update_bounds(k_cache, key_max, key_min, blocks, fill)


def _block_mib(runner) -> float:
    """MiB one block of one request holds over all layers (K and V, plus bound rows if any)."""
    cache = runner.kv_cache  # (blocks, layers, 2, nkv, rows, hd)
    return cache[0].numel() * cache.element_size() / 2**20


def _eviction_ms(runner, table: list[int], context: int, name: str, budget: float) -> float:
    """One request's static eviction, once: the window's queries scored against every key of
    every layer, the cut, and the in-place compaction."""
    model, arch = runner.model, runner.model.arch
    config = SelectionConfig(kv_eviction=STATIC[name], kv_eviction_budget=budget)
    eviction = make_eviction(config, runner.block_size)
    window = eviction.window(context)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(window, arch.num_heads, arch.head_dim, generator=gen).to(model.dtype)
    slots = torch.arange(context - window, context)
    blocks = torch.tensor(table)
    started = time.perf_counter()
    observer = eviction.observer(arch.num_layers, arch.num_kv_heads, context)
    for layer in range(arch.num_layers):
        keys = runner.kv_cache[blocks, layer, 0, :, :runner.block_size]  # (B, nkv, bs, hd)
        keys = keys.transpose(0, 1).reshape(arch.num_kv_heads, -1, arch.head_dim)[:, :context]
        observer.add(layer, q, keys, slots, model.attention.scale)
    kept = eviction.keep(observer, context)
    compact(runner.kv_cache, table, kept, runner.block_size,
            runner.kv_cache.shape[4] > runner.block_size)
    return (time.perf_counter() - started) * 1e3


def measure(llm, context: int, batch: int, policies: list[tuple[str, float]], repeats: int,
            seed: int = 0, dense_layers: int = 2, evictions: dict | None = None) -> list[dict]:
    """One row per (policy, budget): median step, attention and selection seconds, bytes read
    and held. Static policies decode over ceil(budget x context) tokens and report their one-time
    eviction cost (measured once per context, policy and budget; `evictions` keeps it across
    calls)."""
    runner, pool, model = llm.engine.runner, llm.core.kv.pool, llm.engine.runner.model
    blocks_per = -(-(context + 1) // runner.block_size)
    tables = [pool.allocate(blocks_per) for _ in range(batch)]
    params = SamplingParams(temperature=0.0)
    arch = model.arch
    elem = runner.kv_cache.element_size()
    evictions = {} if evictions is None else evictions
    try:
        _fill_cache(runner, tables, seed)
        results = []
        for name, budget in policies:
            static = name in STATIC
            kept = min(context, math.ceil(budget * context)) if static else context
            held = -(-(kept + 1) // runner.block_size)
            rows = [ScheduledChunk(f"d{i}", [5], context, tables[i][:held], True, params,
                                   [5] * context, [], kv_offset=context - kept)
                    for i in range(batch)]
            if name == "full" or static:
                runner.inputs.selection = None
            else:
                runner.inputs.selection = make_policy(SelectionConfig(
                    kv_selection=name, kv_budget=budget, kv_dense_layers=dense_layers))
            inputs = runner._prepare(rows)

            def step(inputs=inputs):
                if inputs.meta.selection is not None:  # each step selects afresh
                    inputs.meta.selection.reset()
                model.forward(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)

            step_s = _median_seconds(step, repeats)
            attention_s, select_s, tokens_read, bounds_read = _attention_parts(
                runner, inputs, repeats)
            row = {
                "policy": name, "budget": budget if name != "full" else 1.0, "context": context,
                "batch": batch, "step_ms": step_s * 1e3, "attention_ms": attention_s * 1e3,
                "selection_ms": select_s * 1e3,
                "kv_read_mib": (tokens_read * 2 + bounds_read * 2) * arch.num_kv_heads
                * arch.head_dim * elem / 2**20,
                "kv_held_mib": held * batch * _block_mib(runner),
            }
            if static:
                key = (context, name, budget)
                if key not in evictions:  # after the timed steps: it compacts tables[0]
                    evictions[key] = _eviction_ms(runner, tables[0], context, name, budget)
                row["eviction_ms"] = evictions[key]
            results.append(row)
        return results
    finally:
        runner.inputs.selection = None
        for table in tables:
            pool.release(table)


def _attention_parts(runner, inputs, repeats: int) -> tuple[float, float, int, int]:
    """Attention kernel seconds and selection seconds over all layers of one step, and the
    cached tokens (per kv head) and bound rows they read."""
    model, meta = runner.model, inputs.meta
    arch = model.arch
    q = torch.randn(meta.num_tokens, arch.num_heads, arch.head_dim).to(model.dtype)
    layers = [model._layer_cache(runner.kv_cache, i, meta.key_bounds)
              for i in range(arch.num_layers)]
    # The bench's cache keeps key bounds, so every step has a StepSelection (full: no picks).
    selection = meta.selection
    rows, tables, lens = selection.rows, selection.tables, selection.lens
    if selection.policy.name == "full":
        selection = None

    def picks():
        if selection is None:
            return [None] * arch.num_layers
        selection.reset()
        return [selection.pick(i, q, arch.num_kv_heads, *bounds)
                for i, (_, _, bounds) in enumerate(layers)]

    picked = picks()
    select_s = _median_seconds(picks, repeats) if selection is not None else 0.0

    def attend():
        for (k_cache, v_cache, _), chosen in zip(layers, picked):
            model.attention.decode_over(q[rows], k_cache, v_cache,
                                        *(chosen if chosen is not None else (tables, lens)))

    attention_s = _median_seconds(attend, repeats)
    tokens = bounds = 0
    scored = set()
    for index, chosen in enumerate(picked):
        if chosen is None:
            tokens += int(lens.sum()) * arch.num_kv_heads
            continue
        tokens += int(chosen[1].sum())
        source = selection.source_layer(index)
        if selection.policy.needs_bounds and source not in scored:
            scored.add(source)
            bounds += int(tables.shape[1]) * len(rows) * arch.num_kv_heads
    return attention_s, select_s, tokens // arch.num_kv_heads, bounds // arch.num_kv_heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``tierserve bench longctx``."""
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", default="4096,8176",
                        help="cached tokens per decode (8176: 8k, the last position SmolLM2 "
                        "allows) (default: %(default)s)")
    parser.add_argument("--batches", default="1,16", help="decodes per step (default: %(default)s)")
    parser.add_argument("--policies", default="streaming,quest,mpcache",
                        help="dynamic (streaming, quest, mpcache) and static (snapkv, "
                        "mpcache-static: evict once to the budget after prefill) policies "
                        "(default: %(default)s)")
    parser.add_argument("--budgets", default="0.05,0.1,0.2",
                        help="shares of the context (or tokens, above 1) (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="median of this many steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write {machine, config, results} here")
    parser.add_argument("--plot", default=None,
                        help="write a PNG: step time per policy by budget, per context and batch")


DESCRIPTION = ("Decode step and attention time, selection overhead, KV bytes read per step and "
               "KV memory held, for each KV-selection or static-eviction policy and budget, at "
               "each context and batch size, against full attention in the same run; static "
               "policies also report their one-time eviction cost. The cache holds random keys "
               "(timing does not depend on them).")


def plot_steps(results: list[dict], path: str, title: str) -> None:
    """One panel per (context, batch): step and attention ms by budget, a line per policy,
    full attention as a dashed line."""
    from tierserve.bench.report import _pyplot, _save, _suptitle

    plt = _pyplot()
    cases = sorted({(row["context"], row["batch"]) for row in results})
    figure, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for axis, (context, batch) in zip(axes[0], cases):
        rows = [row for row in results if (row["context"], row["batch"]) == (context, batch)]
        for row in rows:
            if row["policy"] == "full":
                axis.axhline(row["step_ms"], color="black", linestyle="--", label="full: step")
                axis.axhline(row["attention_ms"], color="gray", linestyle=":",
                             label="full: attention")
        for name in sorted({row["policy"] for row in rows} - {"full"}):
            mine = sorted((row for row in rows if row["policy"] == name),
                          key=lambda row: row["budget"])
            axis.plot([r["budget"] for r in mine], [r["step_ms"] for r in mine], marker="o",
                      label=f"{name}: step")
        axis.set_title(f"context {context}, batch {batch}")
        axis.set_xlabel("budget (share of blocks)")
        axis.set_ylabel("ms")
        axis.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve bench longctx", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Measure and print every row; write the JSON report when asked."""
    from tierserve.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    blocks = max(batches) * (-(-(max(contexts) + 1) // 16)) + 16
    llm = LLM(model=args.model, dtype=args.dtype, kv_selection="quest", num_blocks=blocks,
              enable_prefix_caching=False,
              max_num_seqs=max(batches))
    policies = [("full", 1.0)] + [(name, float(budget)) for name in args.policies.split(",")
                                  for budget in args.budgets.split(",")]
    results, evictions = [], {}
    for context in contexts:
        for batch in batches:
            for row in measure(llm, context, batch, policies, args.repeats,
                               evictions=evictions):
                results.append(row)
                once = (f"  eviction {row['eviction_ms']:7.0f} ms once" if "eviction_ms" in row
                        else "")
                print(f"ctx {context:5d} batch {batch:2d} {row['policy']:14s} {row['budget']:.2f}"
                      f"  step {row['step_ms']:8.1f} ms  attention {row['attention_ms']:8.1f} ms"
                      f"  selection {row['selection_ms']:6.1f} ms  KV read "
                      f"{row['kv_read_mib']:8.1f} MiB  held {row['kv_held_mib']:8.1f} MiB{once}",
                      flush=True)
    machine = machine_info(args.dtype)
    if args.json:
        write_json(args.json, {"machine": machine,
                               "config": {k: v for k, v in vars(args).items() if k != "func"},
                               "results": results})
    if args.plot:
        plot_steps(results, args.plot, f"decode step time, {args.model} {args.dtype} "
                   f"({machine_line(machine)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
