"""Profiled cost models: our table format and Vidur's, read into the same interpolation."""

import pytest

from tierserve.sim.cost import BatchShape
from tierserve.sim.model_shape import KNOWN_MODELS
from tierserve.sim.profiled import (
    Grid,
    ProfiledCostModel,
    ProfilePoint,
    ProfileTable,
    read_vidur_profile,
)


def _table() -> ProfileTable:
    """A synthetic engine: linear 5 ms + 0.1 ms/token, decode 1 ms + 0.2 ms/seq + 1 us per
    context token, prefill attention 1 ns x N x C, host 0.1 ms + 0.01 ms per chunk."""
    points = [ProfilePoint("linear", t, 0, 0, 0.005 + 1e-4 * t) for t in (1, 8, 64, 512)]
    for batch in (1, 4, 16, 64):
        for context in (64, 512, 2048):
            points.append(ProfilePoint("attn_decode", batch, batch, batch * context,
                                       0.001 + 2e-4 * batch + 1e-6 * batch * context))
    for chunk in (32, 128, 512):
        for context in (256, 1024, 2048):
            points.append(ProfilePoint("attn_prefill", chunk, 1, context, 1e-9 * chunk * context))
    points += [ProfilePoint("overhead", c, 0, 0, 1e-4 + 1e-5 * c) for c in (1, 8, 64)]
    return ProfileTable(points, {"prefill_at_zero_in_linear": True})


def test_profiled_model_reproduces_the_measured_engine():
    cost = ProfiledCostModel(_table())
    # Off the grid: 10 decodes at context 300 and one 100-token chunk after 700 tokens.
    shape = BatchShape.of(*[(1, 300)] * 10, (100, 700))
    parts = cost.breakdown(shape)
    assert parts["linear"] == pytest.approx(0.005 + 1e-4 * 110)
    assert parts["attn_decode"] == pytest.approx(0.001 + 2e-4 * 10 + 1e-6 * 3000, rel=0.02)
    assert parts["attn_prefill"] == pytest.approx(1e-9 * 100 * 700, rel=0.1)
    assert parts["overhead"] == pytest.approx(1e-4 + 1e-5 * 11)
    # Beyond the grid: more tokens, longer contexts, a larger batch keep growing.
    assert cost.linear_seconds(1024) == pytest.approx(0.005 + 1e-4 * 1024)
    assert (cost.breakdown(BatchShape.of(*[(1, 4096)] * 100))["attn_decode"]
            == pytest.approx(0.001 + 2e-4 * 100 + 1e-6 * 409600, rel=0.02))
    steps = [cost.step_seconds(BatchShape.of(*[(1, c)] * b)) for b in (1, 8, 32, 128)
             for c in (10, 500, 5000)]
    assert all(s > 0 for s in steps)


def test_profile_table_round_trips(tmp_path):
    table = _table()
    table.write(tmp_path)
    again = ProfileTable.read(tmp_path)
    assert again.meta == table.meta and len(again.points) == len(table.points)
    shape = BatchShape.of(*[(1, 700)] * 5, (64, 100))
    assert ProfiledCostModel(again).step_seconds(shape) == pytest.approx(
        ProfiledCostModel(table).step_seconds(shape))
    (tmp_path / "profile.csv").write_text("op,num_tokens,batch_size,kv_cache_size,seconds\n"
                                          "mlp,1,0,0,0.1\n")
    with pytest.raises(ValueError, match="unknown profile op"):
        ProfileTable.read(tmp_path)
    with pytest.raises(ValueError, match="sim profile"):
        ProfileTable.read(tmp_path / "missing")


def test_grid_scales_prefill_chunks_outside_the_measured_sizes():
    grid = Grid([(32, 1000, 0.032), (128, 1000, 0.128)], outside="scale", anchor_zero=True)
    assert grid.seconds(16, 1000) == pytest.approx(0.016)
    assert grid.seconds(256, 1000) == pytest.approx(0.256)
    assert grid.seconds(64, 500) == pytest.approx(0.032)  # halfway in size and in context
    assert grid.seconds(64, 0) == 0.0


def _vidur_files(folder, model):
    ops = ["emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
    header = [f"time_stats.{op}.median" for op in ops] + [
        "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp",
        "num_tokens", "num_tensor_parallel_workers"]
    rows = []
    for tokens in (1, 128, 1024):
        per_op = [0.01 * tokens / 128 + 0.001] * len(ops)  # ms
        for tp in (1, 2):
            rows.append(per_op + [model.num_heads, model.num_kv_heads, model.hidden_size,
                                  model.intermediate_size, model.vocab_size, True, tokens, tp])
    (folder / "mlp.csv").write_text(",".join(header) + "\n" + "\n".join(
        ",".join(str(v) for v in row) for row in rows) + "\n")
    attention = ("n_embd,n_q_head,n_kv_head,block_size,num_tensor_parallel_workers,"
                 "max_model_len,batch_size,prefill_chunk_size,kv_cache_size,is_prefill,"
                 "attention_backend,time_stats.attn_prefill.median,"
                 "time_stats.attn_decode.median,time_stats.attn_kv_cache_save.median\n")
    h, q, kv = model.hidden_size, model.num_heads, model.num_kv_heads
    for batch in (1, 32):
        for context in (512, 4096):
            decode_ms = 0.005 + 1e-6 * batch * context
            attention += f"{h},{q},{kv},16,1,4096,{batch},0,{context},False,FLASH,,{decode_ms},0.001\n"
    for chunk in (128, 512):
        for context in (0, 2048):
            prefill_ms = 0.01 + 1e-7 * chunk * (context + chunk)
            attention += f"{h},{q},{kv},16,1,4096,1,{chunk},{context},True,FLASH,{prefill_ms},,0.001\n"
    attention += f"{h + 1},{q},{kv},16,1,4096,1,64,0,True,FLASH,99,,0\n"  # another model
    (folder / "attention.csv").write_text(attention)


def test_vidur_profiles_are_summed_over_layers(tmp_path):
    model = KNOWN_MODELS["llama-2-7b"]
    _vidur_files(tmp_path, model)
    table = read_vidur_profile(tmp_path, model, tensor_parallel=1)
    linear = {p.num_tokens: p.seconds for p in table.of("linear")}
    per_op_ms = 0.01 + 0.001
    assert linear[128] == pytest.approx((32 * 9 * per_op_ms + per_op_ms) / 1000)
    decode = {(p.batch_size, p.kv_cache_size): p.seconds for p in table.of("attn_decode")}
    assert decode[(32, 32 * 4096)] == pytest.approx(32 * (0.005 + 1e-6 * 32 * 4096 + 0.001) / 1000)
    assert all(p.seconds < 1 for p in table.points)  # the other model's row was skipped
    cost = ProfiledCostModel(table, default_overhead_s=0.002)
    step = cost.breakdown(BatchShape.of((128, 2048)))
    assert step["attn_prefill"] == pytest.approx(
        32 * (0.01 + 1e-7 * 128 * (2048 + 128) + 0.001) / 1000)
    assert step["overhead"] == pytest.approx(0.002)
    with pytest.raises(ValueError, match="fewer than two rows"):
        read_vidur_profile(tmp_path, model, tensor_parallel=4)
    with pytest.raises(ValueError, match="mlp.csv"):
        read_vidur_profile(tmp_path / "nowhere", model)
