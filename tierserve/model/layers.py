"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, gated MLP, paged attention.

Attention reads and writes K/V through block tables. ``TorchPagedAttention`` is the CPU
implementation (torch SDPA over gathered blocks); a GPU kernel can replace it behind the same
``forward(q, k, v, layer_cache, meta)`` interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tierserve.selection.step import attend_selected


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, exactly as HF Llama does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) with the checkpoint's scaling applied, as HF computes."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_positions``, in float32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, head_dim)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, head_dim) cos and sin for these positions, in ``dtype``."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); HF's rotate_half convention (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens live in the paged cache and which keys each query sees.

    Tokens are laid out request by request: ``num_tokens`` real rows, maybe followed by padding.
    Single-token queries ("decodes") are attended together in buckets of similar context length
    (so one long request does not make every short one gather its padding); longer chunks one by
    one.
    """

    num_tokens: int  # real tokens (rows past this are padding)
    slot_blocks: torch.Tensor  # (num_tokens,) block id of each token's K/V slot
    slot_offsets: torch.Tensor  # (num_tokens,) offset inside that block
    # Decode buckets, each (rows (B,), block tables (B, max_blocks) padded with block 0,
    # mask (B, 1, 1, max_blocks * block_size) True where a key is visible). Torch path only.
    decode_buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # Chunks of several tokens: (first row, number of rows, context length, block table).
    chunks: list[tuple[int, int, int, torch.Tensor]]
    chunk_masks: list[torch.Tensor]  # each (q_len, ctx_len), causal with an offset
    # All decodes at once for the native kernel: rows (B,), block tables (B, max_blocks) int64,
    # context lengths (B,) int64. None on the torch path or when there are no decodes.
    decodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    all_decodes: bool = False  # every real row is a decode (rows 0..num_tokens-1, in order)
    # KV selection (tierserve.selection.step.StepSelection) when a policy is set or the cache
    # holds key bounds; None otherwise.
    selection: object | None = None
    key_bounds: bool = False  # each block has one more row per half: key max (K), min (V)
    # Static eviction's observation window: chunk index -> (first observing row in the chunk,
    # tierserve.selection.eviction.WindowObserver); those queries score every key they see.
    observe: dict = field(default_factory=dict)


class TorchPagedAttention:
    """Paged attention: decodes through the native kernel (in place over block tables) when it
    is built, else gathered and run through SDPA in length buckets; chunks of several tokens
    always gather their blocks and run SDPA with GQA."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ops=None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.ops = ops  # the model's fused_ops (kernels.cpu_ops() or quant_ops()) or None
        # Fused shared-prefix decode attention for groups sharing at least this many leading
        # blocks (bfloat16, native kernel; 0: off). Set by the ModelRunner from the block size.
        self.shared_prefix_blocks = 0
        # Depths of the batch's prefix tree fused (a system prompt, then each template...).
        self.shared_prefix_levels = 8

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                layer: int = 0, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """q: (T, nh, hd); k, v: (T, nkv, hd); caches: (num_blocks, block_size, nkv, hd);
        bounds: this layer's (key max, key min), each (num_blocks, nkv, hd), when kept.

        Writes this step's K/V (and their blocks' key bounds) into the cache in place, returns
        (T, nh * hd). With a KV-selection policy, decodes attend only to the blocks it picks.
        """
        n = meta.num_tokens
        self.store(k, v, k_cache, v_cache, meta)
        selection, picked = meta.selection, None
        if selection is not None:
            if bounds is not None:
                selection.write_bounds(k_cache, *bounds)
            picked = selection.pick(layer, q, self.num_kv_heads, *(bounds or (None, None)))
        decoded = None
        if picked is not None:  # decodes over the blocks the policy picked, per kv head
            rows = selection.rows
            decoded = self.decode_over(self._decode_queries(q, meta, rows), k_cache, v_cache,
                                       *picked)
        elif meta.decodes is not None:  # native kernel, every block
            rows, tables, lens = meta.decodes
            decoded = self.decode_over(self._decode_queries(q, meta, rows), k_cache, v_cache,
                                       tables, lens)
        if decoded is not None and meta.all_decodes and n == q.shape[0]:
            return decoded.flatten(1)
        out = torch.zeros_like(q)
        if decoded is not None:
            out[rows] = decoded
        if picked is None:  # torch path: decodes in length buckets
            for rows, tables, mask in meta.decode_buckets:
                out[rows] = self._decode(q[rows], k_cache, v_cache, tables, mask)
        for index, ((start, length, ctx_len, table), mask) in enumerate(
                zip(meta.chunks, meta.chunk_masks)):
            out[start : start + length] = self._chunk(
                q[start : start + length], k_cache, v_cache, table, ctx_len, mask
            )
            if index in meta.observe:
                first, observer = meta.observe[index]
                keys = self._gather(k_cache, table[None])[0, :, :ctx_len]
                slots = torch.arange(ctx_len - length + first, ctx_len)
                observer.add(layer, q[start + first : start + length], keys, slots, self.scale)
        return out.flatten(1)

    def store(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """This step's K/V rows (the first ``meta.num_tokens`` of k and v, (T, nkv, hd)) into
        their slots of the caches, in place: the native ``store_kv_`` where the kernel module
        has it (one call, no index bookkeeping; the same bits), else ``index_put_``."""
        store_kv = getattr(self.ops, "store_kv_", None)
        if store_kv is not None:
            store_kv(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_offsets)
            return
        n = meta.num_tokens
        k_cache[meta.slot_blocks, meta.slot_offsets] = k[:n]
        v_cache[meta.slot_blocks, meta.slot_offsets] = v[:n]

    @staticmethod
    def _decode_queries(q: torch.Tensor, meta: AttentionMetadata,
                        rows: torch.Tensor) -> torch.Tensor:
        """The decodes' queries: the first num_tokens rows when every real row is a decode (q
        itself when there is no padding), else rows ``rows``."""
        if not meta.all_decodes:
            return q[rows]
        return q if q.shape[0] == meta.num_tokens else q[:meta.num_tokens]

    def decode_over(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """One query per sequence, (B, nh, hd), in place over block tables: (B, W) with lens
        (B,), or per kv head (B, nkv, W) with lens (B, nkv). The native kernel where built,
        else the torch reference (which gathers the blocks)."""
        if self.ops is not None:
            if self.shared_prefix_blocks and q.dtype == torch.bfloat16 and tables.dim() == 2:
                return self.ops.paged_decode_attention_shared(q, k_cache, v_cache, tables, lens,
                                                              self.scale,
                                                              self.shared_prefix_blocks,
                                                              self.shared_prefix_levels)
            return self.ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, self.scale)
        if tables.dim() == 2:
            tables = tables[:, None].expand(-1, self.num_kv_heads, -1)
            lens = lens[:, None].expand(-1, self.num_kv_heads)
        return attend_selected(q, k_cache, v_cache, tables, lens, self.scale)

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        # (B, max_blocks) -> (B, nkv, max_blocks * block_size, hd)
        blocks = cache[tables]  # (B, max_blocks, block_size, nkv, hd)
        return blocks.flatten(1, 2).transpose(1, 2)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = self._gather(k_cache, tables)
        values = self._gather(v_cache, tables)
        query = q.unsqueeze(2)  # (B, nh, 1, hd)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)
        return out.squeeze(2)  # (B, nh, hd)

    def _chunk(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               table: torch.Tensor, ctx_len: int, mask: torch.Tensor) -> torch.Tensor:
        keys = self._gather(k_cache, table[None])[:, :, :ctx_len]
        values = self._gather(v_cache, table[None])[:, :, :ctx_len]
        query = q.transpose(0, 1).unsqueeze(0)  # (1, nh, q_len, hd)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)  # (q_len, nh, hd)
