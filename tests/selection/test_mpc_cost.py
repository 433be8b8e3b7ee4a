"""The MPC cost model: primitive prices, network sizes, and full vs MPCache composition."""

import json
import math

import pytest

from tierserve.cli import main
from tierserve.selection.mpc_cost import (
    SHAPES,
    Cost,
    MPCacheSetting,
    Protocol,
    full_step,
    mpcache_step,
)

ABY3 = Protocol("aby3", parties=3)
TWO = Protocol("2pc", parties=2)


def bitonic_network(n):
    """Comparators (i, j, ascending) of Batcher's bitonic sorter for n = 2^m, stage by stage."""
    stages, k = [], 2
    while k <= n:
        j = k // 2
        while j >= 1:
            stage = []
            for i in range(n):
                partner = i ^ j
                if partner > i:
                    stage.append((i, partner, (i & k) == 0))
            stages.append(stage)
            j //= 2
        k *= 2
    return stages


def test_bitonic_cost_counts_a_network_that_sorts():
    import random

    rng = random.Random(0)
    for n in (2, 8, 32, 128):
        stages = bitonic_network(n)
        values = [rng.random() for _ in range(n)]
        for stage in stages:
            for i, j, up in stage:
                if (values[i] > values[j]) == up:
                    values[i], values[j] = values[j], values[i]
        assert values == sorted(values)
        comparators = sum(len(s) for s in stages)
        per = ABY3.cmp(1).bits + 2 * ABY3.mux(1).bits  # one comparison, swap score and index
        cost = ABY3.sort_topk(1, n)
        assert cost.bits == pytest.approx(comparators * per)
        assert cost.rounds == len(stages) * (ABY3.cmp(1).rounds + 1)
    # a length that is not a power of two pays for the next one
    assert ABY3.sort_topk(3, 100).bits == ABY3.sort_topk(3, 128).bits


def test_primitive_prices():
    assert ABY3.mul(10) == Cost(3 * 64 * 10, 1)
    assert TWO.mul(10) == Cost(4 * 64 * 10, 1)
    # 3PC matmul pays for its outputs only, whatever the inner size
    assert ABY3.matmul(1, 4096, 7).bits == ABY3.matmul(1, 8, 7).bits == 3 * 64 * 7
    # 2PC opens both masked operands, or only the new part of a cached one
    assert TWO.matmul(1, 128, 1000).bits == 2 * 64 * (128 + 128 * 1000)
    assert TWO.matmul(1, 128, 1000, rhs_fresh=128).bits == 2 * 64 * (128 + 128)
    # a 64-bit comparison: full adder + Kogge-Stone (64 + 64*6 ANDs) + bit injection
    assert ABY3.cmp(1) == Cost(3 * (64 + 64 * 6) + 6 * 64, 1 + 6 + 2)
    # a tree max over n: n - 1 comparisons and selections, ceil(log2 n) levels
    for n in (2, 5, 64, 1000):
        cost = ABY3.max(4, n)
        assert cost.bits == pytest.approx(4 * (n - 1) * (ABY3.cmp(1).bits + ABY3.mux(1).bits))
        assert cost.rounds == math.ceil(math.log2(n)) * (ABY3.cmp(1).rounds + 1)
    # one-hot over 512 classes: one 9-bit decomposition per index, 8 ANDs and an injection
    # per class
    one = ABY3.onehot(1, 1, 512)
    decompose = 3 * (9 + 9 * 4)
    assert one.bits == pytest.approx(decompose + 512 * (3 * 8 + 6 * 64))


def test_full_attention_is_linear_in_context_with_the_per_token_price():
    shape = SHAPES["llama2-7b"]
    a, b = full_step(ABY3, shape, 2048), full_step(ABY3, shape, 4096)
    per_token = (3 * 64  # q . k
                 + ABY3.cmp(1).bits + ABY3.mux(1).bits  # max
                 + 8 * 3 * 64  # exp
                 + 3 * 64)  # scale by the reciprocal
    grown = b.attention().bits - a.attention().bits
    assert grown == pytest.approx(2048 * per_token * shape.heads * shape.layers)
    # the rest of the layer does not depend on the context
    assert a.parts["linear"] == b.parts["linear"]
    assert a.parts["ffn activation"] == b.parts["ffn activation"]


def test_mpcache_with_everything_kept_is_full_attention():
    shape = SHAPES["gpt2"]
    for proto in (ABY3, TWO):
        full = full_step(proto, shape, 1024)
        kept = mpcache_step(proto, shape, 1024, MPCacheSetting(static_keep=1.0, budget=1.0))
        assert kept.total == full.total


def test_mpcache_saves_attention_and_sharing_saves_selection():
    shape = SHAPES["llama2-7b"]
    full = full_step(ABY3, shape, 2048)
    shared = mpcache_step(ABY3, shape, 2048, MPCacheSetting())
    alone = mpcache_step(ABY3, shape, 2048, MPCacheSetting(share_pairs=False))
    assert full.attention().bits > 2 * shared.attention().bits
    selection = [k for k in alone.parts if k.startswith("selection")]
    assert sum(alone.parts[k].bits for k in selection) > \
        1.9 * sum(shared.parts[k].bits for k in selection)
    # the softmax shrinks to the selected tokens: 10% of 2048 over 30 of 32 layers,
    # the 2 dense layers over the statically kept half
    softmax = ABY3.softmax(shape.heads, 208).bits * 30 + ABY3.softmax(shape.heads, 1024).bits * 2
    assert shared.parts["softmax"].bits == pytest.approx(softmax)
    # gathering key and value rows instead of scores moves head_dim times more
    rows = mpcache_step(ABY3, shape, 2048, MPCacheSetting(gather_kv=True))
    assert rows.total.bits > shared.total.bits


def test_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "mpc.json"
    assert main(["mpc-cost", "--model", "gpt2", "--contexts", "512,2048", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reduction" in printed and "3.39-8.37x" in printed
    doc = json.loads(out.read_text())
    assert {(r["protocol"], r["context"]) for r in doc["rows"]} == {
        ("aby3", 512), ("aby3", 2048), ("2pc", 512), ("2pc", 2048)}
    for row in doc["rows"]:
        assert row["reduction"] == pytest.approx(row["full_gb"] / row["mpcache_gb"])
    assert "semi-honest" in doc["assumptions"]
    assert main(["mpc-cost", "--budget", "0.6", "--static-keep", "0.5"]) == 2
    assert main(["mpc-cost", "--contexts", "8"]) == 2
