"""The AVX2 module's float32 kernels for CPUs without the AVX-512 module (kernels/quant.cpp's
decode attention, elementwise.cpp's fused steps built into it) against the torch ops they
replace, decode rows against the batch, and a model with them on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierserve.engine.llm import LLM
from tierserve.kernels import cpu_ops, quant_ops
from tierserve.model.layers import apply_rotary, rms_norm
from tierserve.model.llama import LlamaModel
from tierserve.request import SamplingParams
from tierserve.selection.step import attend_selected

pytestmark = pytest.mark.skipif(quant_ops() is None, reason="AVX2 module not built here")


def _cache(blocks=40, block_size=16, kv_heads=3, head_dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("head_dim", [64, 20])  # 20: not a multiple of the vector width
def test_decode_attention_matches_the_torch_reference(head_dim):
    k, v = _cache(head_dim=head_dim)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(5, 9, head_dim, generator=generator)  # 9 heads over 3 kv heads (SmolLM2's)
    tables = torch.randint(0, 40, (5, 6), generator=generator)
    lens = torch.tensor([1, 16, 17, 50, 96])  # one token, a full block, one past, partial, all
    out = quant_ops().paged_decode_attention(q, k, v, tables, lens, 0.125)
    per_head = (tables[:, None].expand(-1, 3, -1), lens[:, None].expand(-1, 3))
    torch.testing.assert_close(out, attend_selected(q, k, v, *per_head, 0.125),
                               rtol=1e-5, atol=2e-6)
    # Per kv head tables, as KV selection passes them.
    tables = torch.randint(0, 40, (5, 3, 6), generator=generator)
    lens = torch.randint(1, 97, (5, 3), generator=generator)
    torch.testing.assert_close(quant_ops().paged_decode_attention(q, k, v, tables, lens, 0.125),
                               attend_selected(q, k, v, tables, lens, 0.125),
                               rtol=1e-5, atol=2e-6)


def test_decode_attention_reads_the_engines_strided_cache_views():
    # The engine's caches are head-major views of a block-major tensor, with a key-bounds row
    # past each block's tokens that attention must never read.
    shape = (40, 2, 2, 3, 16 + 1, 64)  # blocks, layers, K/V, kv heads, rows + bounds, head_dim
    cache = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    k, v, _ = LlamaModel._layer_cache(cache, 1, key_bounds=True)
    assert not k.is_contiguous() and k.shape == (40, 16, 3, 64)
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(4, 9, 64, generator=generator)
    tables = torch.randint(0, 40, (4, 5), generator=generator)
    lens = torch.tensor([16, 33, 80, 7])
    per_head = (tables[:, None].expand(-1, 3, -1), lens[:, None].expand(-1, 3))
    torch.testing.assert_close(quant_ops().paged_decode_attention(q, k, v, tables, lens, 0.125),
                               attend_selected(q, k, v, *per_head, 0.125), rtol=1e-5, atol=2e-6)


def test_fused_steps_match_the_torch_ops():
    generator = torch.Generator().manual_seed(5)
    x, residual = torch.randn(3, 576, generator=generator), torch.randn(3, 576, generator=generator)
    weight = 1 + 0.1 * torch.randn(576, generator=generator)
    out, hidden = quant_ops().add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(hidden, residual + x)
    assert (out - rms_norm(residual + x, weight, 1e-5)).abs().max() < 1e-5  # order of a sum
    qkv = torch.randn(3, (9 + 6) * 64, generator=generator)
    angles = torch.rand(3, 32, generator=generator) * 100
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q = qkv[:, :9 * 64].clone().view(3, 9, 64)
    quant_ops().rotary_(qkv, cos, sin, 9 + 3, 64)
    assert torch.equal(qkv[:, :9 * 64].view(3, 9, 64), apply_rotary(q, cos[:, None], sin[:, None]))
    gate_up = 3 * torch.randn(2, 3072, generator=generator)
    gate_up[0, :5] = torch.tensor([100.0, -100.0, 88.5, -90.0, float("nan")])  # exp's edges
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(quant_ops().silu_mul(gate_up), F.silu(gate) * up,
                               rtol=1e-6, atol=1e-6, equal_nan=True)


def test_decode_attention_rows_do_not_depend_on_the_batch():
    k, v = _cache()
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(7, 9, 64, generator=generator)
    tables = torch.randint(0, 40, (7, 5), generator=generator)
    lens = torch.randint(1, 81, (7,), generator=generator)
    together = quant_ops().paged_decode_attention(q, k, v, tables, lens, 0.125)
    alone = torch.cat([quant_ops().paged_decode_attention(q[i:i + 1], k, v, tables[i:i + 1],
                                                        lens[i:i + 1], 0.125) for i in range(7)])
    assert torch.equal(together, alone)


def test_decode_attention_refuses_tables_that_leave_the_cache():
    k, v = _cache()
    q = torch.randn(1, 9, 64)
    with pytest.raises(RuntimeError, match="not in the cache"):
        quant_ops().paged_decode_attention(q, k, v, torch.tensor([[3, 40]]), torch.tensor([20]),
                                         0.125)
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        quant_ops().paged_decode_attention(q, k, v, torch.tensor([[3, 4]]), torch.tensor([33]),
                                         0.125)
    with pytest.raises(RuntimeError, match="float32"):
        quant_ops().paged_decode_attention(q.bfloat16(), k, v, torch.tensor([[3]]),
                                         torch.tensor([2]), 0.125)


@pytest.mark.skipif(cpu_ops() is not None, reason="the AVX-512 module's kernel is used here")
def test_a_float32_model_runs_on_them_with_the_torch_paths_tokens(tiny_llama_dir,
                                                                        monkeypatch):
    import tierserve.model.llama as llama

    prompts = [{"prompt_token_ids": [5, 17, 42, 99, 300, 301, 7]},
               {"prompt_token_ids": [12, 480, 3, 77]}]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    native = LLM(str(tiny_llama_dir), num_blocks=32)
    assert native.engine.runner.model.attention.ops is quant_ops()
    ours = native.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(llama, "quant_ops", lambda: None)  # the torch path: gather + SDPA
    torch_path = LLM(str(tiny_llama_dir), num_blocks=32)
    assert torch_path.engine.runner.model.attention.ops is None
    theirs = torch_path.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ours, theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b, token in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                                         a.outputs[0].token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4


def test_the_native_kv_store_gives_the_index_put_paths_logprobs_bitwise(tiny_llama_dir):
    prompts = [{"prompt_token_ids": [5, 17, 42, 99, 300, 301, 7]},
               {"prompt_token_ids": [12, 480, 3, 77]}]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    native = LLM(str(tiny_llama_dir), num_blocks=32)
    ops = native.engine.runner.model.attention.ops
    assert ops is not None and hasattr(ops, "store_kv_")
    ours = native.generate(prompts, params, use_tqdm=False)

    class WithoutStore:  # the same kernels, but K/V written by index_put_
        def __getattr__(self, name):
            if name == "store_kv_":
                raise AttributeError(name)
            return getattr(ops, name)

    index_put = LLM(str(tiny_llama_dir), num_blocks=32)
    index_put.engine.runner.model.attention.ops = WithoutStore()
    theirs = index_put.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ours, theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [step[token].logprob for step, token in zip(a.outputs[0].logprobs,
                                                           a.outputs[0].token_ids)] == \
            [step[token].logprob for step, token in zip(b.outputs[0].logprobs,
                                                        b.outputs[0].token_ids)]


def test_every_layer_of_every_step_writes_its_kv_through_store_kv(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_blocks=32)
    model = llm.engine.runner.model
    ops, calls = model.attention.ops, []

    class Counting:
        def __getattr__(self, name):
            if name == "store_kv_":
                calls.append(name)
            return getattr(ops, name)

    model.attention.ops = Counting()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 17, 42]}], params, use_tqdm=False)
    assert len(calls) == 3 * len(model.layers)  # the prefill and two decodes
