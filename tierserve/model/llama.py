"""Llama family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) over a paged KV cache.

The model knows nothing of requests: it sees token ids, positions and attention metadata for one
step. Q/K/V and gate/up projections are fused into one matmul each at load time.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops, onednn_bf16_supported
from tierserve.model.arch import ModelArchConfig
from tierserve.model.layers import (
    AttentionMetadata,
    RotaryEmbedding,
    TorchPagedAttention,
    apply_rotary,
    rms_norm,
)

# Up to this many rows the native skinny kernel beats the GEMMs (measured on SmolLM2's shapes,
# bfloat16: 9.9 vs 14.5 ms of linears a step at 1 row, 12.8 vs 15.5 at 4, 19.0 vs 16.4 at 8).
SKINNY_MAX_ROWS = 4


def _pack_enabled() -> bool:
    return os.environ.get("TIERSERVE_PACK_WEIGHTS", "1").lower() not in ("0", "false", "no", "off")


class Linear:
    """y = x @ weight.T (+ bias), by the fastest path for the number of rows.

    A few rows (decode at small batch) go through the native skinny kernel, which streams the
    weight near memory bandwidth. More rows use GEMM: for bfloat16, oneDNN on a weight reordered
    once into its blocked layout (bitwise equal to F.linear, 1.1-1.7x faster here; costs a second
    copy of the weight); otherwise F.linear.
    """

    __slots__ = ("weight", "bias", "packed", "ops")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ops, pack: bool) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.ops = ops
        self.packed = None
        if (pack and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
                and onednn_bf16_supported()):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.ops is not None and rows <= SKINNY_MAX_ROWS:
            return self.ops.skinny_linear(x, self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class DecoderLayer:
    """One transformer block's weights: fused qkv, o, fused gate_up, down, two norms."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, bias: bool, ops,
                 pack: bool) -> None:
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        self.qkv = Linear(torch.cat([tensors[f"{attn}{p}_proj.weight"] for p in "qkv"]),
                          torch.cat([tensors[f"{attn}{p}_proj.bias"] for p in "qkv"])
                          if bias else None, ops, pack)
        self.o = Linear(tensors[f"{attn}o_proj.weight"], None, ops, pack)
        self.gate_up = Linear(torch.cat([tensors[f"{mlp}gate_proj.weight"],
                                         tensors[f"{mlp}up_proj.weight"]]), None, ops, pack)
        self.down = Linear(tensors[f"{mlp}down_proj.weight"], None, ops, pack)
        self.input_norm = tensors[prefix + "input_layernorm.weight"]
        self.post_attention_norm = tensors[prefix + "post_attention_layernorm.weight"]


class LlamaModel:
    """Forward pass over flattened tokens: (T,) ids -> (T, hidden) final hidden states."""

    def __init__(self, arch: ModelArchConfig, tensors: dict[str, torch.Tensor],
                 max_positions: int, use_kernels: bool = True) -> None:
        self.arch = arch
        self.max_positions = max_positions
        self.embed = tensors["model.embed_tokens.weight"]
        self.ops = cpu_ops() if use_kernels else None
        pack = _pack_enabled()
        self.lm_head = Linear(tensors.get("lm_head.weight", self.embed), None, self.ops, pack)
        self.norm = tensors["model.norm.weight"]
        self.layers = [DecoderLayer(tensors, f"model.layers.{i}.", arch.attention_bias,
                                    self.ops, pack) for i in range(arch.num_layers)]
        self.dtype = self.embed.dtype
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)
        self.attention = TorchPagedAttention(arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                             self.ops)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Block-major layout: one block's K and V for every layer are contiguous, so a group of
        neighbouring blocks moves between tiers in a single copy. Inside a block, head-major:
        one kv head's rows are contiguous, so decode attention streams them front to back."""
        arch = self.arch
        return (num_blocks, arch.num_layers, 2, arch.num_kv_heads, block_size, arch.head_dim)

    def bytes_per_block(self, block_size: int) -> int:
        arch = self.arch
        elem = torch.empty((), dtype=self.dtype).element_size()
        return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.ops is not None:
            return self._forward_fused(input_ids, positions, kv_cache, meta)
        arch = self.arch
        hidden = self.embed[input_ids]  # (T, hidden)
        cos, sin = self.rotary.tables(positions, self.dtype)
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = rms_norm(hidden, layer.input_norm, arch.rms_norm_eps)
            qkv = layer.qkv(x)  # (T, q + 2 kv)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rotary(q.view(-1, arch.num_heads, arch.head_dim), cos, sin)
            k = apply_rotary(k.view(-1, arch.num_kv_heads, arch.head_dim), cos, sin)
            v = v.view(-1, arch.num_kv_heads, arch.head_dim)
            # (num_blocks, 2, nkv, block_size, hd), seen by attention as (blocks, offset, head, hd)
            layer_cache = kv_cache[:, index].transpose(2, 3)
            attn = self.attention.forward(q, k, v, layer_cache[:, 0], layer_cache[:, 1], meta)
            hidden = residual + layer.o(attn)
            residual = hidden
            x = rms_norm(hidden, layer.post_attention_norm, arch.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = residual + layer.down(F.silu(gate) * up)
        return rms_norm(hidden, self.norm, arch.rms_norm_eps)

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``forward`` with the native element-wise kernels: each residual add is fused into
        the norm after it, rotary is applied in place on the qkv output, SiLU into its product.
        Same roundings as the torch ops (bfloat16 bitwise; float32 to the last bit of a sum)."""
        arch, ops, eps = self.arch, self.ops, self.arch.rms_norm_eps
        cos, sin = self.rotary.tables(positions, self.dtype)
        cos, sin = cos[:, 0], sin[:, 0]  # (T, head_dim)
        rotated_heads = arch.num_heads + arch.num_kv_heads  # q then k lead each qkv row
        x, hidden = ops.add_rms_norm(self.embed[input_ids], None, self.layers[0].input_norm, eps)
        norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        for index, (layer, next_norm) in enumerate(zip(self.layers, norms)):
            qkv = layer.qkv(x)
            ops.rotary_(qkv, cos, sin, rotated_heads, arch.head_dim)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            layer_cache = kv_cache[:, index].transpose(2, 3)
            attn = self.attention.forward(q.view(-1, arch.num_heads, arch.head_dim),
                                          k.view(-1, arch.num_kv_heads, arch.head_dim),
                                          v.view(-1, arch.num_kv_heads, arch.head_dim),
                                          layer_cache[:, 0], layer_cache[:, 1], meta)
            x, hidden = ops.add_rms_norm(layer.o(attn), hidden, layer.post_attention_norm, eps)
            x, hidden = ops.add_rms_norm(layer.down(ops.silu_mul(layer.gate_up(x))), hidden,
                                         next_norm, eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()
