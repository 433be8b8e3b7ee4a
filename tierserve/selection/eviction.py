"""Static KV eviction right after prefill: MPCache's look-once static stage and SnapKV.

While a prompt is prefilled, the queries of its last tokens (the observation window) score
every key they see (``WindowObserver``, fed by attention layer by layer; keys are read where
they lie in the paged cache). When the prefill ends, a policy keeps a number of the prompt's
tokens per layer and kv head (``keep``), ``compact`` moves the kept K/V rows to the front of the
request's own blocks, in context order, and the scheduler frees the blocks left empty. Evicted
tokens never come back; tokens generated later are appended after the kept ones. Positions are
untouched: keys were rotated (RoPE) at their true positions when written, and new tokens keep
theirs, so only the cache slot of a token moves (``ScheduledChunk.kv_offset``).

Every layer and kv head keeps the same number of tokens, which keeps one block table per
request: with a threshold (MPCache's rule) that number is the largest survivor count of any
layer, and the other layers fill up to it with their next best tokens.

Policies (``--kv-eviction``):
- ``mpcache``: the last ``kv_eviction_window`` (20%) of the prompt's queries observe (10% beyond
  24k tokens); a token's score is its attention averaged over all heads, max over the window's
  queries; the first block (sink) and the last block are always kept.
- ``snapkv``: the last ``snapkv_window`` (32) queries observe; a token's score per kv head is
  its attention summed over the window's queries and the kv head's query heads, max-pooled over
  ``snapkv_pool`` (7) neighbours; the window itself is always kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.config import SelectionConfig
from tierserve.selection.budget import kept_after_eviction, mpcache_window

SCORE_ROWS = 256  # at most this many window queries scored at once
SCORE_ELEMENTS = 1 << 24  # and at most this many (heads x rows x context) float32 scores


class WindowObserver:
    """One request's token scores from its observation window, accumulated per layer.

    ``scores``: (layers, 1 or kv heads, prompt length) float32. ``reduce`` is ``"max"`` (each
    token keeps the most any window query gave it, averaged over heads) or ``"sum"`` (per kv
    head, summed over the window's queries and the head group)."""

    def __init__(self, num_layers: int, num_kv_heads: int, length: int, reduce: str) -> None:
        self.reduce = reduce
        self.scores = torch.zeros(num_layers, 1 if reduce == "max" else num_kv_heads, length)

    def add(self, layer: int, q: torch.Tensor, keys: torch.Tensor, q_slots: torch.Tensor,
            scale: float) -> None:
        """q: (w, nh, hd) window queries; keys: (nkv, ctx, hd) every key of the context so far;
        q_slots: (w,) int64, each query sees the keys up to its own slot (causal)."""
        nkv, ctx, head_dim = keys.shape
        group = q.shape[1] // nkv
        k = keys.float()
        scores = self.scores[layer, :, :ctx]
        step = max(1, min(SCORE_ROWS, SCORE_ELEMENTS // max(1, q.shape[1] * ctx)))
        columns = torch.arange(ctx)
        for first in range(0, q.shape[0], step):
            slots = q_slots[first:first + step]
            rows = (q[first:first + step].float() * scale).view(-1, nkv, group, head_dim)
            logits = torch.einsum("rhgd,hcd->hgrc", rows, k)  # (nkv, G, r, ctx)
            # only keys after the earliest query's slot can be hidden from some query
            lo = int(slots.min()) + 1
            if lo < ctx:
                hidden = columns[None, lo:] > slots[:, None]
                logits[..., lo:].masked_fill_(hidden, float("-inf"))
            # softmax in place: the (heads, rows, ctx) block is the largest tensor here
            logits.sub_(logits.amax(-1, keepdim=True)).exp_()
            logits.div_(logits.sum(-1, keepdim=True))
            if self.reduce == "max":
                torch.maximum(scores[0], logits.mean((0, 1)).amax(0), out=scores[0])
            else:
                scores += logits.sum((1, 2))


class StaticEviction:
    """Which prompt tokens survive the prefill: the window that observes, and the cut."""

    name = "none"
    reduce = "max"

    def __init__(self, config: SelectionConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size

    def window(self, length: int) -> int:
        """How many of the prompt's last queries observe."""
        raise NotImplementedError

    def observer(self, num_layers: int, num_kv_heads: int, length: int) -> WindowObserver:
        return WindowObserver(num_layers, num_kv_heads, length, self.reduce)

    def forced(self, length: int) -> torch.Tensor:
        """(length,) bool: tokens always kept."""
        raise NotImplementedError

    def token_scores(self, observer: WindowObserver) -> torch.Tensor:
        return observer.scores

    def keep(self, observer: WindowObserver, length: int) -> torch.Tensor:
        """(layers, 1 or kv heads, r) int64: the kept slots of each layer (and kv head), in
        context order; the same r everywhere."""
        scores = self.token_scores(observer)[..., :length]
        forced = self.forced(length)
        threshold = self.config.kv_eviction_threshold
        if threshold is not None:
            survivors = (scores >= threshold) | forced
            count = int(survivors.sum(-1).max())
        else:
            count = kept_after_eviction(self.config.kv_eviction_budget, length,
                                        int(forced.sum()))
        count = min(length, max(count, int(forced.sum())))
        ranked = scores.masked_fill(forced, float("inf"))
        return ranked.topk(count, dim=-1).indices.sort(dim=-1).values


class MPCacheStatic(StaticEviction):
    name = "mpcache"
    reduce = "max"

    def window(self, length: int) -> int:
        return mpcache_window(self.config.kv_eviction_window, length)

    def forced(self, length: int) -> torch.Tensor:
        index = torch.arange(length)
        sink = self.config.kv_sink_blocks * self.block_size
        return (index < sink) | (index >= length - self.block_size)


class SnapKV(StaticEviction):
    name = "snapkv"
    reduce = "sum"

    def window(self, length: int) -> int:
        return min(length, self.config.snapkv_window)

    def forced(self, length: int) -> torch.Tensor:
        return torch.arange(length) >= length - self.window(length)

    def token_scores(self, observer: WindowObserver) -> torch.Tensor:
        kernel = self.config.snapkv_pool
        scores = observer.scores
        if kernel <= 1:
            return scores
        return F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)[..., :scores.shape[-1]]


EVICTIONS: dict[str, type[StaticEviction]] = {cls.name: cls for cls in (MPCacheStatic, SnapKV)}


def make_eviction(config: SelectionConfig, block_size: int) -> StaticEviction | None:
    """The static stage ``config.kv_eviction`` names, or None."""
    if config.kv_eviction == "none":
        return None
    return EVICTIONS[config.kv_eviction](config, block_size)


def compact(kv_cache: torch.Tensor, table: list[int], kept: torch.Tensor, block_size: int,
            key_bounds: bool) -> int:
    """Move each layer's and kv head's kept rows to slots 0..r-1 of the request's blocks, in
    place; returns r. With key bounds, the bounds of the blocks now holding them are recomputed.

    kv_cache: (num_blocks, layers, 2, nkv, rows, hd), the runner's block-major cache; table: the
    request's blocks in slot order; kept: (layers, 1 or nkv, r) int64 sorted slots. Rows past r
    keep stale data no length ever reaches (the next token is written at slot r)."""
    layers, _, count = kept.shape
    nkv = kv_cache.shape[3]
    kept = kept.expand(layers, nkv, count)
    blocks = torch.as_tensor(table, dtype=torch.int64)
    layer_index = torch.arange(layers).view(-1, 1, 1)
    head_index = torch.arange(nkv).view(1, -1, 1)
    target = torch.arange(count).expand(layers, nkv, count)
    moved = kv_cache[blocks[kept // block_size], layer_index, :, head_index, kept % block_size]
    kv_cache[blocks[target // block_size], layer_index, :, head_index,
             target % block_size] = moved  # (layers, nkv, r, 2, hd), read whole before written
    if key_bounds:
        used = blocks[: -(-count // block_size)]
        fill = torch.clamp(count - torch.arange(used.numel()) * block_size, max=block_size)
        keys = kv_cache[used, :, 0, :, :block_size]  # (U, layers, nkv, block_size, hd)
        empty = (torch.arange(block_size)[None, :] >= fill[:, None]).view(-1, 1, 1, block_size, 1)
        kv_cache[used, :, 0, :, block_size] = keys.masked_fill(empty, float("-inf")).amax(3)
        kv_cache[used, :, 1, :, block_size] = keys.masked_fill(empty, float("inf")).amin(3)
    return count
