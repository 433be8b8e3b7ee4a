"""KV-selection policies: which cached blocks one decode step attends to, per kv head.

A policy scores the blocks of each (decode, kv head); the common mechanism (``select_blocks``)
keeps the sink and recent blocks, takes the best-scored others up to the budget, and returns
them as a per-(decode, kv head) block table in context order plus the number of cached tokens it
covers, which is what the native decode kernel and ``attend_selected`` read. Scores are computed
for all decodes of a step at once (a few tensor ops per layer, no loop over requests).

Policies (``--kv-selection``):
- ``full``: every block (the dense path; a budget never applies).
- ``streaming``: StreamingLLM, the sink blocks and the most recent ones.
- ``quest``: Quest's exact upper bound of ``q . k`` over a block, ``sum_c max(q_c kmax_c,
  q_c kmin_c)``, summed over the query heads of a kv head (GQA).
- ``mpcache``: MPCache's hierarchy: 32-token clusters (two blocks) scored by the linear bound
  ``q . (a kmax + (1 - a) kmin)`` keep ``mpcache_level1_keep`` of them (or enough for the
  budget, if more), then the blocks inside the kept clusters are scored the same way down to the
  budget; the picked blocks are shared by
  the layer pairs (2, 3), (4, 5), ... as the paper describes (the reference repository's
  committed attention code neither shares nor keeps layers dense: docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tierserve.config import SelectionConfig
from tierserve.kernels import cpu_ops
from tierserve.selection.budget import READS_BOUNDS, SHARES_LAYER_PAIRS


@dataclass(slots=True)
class BlockView:
    """The blocks of a step's decodes: what is valid, what is always kept, the budget."""

    tables: torch.Tensor  # (D, W) int64 block ids, padded with block 0
    lens: torch.Tensor  # (D,) int64 cached tokens (the current one included)
    num_blocks: torch.Tensor  # (D,) blocks in use
    valid: torch.Tensor  # (D, W) bool
    forced: torch.Tensor  # (D, W) bool: sink and recent blocks
    keep: torch.Tensor  # (D,) blocks to attend to, forced ones included
    block_size: int

    @classmethod
    def build(cls, tables: torch.Tensor, lens: torch.Tensor, block_size: int,
              config: SelectionConfig) -> BlockView:
        num_blocks = (lens + block_size - 1) // block_size
        index = torch.arange(tables.shape[1])[None, :]
        valid = index < num_blocks[:, None]
        recent = index >= (num_blocks - config.kv_recent_blocks)[:, None]
        forced = valid & ((index < config.kv_sink_blocks) | recent)
        budget = config.kv_budget  # per sequence: budget.selected_blocks (tested to agree)
        if budget <= 1.0:
            keep = torch.ceil(num_blocks.double() * budget).long()
        else:
            keep = torch.full_like(num_blocks, math.ceil(budget / block_size))
        keep = torch.minimum(torch.maximum(keep, forced.sum(-1)), num_blocks)
        return cls(tables, lens, num_blocks, valid, forced, keep, block_size)

    @property
    def everything_kept(self) -> bool:
        return bool((self.keep >= self.num_blocks).all())


class SelectionPolicy:
    """Scores blocks; ``select_blocks`` does the rest. ``shares_layer_pairs``: from the first
    sparse layer on, layers 2i and 2i+1 use one selection."""

    name = "full"

    def __init__(self, config: SelectionConfig) -> None:
        self.config = config

    @property
    def needs_bounds(self) -> bool:
        return self.name in READS_BOUNDS

    @property
    def shares_layer_pairs(self) -> bool:
        return self.name in SHARES_LAYER_PAIRS

    def scores(self, q: torch.Tensor, view: BlockView, num_kv_heads: int,
               key_max: torch.Tensor | None, key_min: torch.Tensor | None) -> torch.Tensor:
        """(D, nkv, W) float32, higher is kept first; -inf never kept (unless forced).
        q: (D, nh, hd); key_max, key_min: (num_blocks, nkv, hd) of this layer, or None where
        the cache keeps no bounds (policies that need them say so with ``needs_bounds``)."""
        raise NotImplementedError


class FullKV(SelectionPolicy):
    name = "full"


class StreamingLLM(SelectionPolicy):
    name = "streaming"

    def scores(self, q, view, num_kv_heads, key_max, key_min):
        recency = torch.arange(view.tables.shape[1], dtype=torch.float32)
        return recency.expand(q.shape[0], num_kv_heads, -1)


class Quest(SelectionPolicy):
    name = "quest"

    def scores(self, q, view, num_kv_heads, key_max, key_min):
        grouped = q.float().view(q.shape[0], num_kv_heads, -1, q.shape[-1])  # (D, nkv, G, hd)
        # sum_c max(q_c kmax_c, q_c kmin_c) = q+ . kmax + q- . kmin, and summed over G heads.
        return bound_scores(grouped.clamp(min=0).sum(2), grouped.clamp(max=0).sum(2), key_max,
                            key_min, view, 1)


class MPCache(SelectionPolicy):
    name = "mpcache"

    def scores(self, q, view, num_kv_heads, key_max, key_min):
        alpha = self.config.mpcache_alpha
        query = q.float().view(q.shape[0], num_kv_heads, -1, q.shape[-1]).sum(2)  # (D, nkv, hd)
        upper_weight, lower_weight = alpha * query, (1 - alpha) * query
        block_scores = bound_scores(upper_weight, lower_weight, key_max, key_min, view, 1)
        # Level 1: clusters of two blocks, bounded by both blocks' bounds.
        pair_scores = bound_scores(upper_weight, lower_weight, key_max, key_min, view, 2)
        pairs = pair_scores.shape[-1]
        forced = view.forced
        if forced.shape[1] % 2:
            forced = torch.cat([forced, torch.zeros_like(forced[:, :1])], dim=1)
        pair_forced = forced.view(-1, pairs, 2).any(-1)  # (D, P)
        pair_scores = pair_scores.masked_fill(pair_forced[:, None], float("inf"))
        num_pairs = (view.num_blocks + 1) // 2
        keep_pairs = torch.ceil(num_pairs.double() * self.config.mpcache_level1_keep).long()
        # Never fewer clusters than the budget's blocks need (a budget above the level-1 share).
        keep_pairs = torch.maximum(keep_pairs, (view.keep + 1) // 2 + 1)
        keep_pairs = torch.minimum(torch.maximum(keep_pairs, pair_forced.sum(-1)), num_pairs)
        kept = top_mask(pair_scores, keep_pairs[:, None].expand(-1, num_kv_heads))  # (D, nkv, P)
        kept_blocks = kept.repeat_interleave(2, dim=-1)[..., :view.tables.shape[1]]
        return block_scores.masked_fill(~kept_blocks, float("-inf"))


def bound_scores(q_upper: torch.Tensor, q_lower: torch.Tensor, key_max: torch.Tensor,
                 key_min: torch.Tensor, view: BlockView, cluster: int) -> torch.Tensor:
    """(D, nkv, ceil(W / cluster)) float32: for each cluster of ``cluster`` neighbouring blocks,
    ``q_upper . max(kmax) + q_lower . min(kmin)`` over its valid blocks; -inf past a decode's
    blocks. q_upper, q_lower: (D, nkv, hd) float32. The native kernel reads the bounds in place
    through the tables; this torch version (gather, reduce, einsum) is its reference."""
    ops = cpu_ops()
    if ops is not None and hasattr(ops, "block_bound_scores"):
        return ops.block_bound_scores(q_upper, q_lower, key_max, key_min, view.tables,
                                      view.num_blocks, cluster)
    return bound_scores_torch(q_upper, q_lower, key_max, key_min, view, cluster)


def bound_scores_torch(q_upper, q_lower, key_max, key_min, view: BlockView,
                       cluster: int) -> torch.Tensor:
    """``bound_scores`` in torch ops."""
    decodes, width = view.tables.shape
    upper = key_max[view.tables].float()  # (D, W, nkv, hd)
    lower = key_min[view.tables].float()
    valid = view.valid
    if cluster > 1:
        missing = -width % cluster
        if missing:
            upper = torch.cat([upper, upper[:, -1:].expand(-1, missing, -1, -1)], dim=1)
            lower = torch.cat([lower, lower[:, -1:].expand(-1, missing, -1, -1)], dim=1)
            valid = torch.cat([valid, torch.zeros_like(valid[:, :1]).expand(-1, missing)], 1)
        invalid = ~valid[:, :, None, None]
        shape = (decodes, -1, cluster, *upper.shape[2:])
        upper = upper.masked_fill(invalid, float("-inf")).view(shape).amax(2)
        lower = lower.masked_fill(invalid, float("inf")).view(shape).amin(2)
        valid = valid.view(decodes, -1, cluster)[:, :, 0]
        # clusters with no valid block hold -inf/inf; zero them before the products
        upper = upper.masked_fill(~valid[:, :, None, None], 0.0)
        lower = lower.masked_fill(~valid[:, :, None, None], 0.0)
    scores = (torch.einsum("dhc,dwhc->dhw", q_upper, upper)
              + torch.einsum("dhc,dwhc->dhw", q_lower, lower))
    return scores.masked_fill(~valid[:, None], float("-inf"))


POLICIES: dict[str, type[SelectionPolicy]] = {
    cls.name: cls for cls in (FullKV, StreamingLLM, Quest, MPCache)}


def make_policy(config: SelectionConfig) -> SelectionPolicy:
    """The policy ``config.kv_selection`` names."""
    return POLICIES[config.kv_selection](config)


def top_mask(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool of ``scores``' shape: the ``count`` best of each last-axis row (count: scores'
    shape without the last axis)."""
    widest = int(count.max()) if count.numel() else 0
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if widest == 0:
        return mask
    top = scores.topk(widest, dim=-1).indices
    taken = torch.arange(widest) < count[..., None]
    return mask.scatter_(-1, top, taken)


def select_blocks(scores: torch.Tensor, view: BlockView) -> tuple[torch.Tensor, torch.Tensor]:
    """(tables (D, nkv, K) int64, lens (D, nkv) int64): each (decode, kv head)'s kept blocks in
    context order, the last one the block being written, and the cached tokens they hold."""
    decodes, nkv, width = scores.shape
    forced = view.forced[:, None].expand(-1, nkv, -1)
    scores = scores.masked_fill(~view.valid[:, None], float("-inf"))
    scores = scores.masked_fill(forced, float("inf"))
    available = (scores > float("-inf")).sum(-1)
    count = torch.minimum(view.keep[:, None], available)  # (D, nkv)
    kept = top_mask(scores, count)
    widest = int(count.max())
    index = torch.where(kept, torch.arange(width), width).sort(dim=-1).values[..., :widest]
    tables = view.tables[:, None].expand(-1, nkv, -1).gather(-1, index.clamp(max=width - 1))
    tables = tables.masked_fill(index >= width, 0).contiguous()
    last_rows = view.lens - (view.num_blocks - 1) * view.block_size  # (D,)
    lens = (count - 1) * view.block_size + last_rows[:, None]
    return tables, lens.contiguous()
