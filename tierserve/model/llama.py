"""Llama family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) over a paged KV cache.

The model knows nothing of requests: it sees token ids, positions and attention metadata for one
step. Q/K/V and gate/up projections are fused into one matmul each at load time.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops, onednn_bf16_supported, quant_ops
from tierserve.model.arch import ModelArchConfig
from tierserve.model.layers import (
    AttentionMetadata,
    RotaryEmbedding,
    TorchPagedAttention,
    apply_rotary,
    rms_norm,
)
from tierserve.model.moe import DenseMLP, MoEBlock
from tierserve.model.packed import PackedWeight, concat_rows

# Up to this many rows the native skinny kernel beats the GEMMs (measured on SmolLM2's shapes,
# bfloat16: 9.9 vs 14.5 ms of linears a step at 1 row, 12.8 vs 15.5 at 4, 19.0 vs 16.4 at 8).
SKINNY_MAX_ROWS = 4
# From this many rows packed weights are dequantized (natively, ~2 ms a layer here) for a float
# GEMM instead of the integer kernel, unless the runner keeps rows batch-invariant (float32).
# SmolLM2's 30 layers of Q4_1 linears, float32, AMD Zen 3, 2 threads: integer 233 vs
# dequantize+GEMM 255 ms at 64 rows, 977 vs 753 ms at 256.
PACKED_GEMM_ROWS = 128


def _pack_enabled() -> bool:
    return os.environ.get("TIERSERVE_PACK_WEIGHTS", "1").lower() not in ("0", "false", "no", "off")


class Linear:
    """y = x @ weight.T (+ bias), by the fastest path for the number of rows.

    A few rows (decode at small batch) go through the native skinny kernel, which streams the
    weight near memory bandwidth. More rows use GEMM: for bfloat16, oneDNN on a weight reordered
    once into its blocked layout (bitwise equal to F.linear, 1.1-1.7x faster here; costs a second
    copy of the weight); otherwise F.linear. A PackedWeight (--quantization) goes through the
    packed kernel (int8 activations; a row's result does not depend on the batch) below
    ``gemm_rows`` rows, and from there is dequantized for a float GEMM (rounding differently;
    None: never, what batch-invariant float32 sets); without the kernel it is dequantized for
    every call.
    """

    __slots__ = ("weight", "bias", "packed", "ops", "quant", "gemm_rows", "kernel_args")

    def __init__(self, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None, ops,
                 pack: bool) -> None:
        self.bias = bias
        self.ops = ops
        self.packed = None
        self.quant = None
        self.gemm_rows = PACKED_GEMM_ROWS
        self.kernel_args = None
        if isinstance(weight, PackedWeight):
            self.weight = weight
            self.quant = quant_ops()
            self.kernel_args = weight.kernel_args()  # once: a PackedWeight is frozen
            return
        self.weight = weight.contiguous()
        if (pack and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
                and onednn_bf16_supported()):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, PackedWeight):
            return self._packed(x)
        rows = x.shape[0]
        if self.ops is not None and rows <= SKINNY_MAX_ROWS:
            return self.ops.skinny_linear(x, self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.quant is None:
            return F.linear(x, weight.dequantize(x.dtype), self.bias)
        if self.gemm_rows is not None and x.shape[0] >= self.gemm_rows:  # prefill-sized
            dense = self.quant.packed_dequantize(*self.kernel_args)
            return F.linear(x, dense.to(x.dtype), self.bias)
        # The kernel takes and gives float32: a float32 model's x and result need no casts.
        float32 = x.dtype == torch.float32
        out = self.quant.packed_linear(x if float32 else x.float(), *self.kernel_args)
        if self.bias is not None:
            out += self.bias
        return out if float32 else out.to(x.dtype)


class DecoderLayer:
    """One transformer block's weights: fused qkv, o, two norms, optional q/k norms, and the
    feed-forward part (a DenseMLP, or a MoEBlock on the MoE layers of an MoE model)."""

    def __init__(self, tensors: dict[str, torch.Tensor], index: int, arch: ModelArchConfig,
                 ops, pack: bool) -> None:
        prefix = f"model.layers.{index}."
        attn, mlp = prefix + "self_attn.", prefix + "mlp."

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, ops, pack)

        self.qkv = linear(concat_rows([tensors[f"{attn}{p}_proj.weight"] for p in "qkv"]),
                          torch.cat([tensors[f"{attn}{p}_proj.bias"] for p in "qkv"])
                          if arch.attention_bias else None)
        self.o = linear(tensors[f"{attn}o_proj.weight"])
        self.q_norm = tensors.get(f"{attn}q_norm.weight")  # qk_norm models: (head_dim,) or
        self.k_norm = tensors.get(f"{attn}k_norm.weight")  # (projection width,)
        self.input_norm = tensors[prefix + "input_layernorm.weight"]
        self.post_attention_norm = tensors[prefix + "post_attention_layernorm.weight"]
        self.mlp = _feed_forward(tensors, mlp, arch, index, linear)

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o, *self.mlp.linears()]


def _feed_forward(tensors: dict[str, torch.Tensor], prefix: str, arch: ModelArchConfig,
                  index: int, linear) -> DenseMLP | MoEBlock:
    def dense(name: str) -> DenseMLP:
        return DenseMLP(*(tensors[f"{prefix}{name}{p}_proj.weight"] for p in ("gate", "up", "down")),
                        linear)

    if not arch.is_moe_layer(index):
        return dense("")
    # Offloaded experts are not among the tensors: the block gets them from its provider.
    offloaded = f"{prefix}experts.0.gate_proj.weight" not in tensors
    experts = None if offloaded else [dense(f"experts.{e}.") for e in range(arch.num_experts)]
    shared = dense("shared_expert.") if arch.shared_expert_intermediate_size else None
    return MoEBlock(tensors[f"{prefix}gate.weight"], experts, arch.num_experts_per_tok,
                    arch.norm_topk_prob, arch.route_weights_float32, shared,
                    tensors.get(f"{prefix}shared_expert_gate.weight"), layer_index=index,
                    unit_weights=arch.unit_expert_weights)


class LlamaModel:
    """Forward pass over flattened tokens: (T,) ids -> (T, hidden) final hidden states."""

    def __init__(self, arch: ModelArchConfig, tensors: dict[str, torch.Tensor],
                 max_positions: int, use_kernels: bool = True) -> None:
        self.arch = arch
        self.max_positions = max_positions
        self.embed = tensors["model.embed_tokens.weight"]  # a tensor, or a PackedWeight
        self.ops = cpu_ops() if use_kernels else None
        pack = _pack_enabled()
        self.lm_head = Linear(tensors.get("lm_head.weight", self.embed), None, self.ops, pack)
        self.norm = tensors["model.norm.weight"]
        self.layers = [DecoderLayer(tensors, i, arch, self.ops, pack)
                       for i in range(arch.num_layers)]
        self.dtype = self.norm.dtype  # the compute dtype (the embedding may be packed)
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)
        # The fused forward's kernels: the AVX-512 module's, or on an AVX2-only CPU in float32
        # the AVX2 module (quant.cpp: paged decode attention, and elementwise.cpp's norm, rotary
        # and SiLU in their scalar loops, one call each instead of several torch ops); None:
        # plain torch ops.
        self.fused_ops = self.ops or (quant_ops() if use_kernels and self.dtype == torch.float32
                                      else None)
        self.attention = TorchPagedAttention(arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                             self.fused_ops)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        # _layer_caches' views, made for one cache tensor (and its key_bounds) at a time.
        self._cache_views: tuple[torch.Tensor, tuple, list] | None = None

    @property
    def native_decode(self) -> bool:
        """Decodes go to a native attention kernel as one batch (the AVX-512 module's, or the
        AVX2 one's)."""
        return self.attention.ops is not None

    def linears(self) -> list[Linear]:
        """Every layer's linears, then the head."""
        return [*(lin for layer in self.layers for lin in layer.linears()), self.lm_head]

    def packed_throughout(self) -> bool:
        """Every linear, the head included, runs a PackedWeight through the packed kernel."""
        return all(isinstance(lin.weight, PackedWeight) and lin.quant is not None
                   for lin in self.linears())

    def keep_packed_rows_invariant(self) -> None:
        """Packed linears take the integer kernel at every row count: the float GEMM they
        otherwise switch to from PACKED_GEMM_ROWS rows rounds differently, so a request's rows
        would depend on how many others share its step."""
        for linear in self.linears():
            linear.gemm_rows = None

    def kv_cache_shape(self, num_blocks: int, block_size: int,
                       key_bounds: bool = False) -> tuple[int, ...]:
        """Block-major layout: one block's K and V for every layer are contiguous, so a group of
        neighbouring blocks moves between tiers in a single copy. Inside a block, head-major:
        one kv head's rows are contiguous, so decode attention streams them front to back.
        ``key_bounds``: one more row per half holds the block's key max (K) and min (V), which
        KV selection reads (tierserve/selection/bounds.py); they travel with the block."""
        arch = self.arch
        rows = block_size + (1 if key_bounds else 0)
        return (num_blocks, arch.num_layers, 2, arch.num_kv_heads, rows, arch.head_dim)

    def bytes_per_block(self, block_size: int, key_bounds: bool = False) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return math.prod(self.kv_cache_shape(1, block_size, key_bounds)) * elem

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.fused_ops is not None:
            return self._forward_fused(input_ids, positions, kv_cache, meta)
        arch = self.arch
        hidden = self._embed(input_ids)  # (T, hidden)
        cos, sin = self.rotary.tables(positions, self.dtype)
        layer_caches = self._layer_caches(kv_cache, meta.key_bounds)
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = rms_norm(hidden, layer.input_norm, arch.rms_norm_eps)
            qkv = self._normed_qkv(layer, layer.qkv(x))  # (T, q + 2 kv)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rotary(q.view(-1, arch.num_heads, arch.head_dim), cos, sin)
            k = apply_rotary(k.view(-1, arch.num_kv_heads, arch.head_dim), cos, sin)
            v = v.view(-1, arch.num_kv_heads, arch.head_dim)
            k_cache, v_cache, bounds = layer_caches[index]
            attn = self.attention.forward(q, k, v, k_cache, v_cache, meta, index, bounds)
            hidden = residual + layer.o(attn)
            residual = hidden
            x = rms_norm(hidden, layer.post_attention_norm, arch.rms_norm_eps)
            hidden = residual + layer.mlp(x, None, meta.num_tokens)
        return rms_norm(hidden, self.norm, arch.rms_norm_eps)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, PackedWeight):
            return self.embed.embed(input_ids, self.dtype)
        return self.embed[input_ids]

    def _layer_caches(self, kv_cache: torch.Tensor, key_bounds: bool) -> list[tuple]:
        """Every layer's ``_layer_cache(kv_cache, index, key_bounds)``, made once per cache
        tensor rather than per layer and step (views cost several torch calls each).

        NOTE: kept until a forward passes another cache, another key_bounds, or this tensor with
        other storage or shape (``set_``, ``resize_``): the views hold its memory until then."""
        key = (kv_cache.data_ptr(), kv_cache.shape, key_bounds)
        if self._cache_views is None or self._cache_views[0] is not kv_cache or \
                self._cache_views[1] != key:
            views = [self._layer_cache(kv_cache, index, key_bounds)
                     for index in range(len(self.layers))]
            self._cache_views = (kv_cache, key, views)
        return self._cache_views[2]

    @staticmethod
    def _layer_cache(kv_cache: torch.Tensor, index: int, key_bounds: bool):
        """Layer ``index``'s (K cache, V cache, bounds) as attention sees them: caches
        (blocks, offset, head, hd), bounds None or (key max, key min) each (blocks, head, hd),
        all views of the block-major cache."""
        # (num_blocks, 2, nkv, rows, hd) -> (num_blocks, 2, rows, nkv, hd)
        layer_cache = kv_cache[:, index].transpose(2, 3)
        if not key_bounds:
            return layer_cache[:, 0], layer_cache[:, 1], None
        return (layer_cache[:, 0, :-1], layer_cache[:, 1, :-1],
                (layer_cache[:, 0, -1], layer_cache[:, 1, -1]))

    def _normed_qkv(self, layer: DecoderLayer, qkv: torch.Tensor) -> torch.Tensor:
        """q and k RMS-normed (per head, or over the whole projection) and q, k, v clipped, as
        the checkpoint's family does; for most families ``qkv`` unchanged."""
        arch = self.arch
        if not arch.qk_norm and arch.clip_qkv is None:
            return qkv
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if arch.qk_norm == "head":
            q = rms_norm(q.reshape(-1, arch.num_heads, arch.head_dim), layer.q_norm,
                         arch.rms_norm_eps).flatten(1)
            k = rms_norm(k.reshape(-1, arch.num_kv_heads, arch.head_dim), layer.k_norm,
                         arch.rms_norm_eps).flatten(1)
        elif arch.qk_norm == "full":
            q = rms_norm(q, layer.q_norm, arch.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, arch.rms_norm_eps)
        qkv = torch.cat([q, k, v], dim=-1)
        if arch.clip_qkv is not None:
            qkv = qkv.clamp(-arch.clip_qkv, arch.clip_qkv)
        return qkv

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``forward`` with the native element-wise kernels: each residual add is fused into
        the norm after it, rotary is applied in place on the qkv output, SiLU into its product.
        Same roundings as the torch ops (bfloat16 bitwise; float32 to the last bit of a sum)."""
        arch, ops, eps = self.arch, self.fused_ops, self.arch.rms_norm_eps
        cos, sin = self.rotary.tables(positions, self.dtype)
        cos, sin = cos[:, 0], sin[:, 0]  # (T, head_dim)
        rotated_heads = arch.num_heads + arch.num_kv_heads  # q then k lead each qkv row
        heads = [arch.num_heads, arch.num_kv_heads, arch.num_kv_heads]  # q, k, v in a qkv row
        qkv_heads = sum(heads)
        x, hidden = ops.add_rms_norm(self._embed(input_ids), None, self.layers[0].input_norm, eps)
        norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        layer_caches = self._layer_caches(kv_cache, meta.key_bounds)
        for index, (layer, next_norm) in enumerate(zip(self.layers, norms)):
            qkv = self._normed_qkv(layer, layer.qkv(x))
            ops.rotary_(qkv, cos, sin, rotated_heads, arch.head_dim)
            # (T, nh + 2 nkv, hd) split by heads: q (T, nh, hd), k and v (T, nkv, hd)
            q, k, v = qkv.view(-1, qkv_heads, arch.head_dim).split(heads, dim=1)
            k_cache, v_cache, bounds = layer_caches[index]
            attn = self.attention.forward(q, k, v, k_cache, v_cache, meta, index, bounds)
            x, hidden = ops.add_rms_norm(layer.o(attn), hidden, layer.post_attention_norm, eps)
            x, hidden = ops.add_rms_norm(layer.mlp(x, ops, meta.num_tokens), hidden,
                                         next_norm, eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()
