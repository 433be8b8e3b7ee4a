"""`tierserve bench roofline`: the bound arithmetic, the stage timer, and the command on the tiny
model."""

from __future__ import annotations

import json

import pytest
import torch

from tierserve.bench import roofline as rl
from tierserve.bench.cli import main


def test_bounds_follow_bandwidth_at_batch_one_and_flops_at_large_batch():
    machine = {"read_gb_per_s": 30.0, "matmul_gflop_per_s_bfloat16": 400.0,
               "matmul_gflop_per_s_float32": 200.0}
    costs = {"weight_bytes": 2.9e8, "kv_bytes_per_token": 1e7, "flops_per_token": 2.5e8}
    bounds = rl.roofline(machine, costs, "bfloat16")
    assert bounds["batch1_tokens_per_s"] == pytest.approx(30e9 / 3.0e8)
    assert bounds["compute_tokens_per_s"] == pytest.approx(400e9 / 2.5e8)
    assert rl.roofline(machine, costs, "float32")["compute_tokens_per_s"] == pytest.approx(800)


def test_model_costs_count_every_linear_weight(tiny_llama_dir):
    from tierserve.engine.llm import LLM

    llm = LLM(str(tiny_llama_dir), num_blocks=16)
    model = llm.engine.runner.model
    arch = model.arch
    params = sum(t.numel() for layer in model.layers
                 for t in (layer.qkv.weight, layer.o.weight, layer.mlp.gate_up.weight,
                           layer.mlp.down.weight)) + model.lm_head.weight.numel()
    costs = rl.model_costs(model, context=100)
    assert costs["weight_bytes"] == params * 4
    attention = arch.num_layers * 4 * 100 * arch.num_heads * arch.head_dim
    assert costs["flops_per_token"] == 2 * params + attention


def test_stage_times_are_exclusive_and_sum_to_the_step(tiny_llama_dir):
    from tierserve.engine.llm import LLM

    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    row = rl.time_decode(llm, batch=3, context=40, steps=3)
    stages = sum(row[f"{stage}_s"] for stage in rl.STAGES)
    assert stages == pytest.approx(row["step_s"], rel=1e-6)
    assert all(row[f"{stage}_s"] >= 0 for stage in rl.STAGES)
    assert row["linear_s"] > 0 and row["attention_s"] > 0 and row["sample_s"] > 0
    assert llm.core.kv.pool.num_free == 64  # the step's blocks went back
    from tierserve.model import llama
    assert llama.Linear.__call__.__name__ == "__call__"  # timers removed


def test_roofline_command_writes_limits_bounds_and_breakdown(tiny_llama_dir, tmp_path):
    out = tmp_path / "roofline.json"
    threads = torch.get_num_threads()
    try:
        code = main(["roofline", "--model", str(tiny_llama_dir), "--batch-sizes", "1,4",
                     "--context", "32", "--steps", "2", "--threads", "1", "--json", str(out),
                     "--probe-megabytes", "64", "--probe-matmul-size", "512",
                     "--plot", str(tmp_path / "roofline.png")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    document = json.loads(out.read_text())
    limits = document["machine_limits"]
    assert limits["read_gb_per_s"] > 0 and limits["matmul_gflop_per_s_bfloat16"] > 0
    assert set(document["results"]) == {"batch 1", "batch 4"}
    for row in document["results"].values():
        assert 0 < row["fraction_of_bound"]
        assert row["bound_tokens_per_s"] > 0
    assert (tmp_path / "roofline.png").stat().st_size > 0
