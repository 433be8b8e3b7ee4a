"""How the default token budget (--max-num-batched-tokens) was chosen: time one engine step that
carries D running decodes plus a prefill chunk of C tokens, for several C.

A larger budget raises prefill throughput until the matmuls saturate, and lengthens every step, which
is the time between tokens of every running decode. The default is the smallest budget that reaches
about 90% of the best prefill throughput measured.

    python -m tierserve.bench.budget [--model smollm2] [--decodes 16] [--chunks 64,128,256,512,1024]
"""

from __future__ import annotations

import argparse
import time

from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk


def median_step(runner, rows: list[ScheduledChunk], repeats: int = 5) -> float:
    """Median seconds of one forward over ``rows`` (inputs prepared each time, as a step does)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        inputs = runner._prepare(rows)
        runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2]


def time_step(llm, decodes: int, chunk: int, context: int, repeats: int) -> float:
    """Median seconds of a forward with ``decodes`` 1-token rows and one ``chunk``-token prefill."""
    runner, pool = llm.engine.runner, llm.core.kv.pool
    blocks_per = -(-(context + chunk + 1) // runner.block_size)
    tables = [pool.allocate(blocks_per) for _ in range(decodes + 1)]
    params = SamplingParams(temperature=0.0)
    try:
        rows = [ScheduledChunk(f"d{i}", [5], context, tables[i], True, params, [5] * context, [])
                for i in range(decodes)]
        if chunk:
            rows.append(ScheduledChunk("p", [7] * chunk, 0, tables[-1], True, params,
                                       [7] * chunk, []))
        return median_step(runner, rows, repeats)
    finally:
        for table in tables:
            pool.release(table)


def main(argv: list[str] | None = None) -> int:
    from tierserve.engine.llm import LLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--decodes", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--chunks", default="0,64,128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory="1200MiB", swap_space=0)
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for chunk in chunks:
        seconds = time_step(llm, args.decodes, chunk, args.context, args.repeats)
        rows.append((chunk, seconds))
    base = rows[0][1] if rows[0][0] == 0 else 0.0
    best = max((c / max(s - base, 1e-9) for c, s in rows if c), default=0.0)
    print(f"{args.decodes} decodes at {args.context} tokens of context; step = decodes + chunk")
    print("chunk  step_s  prefill_tok/s  budget")
    for chunk, seconds in rows:
        rate = chunk / max(seconds - base, 1e-9) if chunk else 0.0
        print(f"{chunk:5d}  {seconds:6.3f}  {rate:13.0f}  {chunk + args.decodes:6d}"
              f"{'  >= 90% of best prefill rate' if chunk and rate >= 0.9 * best else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
