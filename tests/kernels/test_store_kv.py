"""elementwise.cpp's store_kv_ (in both kernel modules) against the index_put_ it replaces, on
the engine's strided cache views, and the arguments it refuses without writing."""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels import cpu_ops, quant_ops
from tierserve.model.llama import LlamaModel

MODULES = [module for module in (cpu_ops(), quant_ops()) if module is not None]
pytestmark = pytest.mark.skipif(not MODULES, reason="no kernel module could be built here")

BLOCKS, LAYERS, KV_HEADS, BLOCK_SIZE, HEAD_DIM = 12, 2, 3, 16, 64
HEADS = 9  # q heads ahead of k and v in each qkv row, as in SmolLM2


def _cache(dtype: torch.dtype, key_bounds: bool) -> torch.Tensor:
    rows = BLOCK_SIZE + (1 if key_bounds else 0)
    shape = (BLOCKS, LAYERS, 2, KV_HEADS, rows, HEAD_DIM)  # LlamaModel.kv_cache_shape's layout
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _step(dtype: torch.dtype, tokens: int, slots: int):
    """k and v (tokens, kv_heads, head_dim) as views of qkv rows (not contiguous), and ``slots``
    distinct (block, offset) pairs for their first rows."""
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=generator).to(dtype)
    _, k, v = qkv.view(tokens, -1, HEAD_DIM).split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    flat = torch.randperm(BLOCKS * BLOCK_SIZE, generator=generator)[:slots]
    return k, v, flat // BLOCK_SIZE, flat % BLOCK_SIZE


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_bounds", [False, True])
@pytest.mark.parametrize("tokens,slots", [(1, 1), (7, 5), (40, 40)])  # decode, padded, prefill
def test_store_kv_writes_what_index_put_writes(module, dtype, key_bounds, tokens, slots):
    cache, expected = _cache(dtype, key_bounds), _cache(dtype, key_bounds)
    k, v, blocks, offsets = _step(dtype, tokens, slots)
    assert k.stride(0) == v.stride(0) == (HEADS + 2 * KV_HEADS) * HEAD_DIM  # qkv rows' stride
    k_cache, v_cache, _ = LlamaModel._layer_cache(cache, 1, key_bounds)
    module.store_kv_(k_cache, v_cache, k, v, blocks, offsets)
    k_ref, v_ref, _ = LlamaModel._layer_cache(expected, 1, key_bounds)
    k_ref[blocks, offsets] = k[:slots]
    v_ref[blocks, offsets] = v[:slots]
    # The whole cache: the other layer, the padding rows' slots and the key-bounds rows untouched.
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("module", MODULES)
def test_store_kv_refuses_bad_arguments_and_leaves_the_cache_as_it_was(module):
    cache = _cache(torch.float32, key_bounds=True)
    before = cache.clone()
    k_cache, v_cache, _ = LlamaModel._layer_cache(cache, 0, key_bounds=True)
    k, v, blocks, offsets = _step(torch.float32, tokens=2, slots=2)

    def refused(match: str, **changes):
        args = dict(k_cache=k_cache, v_cache=v_cache, k=k, v=v, slot_blocks=blocks,
                    slot_offsets=offsets) | changes
        with pytest.raises(RuntimeError, match=match):
            module.store_kv_(*args.values())
        assert torch.equal(cache, before)

    # The first slot is valid, the second not: nothing is written at all.
    refused("block 12 is not in the cache", slot_blocks=torch.tensor([0, BLOCKS]))
    refused("block -1 is not in the cache", slot_blocks=torch.tensor([0, -1]))
    # Offset 16 would be the block's key-bounds row.
    refused("offset 16 is outside a block of 16 rows", slot_offsets=torch.tensor([0, BLOCK_SIZE]))
    refused("3 slots but only 2 rows", slot_blocks=torch.tensor([0, 1, 2]),
            slot_offsets=torch.tensor([0, 0, 0]))
    refused("int64", slot_blocks=blocks.int(), slot_offsets=offsets.int())
    refused("share one dtype", k=k.bfloat16(), v=v.bfloat16())
    refused("float32 or bfloat16 only", k_cache=k_cache.half(), v_cache=v_cache.half(),
            k=k.half(), v=v.half())
    refused("kv_heads", k=k[:, :2], v=v[:, :2])
    refused("K and V alike", v_cache=v_cache[:-1])
    refused("head_dim must be contiguous", k_cache=k_cache.transpose(2, 3),
            v_cache=v_cache.transpose(2, 3))
