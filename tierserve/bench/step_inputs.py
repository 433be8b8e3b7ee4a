"""Time building one step's inputs (ids, positions, attention metadata) from a plan's chunks, with
no model: the Python cost the runner pays before every forward.

    python -m tierserve.bench.step_inputs [--repeats 200]
"""

from __future__ import annotations

import argparse
import time

from tierserve.model.step_inputs import StepInputBuilder
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk

BLOCK_SIZE = 16


def _decodes(count: int, context: int) -> list[ScheduledChunk]:
    blocks = -(-(context + 1) // BLOCK_SIZE)
    params = SamplingParams(temperature=0.0)
    return [ScheduledChunk(f"d{i}", [5], context, list(range(i * blocks, (i + 1) * blocks)), True,
                           params, [5] * context, []) for i in range(count)]


def _prefill(length: int) -> list[ScheduledChunk]:
    params = SamplingParams(temperature=0.0)
    return [ScheduledChunk("p", [7] * length, 0, list(range(-(-length // BLOCK_SIZE))), True,
                           params, [7] * length, [])]


SHAPES = {
    "1 decode at 256": lambda: _decodes(1, 256),
    "64 decodes at 256": lambda: _decodes(64, 256),
    "64 decodes at 1024": lambda: _decodes(64, 1024),
    "prefill chunk of 512": lambda: _prefill(512),
    "16 decodes + 240-token chunk": lambda: _decodes(16, 256) + _prefill(240),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"{'plan':<30} {'native kernel':>14} {'torch path':>11}   (microseconds a step)")
    for name, make in SHAPES.items():
        chunks = make()
        cells = []
        for native in (True, False):
            builder = StepInputBuilder(BLOCK_SIZE, 1, native, max_blocks_per_seq=128)
            builder.build(chunks)
            started = time.perf_counter()
            for _ in range(args.repeats):
                builder.build(chunks)
            cells.append((time.perf_counter() - started) / args.repeats * 1e6)
        print(f"{name:<30} {cells[0]:>14.0f} {cells[1]:>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
