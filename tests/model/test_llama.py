"""LlamaModel's per-step bookkeeping: the layers' cache views made once per cache tensor, and a
packed linear that hands float32 rows to its kernel without casts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tierserve.engine.llm import LLM
from tierserve.model.llama import Linear, LlamaModel
from tierserve.model.packed import QuantType, quantize


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> LlamaModel:
    return LLM(str(tiny_llama_dir), num_blocks=8).engine.runner.model  # 2 layers


def test_layer_cache_views_are_made_once_per_cache_tensor(model):
    cache = torch.zeros(model.kv_cache_shape(4, 16, key_bounds=True))
    views = model._layer_caches(cache, key_bounds=True)
    assert model._layer_caches(cache, key_bounds=True) is views
    for index, (k_cache, v_cache, bounds) in enumerate(views):
        k_ref, v_ref, bounds_ref = LlamaModel._layer_cache(cache, index, True)
        for ours, theirs in zip((k_cache, v_cache, *bounds), (k_ref, v_ref, *bounds_ref)):
            assert ours.data_ptr() == theirs.data_ptr() and ours.stride() == theirs.stride()
            assert ours.shape == theirs.shape


def test_layer_cache_views_are_made_again_for_another_cache_or_layout(model):
    cache = torch.zeros(model.kv_cache_shape(4, 16, key_bounds=True))
    views = model._layer_caches(cache, key_bounds=True)
    without_bounds = model._layer_caches(cache, key_bounds=False)
    assert without_bounds is not views and without_bounds[0][2] is None
    assert without_bounds[0][0].shape[:2] == (4, 17)  # the last row is a token's now
    other = torch.zeros(model.kv_cache_shape(4, 16))
    assert model._layer_caches(other, key_bounds=False)[0][0].data_ptr() == other.data_ptr()
    other.set_(torch.zeros(model.kv_cache_shape(5, 16)))  # the same tensor on new storage
    assert model._layer_caches(other, key_bounds=False)[0][0].shape[:2] == (5, 16)


def test_a_packed_linear_hands_float32_rows_to_the_kernel_uncast():
    weight = quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)),
                      QuantType.Q8_0)
    seen, result = [], torch.ones(2, 8)

    def packed_linear(x, *kernel_args):
        seen.append((x, kernel_args))
        return result

    linear = Linear(weight, None, None, pack=False)
    linear.quant = SimpleNamespace(packed_linear=packed_linear)
    x = torch.randn(2, 64)
    assert linear(x) is result and seen[0][0] is x
    assert all(ours is theirs for ours, theirs in zip(seen[0][1], weight.kernel_args()))
    halves = linear(x.bfloat16())  # other dtypes: cast to float32 and back
    assert seen[1][0].dtype == torch.float32 and halves.dtype == torch.bfloat16
