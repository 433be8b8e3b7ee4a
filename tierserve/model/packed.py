"""Packed quantized weights (GGML Q8_0, Q4_0, Q4_1 blocks) kept packed in memory, and their linear.

A ``PackedWeight`` holds a (n, k) matrix as blocks of 32 weights along k, each block a float16
scale (and, for Q4_1, a float16 minimum) and its 32 quantized values, exactly as a GGUF file
stores them, split into three arrays. It is made either from a GGUF tensor's bytes (no
dequantization: ``from_gguf_bytes``) or by quantizing a float weight at load (``quantize``, the
rounding rules of ggml's reference quantizers).

``PackedLinear`` computes ``x @ w.T`` from the packed form as llama.cpp does: each row of x is
quantized per block of 32 to int8 with a float scale, blocks are multiplied in integers, and
the block sums are scaled and added in float32. The native kernel (kernels/quant.cpp, AVX2) does
this; without it, ``emulated_linear`` does the same arithmetic in torch (slow, for tests and
CPUs without AVX2).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along the input dimension


class QuantType(Enum):
    """A packed block format: its name as GGUF and ``--quantization`` spell it."""

    Q8_0 = "q8_0"  # w = d * q, q int8 in [-127, 127]
    Q4_0 = "q4_0"  # w = d * (q - 8), q in [0, 15]
    Q4_1 = "q4_1"  # w = d * q + m, q in [0, 15]

    @property
    def quant_bytes(self) -> int:
        """Bytes of quantized values per block of 32."""
        return 32 if self is QuantType.Q8_0 else 16

    @property
    def has_min(self) -> bool:
        return self is QuantType.Q4_1

    @property
    def bytes_per_block(self) -> int:
        """Bytes per block as GGUF stores it: the float16 scale (and min), then the values."""
        return self.quant_bytes + (4 if self.has_min else 2)


# The packed kernel's format codes (kernels/quant.cpp's Kind).
KERNEL_CODES = {QuantType.Q8_0: 0, QuantType.Q4_0: 1, QuantType.Q4_1: 2}

# The weights a packed model keeps packed, by HF name: every linear of attention and the MLP,
# the head and the embedding. Norms, biases and MoE routers stay float.
PACKABLE = re.compile(r"(^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight"
                      r"|^lm_head\.weight|^model\.embed_tokens\.weight)$")

# Precision order when rows of different formats are joined into one matrix (fused qkv).
_PRECISION = [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q8_0]


@dataclass(slots=True)
class PackedWeight:
    """A (n, k) weight as blocks: ``quants`` (n, k / 32, 32) int8 for Q8_0 or (n, k / 32, 16)
    uint8 for Q4 (element i of a block in the low nibble of byte i, element i + 16 in its high
    nibble, GGML's layout); ``scales`` and ``mins`` (n, k / 32) float16."""

    qtype: QuantType
    quants: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, blocks, width = self.quants.shape
        if width != self.qtype.quant_bytes or self.scales.shape != (n, blocks):
            raise ValueError(f"{self.qtype.name} blocks: quants {tuple(self.quants.shape)} and "
                             f"scales {tuple(self.scales.shape)} do not fit")
        if self.qtype.has_min != (self.mins is not None):
            raise ValueError(f"{self.qtype.name} {'needs' if self.qtype.has_min else 'has no'} mins")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.quants.shape[0], self.quants.shape[1] * BLOCK))

    def numel(self) -> int:
        """Weights held (n * k), as a tensor's numel."""
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Resident bytes (what the forward streams per pass over the weight)."""
        parts = [self.quants, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(part.numel() * part.element_size() for part in parts)

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The rows ``index`` (a permutation, a selection), still packed."""
        return PackedWeight(self.qtype, self.quants[index].contiguous(),
                            self.scales[index].contiguous(),
                            None if self.mins is None else self.mins[index].contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, k) values in ``dtype`` (computed in float32, as ggml dequantizes)."""
        scales = self.scales.float().unsqueeze(-1)  # (n, blocks, 1)
        if self.qtype is QuantType.Q8_0:
            values = self.quants.float() * scales
        else:
            codes = _unpack_nibbles(self.quants).float()  # (n, blocks, 32)
            if self.qtype is QuantType.Q4_0:
                values = (codes - 8.0) * scales
            else:
                values = codes * scales + self.mins.float().unsqueeze(-1)
        return values.reshape(self.shape).to(dtype)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized: a packed embedding table's lookup."""
        return self.rows(ids).dequantize(dtype)


def pack_tensors(tensors: dict, qtype: QuantType) -> None:
    """Quantize every packable float weight in ``tensors`` in place (--quantization q8_0 etc.);
    a weight already packed in another format is dequantized and packed again (said once).
    Raises ValueError naming a weight whose rows are not whole blocks of 32."""
    repacked = set()
    for name, weight in tensors.items():
        if not PACKABLE.match(name):
            continue
        if weight.shape[-1] % BLOCK:
            raise ValueError(f"{name} has {weight.shape[-1]} columns, not a multiple of {BLOCK}: "
                             f"it cannot be packed as {qtype.name}; use --quantization none")
        if isinstance(weight, PackedWeight):
            if weight.qtype is qtype:
                continue
            repacked.add(weight.qtype.name)
            weight = weight.dequantize()
        tensors[name] = quantize(weight, qtype)
    if repacked:
        log.warning("weights stored as %s were dequantized and packed again as %s",
                    ", ".join(sorted(repacked)), qtype.name)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., 16) uint8 -> (..., 32) codes: the low nibbles, then the high ones."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 32) codes in [0, 15] -> (..., 16) uint8 (inverse of _unpack_nibbles)."""
    codes = codes.to(torch.uint8)
    return codes[..., :16] | (codes[..., 16:] << 4)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf, which ggml's quantizers use (torch.round rounds halves to even)."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def quantize(weight: torch.Tensor, qtype: QuantType) -> PackedWeight:
    """Pack a float (n, k) weight, k a multiple of 32, by ggml's reference rules
    (quantize_row_q8_0/q4_0/q4_1_ref), so a weight quantized here and by llama-quantize agree."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"a weight of {k} columns cannot be packed in blocks of {BLOCK}")
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if qtype is QuantType.Q8_0:
        scale = blocks.abs().amax(-1) / 127.0
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        quants = _round_half_away(blocks * inverse.unsqueeze(-1)).to(torch.int8)
        return PackedWeight(qtype, quants, scale.half())
    if qtype is QuantType.Q4_0:
        # The signed value of largest magnitude maps to -8 (ggml: d = max / -8).
        peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = peak / -8.0
        inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        codes = torch.trunc(blocks * inverse.unsqueeze(-1) + 8.5).clamp(max=15)
        return PackedWeight(qtype, _pack_nibbles(codes), scale.half())
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = (high - low) / 15.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.trunc((blocks - low.unsqueeze(-1)) * inverse.unsqueeze(-1) + 0.5).clamp(max=15)
    return PackedWeight(qtype, _pack_nibbles(codes), scale.half(), low.half())


def from_gguf_bytes(raw: np.ndarray, shape: tuple[int, int], qtype: QuantType) -> PackedWeight:
    """A GGUF tensor's bytes (n * k / 32 blocks, GGML order) as a PackedWeight, not dequantized."""
    n, k = shape
    blocks = np.ascontiguousarray(raw).reshape(n, k // BLOCK, qtype.bytes_per_block)
    scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16).reshape(n, -1))
    mins = None
    if qtype.has_min:
        mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).reshape(n, -1))
    values = torch.from_numpy(blocks[..., -qtype.quant_bytes:].copy())
    if qtype is QuantType.Q8_0:
        values = values.view(torch.int8)
    return PackedWeight(qtype, values, scales, mins)


def concat_rows(weights: list) -> torch.Tensor | PackedWeight:
    """Stack weights by rows (fused qkv, gate+up). Float tensors: torch.cat. Packed ones of one
    format: their blocks stacked. Mixed formats: dequantized and packed again in the most precise
    of them, Q8_0 where a float one is among them (says so), since one kernel call runs one
    format."""
    if not any(isinstance(w, PackedWeight) for w in weights):
        return torch.cat(weights)
    kinds = {w.qtype if isinstance(w, PackedWeight) else None for w in weights}
    if len(kinds) == 1:
        first = weights[0]
        return PackedWeight(first.qtype, torch.cat([w.quants for w in weights]),
                            torch.cat([w.scales for w in weights]),
                            torch.cat([w.mins for w in weights]) if first.qtype.has_min else None)
    target = (QuantType.Q8_0 if None in kinds
              else max(kinds, key=_PRECISION.index))
    log.warning("fusing weights stored as %s into one matrix: packing them again as %s",
                sorted(kind.name if kind else "float" for kind in kinds), target.name)
    dense = [w.dequantize() if isinstance(w, PackedWeight) else w.float() for w in weights]
    return quantize(torch.cat(dense), target)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (m, k) per block of 32 as the kernel quantizes them: int8 codes (m, k / 32, 32)
    = round-half-even(x / d) and scales d = max|x| / 127 (m, k / 32), float32."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse.unsqueeze(-1))
    return codes, scale


def emulated_linear(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ w.T`` (m, n) float32 by the kernel's arithmetic in torch: int8 activations, exact
    integer block dots, float32 scaling. Equal to the kernel up to the order of float sums."""
    codes, x_scale = quantize_activations(x)  # (m, B, 32), (m, B)
    w_scale = weight.scales.float()  # (n, B)
    if weight.qtype is QuantType.Q8_0:
        w_codes = weight.quants.float()
    else:
        w_codes = _unpack_nibbles(weight.quants).float()
        if weight.qtype is QuantType.Q4_0:
            w_codes = w_codes - 8.0
    # Integer block dots, exact in float32 (|sum| <= 32 * 127 * 127 < 2^24).
    dots = torch.einsum("mbi,nbi->mnb", codes, w_codes)  # (m, n, B)
    out = (dots * x_scale.unsqueeze(1) * w_scale.unsqueeze(0)).sum(-1)
    if weight.qtype is QuantType.Q4_1:
        block_sums = codes.sum(-1) * x_scale  # (m, B): d_x * sum(q_x)
        out = out + block_sums @ weight.mins.float().T
    return out
