"""Per-block key bounds: for every block, layer and kv head, the per-channel max and min of the
keys written so far.

They live inside the KV cache itself, one extra row per block and half (see
``LlamaModel.kv_cache_shape``): the K half's extra row holds the max, the V half's the min. So a
block's bounds move with it wherever the block's bytes go (swap out and in, the host and disk
tiers) and stay valid while a prefix-cache hit shares it, with no separate book to keep true.
They are in the cache's dtype: the max and min of bfloat16 keys are bfloat16 values, exactly.

Layout of one layer (a view of the cache, no copy)::

    k half: rows 0 .. block_size-1 = keys,   row block_size = key max
    v half: rows 0 .. block_size-1 = values, row block_size = key min
"""

from __future__ import annotations

import torch


def update_bounds(k_cache: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor,
                  blocks: torch.Tensor, fill: torch.Tensor) -> None:
    """Recompute the bounds of ``blocks`` from their first ``fill`` cached keys, in place.

    k_cache: (num_blocks, block_size, nkv, hd); key_max, key_min: (num_blocks, nkv, hd);
    blocks, fill: (U,) int64, the blocks this step wrote and how many rows each now holds
    (a block fills front to back, so rows below ``fill`` are all written).
    """
    if blocks.numel() == 0:
        return
    keys = k_cache[blocks]  # (U, block_size, nkv, hd)
    block_size = keys.shape[1]
    empty = (torch.arange(block_size)[None, :] >= fill[:, None])[:, :, None, None]
    key_max[blocks] = keys.masked_fill(empty, float("-inf")).amax(dim=1)
    key_min[blocks] = keys.masked_fill(empty, float("inf")).amin(dim=1)
