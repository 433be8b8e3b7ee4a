"""Fused vs unfused decode attention on synthetic caches in the engine's layout (the figures of
docs/benchmarks.md "Fused shared-prefix attention" marked synthetic).

30 layers of SmolLM2's shape (9 query heads, 3 kv heads, head size 64, bfloat16), one pool laid
out as the engine's (blocks, layers, K/V, kv heads, 16 rows, head size), batch 64 sharing a
1024-token prefix, each with ``--own`` tokens of its own. Prints the median of 15 passes over
all layers for: the fused kernel, the unfused kernel, and the unfused kernel over the own tokens
alone (cold; then with every sequence on the same blocks, i.e. cached).

    python docs/results/shared-prefix-synthetic.py --own 80
    # two kernel builds A/B in one process, alternating (build dirs under $TIERSERVE_HOME/kernels):
    python docs/results/shared-prefix-synthetic.py --own 1 --ab OLD.so NEW.so
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch

from tierserve.bench.shared_prefix import time_over_layers

LAYERS, BATCH, PREFIX, BLOCK, KV_HEADS, HEADS, HEAD_DIM = 30, 64, 1024, 16, 3, 9, 64


def caches(own: int):
    torch.manual_seed(0)
    prefix_blocks, own_blocks = PREFIX // BLOCK, -(-own // BLOCK)
    num_blocks = prefix_blocks + BATCH * own_blocks + 1
    pool = torch.randn(num_blocks, LAYERS, 2, KV_HEADS, BLOCK, HEAD_DIM).bfloat16()
    layers = [(pool[:, i].transpose(2, 3)[:, 0], pool[:, i].transpose(2, 3)[:, 1])
              for i in range(LAYERS)]
    tables = torch.zeros(BATCH, prefix_blocks + own_blocks, dtype=torch.long)
    for b in range(BATCH):
        tables[b, :prefix_blocks] = torch.arange(prefix_blocks)
        tables[b, prefix_blocks:] = prefix_blocks + b * own_blocks + torch.arange(own_blocks)
    lens = torch.full((BATCH,), PREFIX + own, dtype=torch.long)
    q = torch.randn(BATCH, HEADS, HEAD_DIM).bfloat16()
    return layers, tables, lens, q, prefix_blocks


def load(path: str):
    """A built kernel library by its path.

    NOTE: a second build under the same module name (tierserve_cpu_ops) does not load beside
    the first in one process: Python hands back the module already loaded (seen on CPython
    3.11, 2026-12-08), so an A/B of two such builds would time one build twice. Refused here;
    build the variants under distinct module names (torch.utils.cpp_extension.load(name=...))
    or time them in separate processes."""
    name = Path(path).name.split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if Path(module.__file__).resolve() != Path(path).resolve():
        raise SystemExit(f"{path} loaded as {module.__file__}: give each build its own module "
                         "name (see load's note)")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--own", type=int, default=33, help="tokens of each sequence's own")
    parser.add_argument("--ab", nargs=2, metavar=("A", "B"),
                        help="time the fused kernel of two built libraries, alternating")
    args = parser.parse_args()
    layers, tables, lens, q, prefix_blocks = caches(args.own)
    scale = HEAD_DIM ** -0.5
    if args.ab:
        a, b = load(args.ab[0]), load(args.ab[1])
        times = {"A": [], "B": []}
        for _ in range(12):
            for name, ops in (("A", a), ("B", b)):
                times[name] += time_over_layers(lambda k, v, ops=ops: ops.paged_decode_attention_shared(
                    q, k, v, tables, lens, scale, 16), layers, repeats=5)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"fused: A {ms['A']:.2f} ms  B {ms['B']:.2f} ms  A/B {ms['A'] / ms['B']:.3f}")
        return
    from tierserve.kernels import cpu_ops

    ops = cpu_ops()
    rest_tables, rest_lens = tables[:, prefix_blocks:].contiguous(), lens - PREFIX
    cached_tables = rest_tables[:1].expand_as(rest_tables).contiguous()
    runs = {
        "fused": lambda k, v: ops.paged_decode_attention_shared(q, k, v, tables, lens, scale, 16),
        "unfused": lambda k, v: ops.paged_decode_attention(q, k, v, tables, lens, scale),
        "own tokens alone": lambda k, v: ops.paged_decode_attention(q, k, v, rest_tables,
                                                                    rest_lens, scale),
        "own tokens alone, cached": lambda k, v: ops.paged_decode_attention(
            q, k, v, cached_tables, rest_lens, scale),
    }
    for name, call in runs.items():
        print(f"{name}: {1e3 * statistics.median(time_over_layers(call, layers, 15)):.2f} ms")


if __name__ == "__main__":
    main()
