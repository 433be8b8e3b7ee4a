"""`tierserve bench shared-prefix`: the decode step with and without fused shared-prefix attention.

``--batch`` requests share a ``--prefix-len``-token prefix (a batch group, a few-shot template)
and each adds ``--question-len`` tokens of its own. With ``--templates N`` the prefixes nest:
after the shared prefix each request has one of N ``--template-len``-token templates (round
robin), shared with the requests of the same template. Once every one of them decodes, the
same engine (same KV cache, same batch) times decode steps with the fused path on and off in
turns (and, with templates, fused at the first level only: ``fused-top``), ``--rounds`` times
``--steps`` each, so all see the same machine state; it reports the median step, and the
attention kernel alone over the real cache (every layer's call, the same query).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from tierserve.request import SamplingParams

COLUMNS = ("decode_step_ms", "attention_ms_per_step", "speedup_step", "speedup_attention")


def add_shared_prefix_subcommand(sub, add_common) -> None:
    parser = sub.add_parser(
        "shared-prefix", help="decode step time with fused shared-prefix attention on and off",
        description=__doc__.split("\n\n", 1)[1])
    add_common(parser, plot_help="bars of the decode step and attention time")
    parser.add_argument("--batch", type=int, default=64, help="decoding requests (default: 64)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per mode per round")
    parser.add_argument("--templates", type=int, default=0,
                        help="nested prefixes: templates after the shared prefix (default: 0)")
    parser.add_argument("--template-len", type=int, default=512,
                        help="tokens of each template (default: 512)")
    parser.set_defaults(func=cmd_shared_prefix, prefix_len=1024, question_len=32,
                        dtype="bfloat16")


def run_shared_prefix(config, batch: int, prefix_len: int, question_len: int, rounds: int,
                      steps: int, seed: int = 0, templates: int = 0,
                      template_len: int = 512) -> dict:
    from tierserve.bench.harness import open_engine, token_space

    llm = open_engine(config)
    model, core = llm.engine.runner.model, llm.core
    attention = model.attention
    if attention.ops is None or attention.shared_prefix_blocks == 0:
        raise RuntimeError("the fused path needs the native kernels and a block size that is "
                           "a multiple of 16 (and no --no-shared-prefix-attention)")
    if model.dtype != torch.bfloat16:
        raise RuntimeError("the fused path is bfloat16 only: pass --dtype bfloat16")
    space, rng = token_space(llm), np.random.default_rng(seed)
    prefix = space.draw(rng, prefix_len)
    bodies = [space.draw(rng, template_len) for _ in range(templates)] or [[]]
    modes = (("fused", attention.shared_prefix_blocks, attention.shared_prefix_levels),
             *((("fused-top", attention.shared_prefix_blocks, 1),) if templates else ()),
             ("unfused", 0, attention.shared_prefix_levels))
    steps_needed = rounds * steps * len(modes) + 8
    params = SamplingParams(temperature=0.0, max_tokens=steps_needed + 64, ignore_eos=True)
    requests = [core.make_request(
        f"r{i}", prefix + bodies[i % len(bodies)] + space.draw(rng, question_len), params)
        for i in range(batch)]
    for request in requests:
        core.add_request(request)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in requests):
        core.step()
    for _ in range(2):
        core.step()  # every request decodes now
    assert all(r.num_tokens - r.num_computed_tokens == 1 for r in requests)
    times = {mode: [] for mode, _, _ in modes}
    for _ in range(rounds):
        for mode, blocks, levels in modes:
            attention.shared_prefix_blocks, attention.shared_prefix_levels = blocks, levels
            for _ in range(steps):
                started = time.perf_counter()
                core.step()
                times[mode].append(time.perf_counter() - started)
    ops_times = _attention_alone(llm, requests, modes)
    attention.shared_prefix_blocks, attention.shared_prefix_levels = modes[0][1:]
    results = {mode: {"decode_step_ms": round(1e3 * statistics.median(times[mode]), 2),
                      "attention_ms_per_step": round(ops_times[mode], 2)}
               for mode, _, _ in modes}
    unfused = results["unfused"]
    for mode, _, _ in modes[:-1]:
        results[mode]["speedup_step"] = round(unfused["decode_step_ms"]
                                              / results[mode]["decode_step_ms"], 3)
        results[mode]["speedup_attention"] = round(unfused["attention_ms_per_step"]
                                                   / results[mode]["attention_ms_per_step"], 3)
    llm.engine.runner.close()
    return results


def _attention_alone(llm, requests, modes, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one step's attention calls (every layer) over the live cache,
    per (mode, min blocks (0: unfused), levels)."""
    runner, model = llm.engine.runner, llm.engine.runner.model
    kv = llm.core.kv
    tables_list = [kv.block_table(r.request_id) for r in requests]
    width = max(map(len, tables_list))
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables_list])
    lens = torch.tensor([r.num_computed_tokens + 1 for r in requests])
    attention = model.attention
    q = torch.randn(len(requests), attention.num_heads, attention.head_dim).to(model.dtype)
    layers = [model._layer_cache(runner.kv_cache, i, runner.key_bounds)[:2]
              for i in range(len(model.layers))]
    ops = attention.ops
    out = {}
    for mode, blocks, levels in modes:
        def op(k, v, blocks=blocks, levels=levels):
            if blocks == 0:
                return ops.paged_decode_attention(q, k, v, tables, lens, attention.scale)
            return ops.paged_decode_attention_shared(q, k, v, tables, lens, attention.scale,
                                                     blocks, levels)
        out[mode] = 1e3 * statistics.median(time_over_layers(op, layers, repeats))
    return out


def time_over_layers(op, layers, repeats: int) -> list[float]:
    """Seconds of ``op(k_cache, v_cache)`` over every layer in turn, ``repeats`` times."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for k_cache, v_cache in layers:
            op(k_cache, v_cache)
        samples.append(time.perf_counter() - started)
    return samples


def cmd_shared_prefix(args) -> int:
    from tierserve.bench import cli
    from tierserve.bench.report import plot_bars

    config = cli._engine_config(args)
    results = run_shared_prefix(config, args.batch, args.prefix_len, args.question_len,
                                args.rounds, args.steps, args.seed, args.templates,
                                args.template_len)
    cli._finish(args, {"batch": args.batch, "prefix_len": args.prefix_len,
                       "question_len": args.question_len, "rounds": args.rounds,
                       "steps": args.steps, "templates": args.templates,
                       "template_len": args.template_len}, results, COLUMNS)
    if args.plot:
        plot_bars(results, [("decode_step_ms", "decode step (ms)"),
                            ("attention_ms_per_step", "attention per step (ms)")], args.plot,
                  f"batch {args.batch}, {args.prefix_len}-token shared prefix"
                  + (f", then {args.templates} templates of {args.template_len}"
                     if args.templates else ""))
        print(f"wrote {args.plot}")
    return 0
