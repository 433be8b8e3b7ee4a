"""One decode step with a long request among short ones: padded as one batch vs length buckets.

    python -m tierserve.bench.decode_buckets [--model smollm2] [--short 30x150] [--long 1600]
"""

from __future__ import annotations

import argparse

from tierserve.bench.budget import median_step
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk


def main(argv: list[str] | None = None) -> int:
    from tierserve.engine.llm import LLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--short", default="30x150", help="COUNTxCONTEXT of the short decodes")
    parser.add_argument("--long", type=int, default=1600, help="context of the long decode")
    args = parser.parse_args(argv)
    count, context = (int(x) for x in args.short.split("x"))
    lens = [context] * count + [args.long]
    llm = LLM(args.model, kv_cache_memory="600MiB", swap_space=0)
    runner, pool = llm.engine.runner, llm.core.kv.pool
    tables = [pool.allocate(-(-(n + 1) // runner.block_size)) for n in lens]
    params = SamplingParams(temperature=0.0)
    rows = [ScheduledChunk(f"d{i}", [5], n, tables[i], True, params, [5] * n, [])
            for i, n in enumerate(lens)]
    runner.inputs.native = False  # the torch path, where decodes are bucketed
    bucketed = median_step(runner, rows)
    runner.inputs.bucket_ratio = None  # every decode in one padded batch
    padded = median_step(runner, rows)
    print(f"{count} decodes at {context} tokens + 1 at {args.long}: one padded batch "
          f"{padded:.3f} s, length buckets {bucketed:.3f} s ({padded / bucketed:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
