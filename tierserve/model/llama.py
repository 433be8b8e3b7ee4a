"""Llama family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) over a paged KV cache.

The model knows nothing of requests: it sees token ids, positions and attention metadata for one
step. Q/K/V and gate/up projections are fused into one matmul each at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.model.arch import ModelArchConfig
from tierserve.model.layers import (
    AttentionMetadata,
    RotaryEmbedding,
    TorchPagedAttention,
    apply_rotary,
    rms_norm,
)

# Up to this many rows the native skinny kernel beats stock GEMM (measured: 2.3x at 1 row,
# 1.4x at 8, bfloat16); above it GEMM's reuse of each weight across rows wins.
SKINNY_MAX_ROWS = 8


class DecoderLayer:
    """One transformer block's weights: fused qkv, o, fused gate_up, down, two norms."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, bias: bool) -> None:
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        self.qkv_weight = torch.cat([tensors[f"{attn}{p}_proj.weight"] for p in "qkv"])
        self.qkv_bias = (torch.cat([tensors[f"{attn}{p}_proj.bias"] for p in "qkv"])
                         if bias else None)
        self.o_weight = tensors[f"{attn}o_proj.weight"]
        self.gate_up_weight = torch.cat([tensors[f"{mlp}gate_proj.weight"],
                                         tensors[f"{mlp}up_proj.weight"]])
        self.down_weight = tensors[f"{mlp}down_proj.weight"]
        self.input_norm = tensors[prefix + "input_layernorm.weight"]
        self.post_attention_norm = tensors[prefix + "post_attention_layernorm.weight"]


class LlamaModel:
    """Forward pass over flattened tokens: (T,) ids -> (T, hidden) final hidden states."""

    def __init__(self, arch: ModelArchConfig, tensors: dict[str, torch.Tensor],
                 max_positions: int, use_kernels: bool = True) -> None:
        self.arch = arch
        self.embed = tensors["model.embed_tokens.weight"]
        self.lm_head = tensors.get("lm_head.weight", self.embed)
        self.norm = tensors["model.norm.weight"]
        self.layers = [DecoderLayer(tensors, f"model.layers.{i}.", arch.attention_bias)
                       for i in range(arch.num_layers)]
        self.dtype = self.embed.dtype
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)
        self.ops = cpu_ops() if use_kernels else None
        self.attention = TorchPagedAttention(arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                             self.ops)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Block-major layout: one block's K and V for every layer are contiguous, so a group of
        neighbouring blocks moves between tiers in a single copy."""
        arch = self.arch
        return (num_blocks, arch.num_layers, 2, block_size, arch.num_kv_heads, arch.head_dim)

    def bytes_per_block(self, block_size: int) -> int:
        arch = self.arch
        elem = torch.empty((), dtype=self.dtype).element_size()
        return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        arch = self.arch
        hidden = self.embed[input_ids]  # (T, hidden)
        cos, sin = self.rotary.tables(positions, self.dtype)
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = rms_norm(hidden, layer.input_norm, arch.rms_norm_eps)
            qkv = self.linear(x, layer.qkv_weight, layer.qkv_bias)  # (T, q + 2 kv)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rotary(q.view(-1, arch.num_heads, arch.head_dim), cos, sin)
            k = apply_rotary(k.view(-1, arch.num_kv_heads, arch.head_dim), cos, sin)
            v = v.view(-1, arch.num_kv_heads, arch.head_dim)
            layer_cache = kv_cache[:, index]  # (num_blocks, 2, block_size, nkv, hd)
            attn = self.attention.forward(q, k, v, layer_cache[:, 0], layer_cache[:, 1], meta)
            hidden = residual + self.linear(attn, layer.o_weight)
            residual = hidden
            x = rms_norm(hidden, layer.post_attention_norm, arch.rms_norm_eps)
            gate, up = self.linear(x, layer.gate_up_weight).chunk(2, dim=-1)
            hidden = residual + self.linear(F.silu(gate) * up, layer.down_weight)
        return rms_norm(hidden, self.norm, arch.rms_norm_eps)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """x @ weight.T (+ bias). A few rows (decode at small batch) go through the native
        kernel, which streams the weights near memory bandwidth; more rows, stock GEMM."""
        if self.ops is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            return self.ops.skinny_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.linear(hidden, self.lm_head).float()
