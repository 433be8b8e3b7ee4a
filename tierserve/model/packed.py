"""Packed quantized weights (GGML Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K) kept packed
in memory, and their linear.

A ``PackedWeight`` holds a (n, k) matrix as blocks along k, exactly as a GGUF file stores them.
Q8_0/Q4_0/Q4_1: blocks of 32 weights, each a float16 scale (and, for Q4_1, a float16 minimum)
and its 32 quantized values, split into three arrays. K-quants: super-blocks of 256 weights kept
as their raw bytes (Q4_K/Q5_K: a float16 scale and minimum, eight 6-bit sub-block scales and
minimums, 4- or 5-bit codes; Q6_K: sixteen int8 sub-block scales of 16 weights, 6-bit codes, a
float16 scale), decoded inside the kernel. A weight is made either from a GGUF tensor's bytes (no
dequantization: ``from_gguf_bytes``) or by quantizing a float weight at load (``quantize``:
ggml's reference rules for Q8_0/Q4_0/Q4_1; for the K-quants ggml's scale packing with a plain
min/max (or peak) per sub-block where ggml searches for the error-minimising scale, so their
error is a little larger than llama-quantize's).

The linear (``model.llama.Linear`` through kernels/quant.cpp, AVX2) computes ``x @ w.T`` from
the packed form as llama.cpp does for Q8_0/Q4_0/Q4_1: each row of x is quantized per block of 32
to int8 with a float scale, blocks are multiplied in integers, and the block sums are scaled and
added in float32. The K-quants take the same per-32 activation blocks, where llama.cpp rounds
activations per 256 (its Q8_K): slightly finer, so not bit-identical to llama.cpp.
tests/model/packed_reference.py has that arithmetic in torch (the kernel's specification);
without the kernel a packed weight is dequantized for each call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along the input dimension (activations are quantized by these)
SUPER_BLOCK = 256  # weights per K-quant super-block


class QuantType(Enum):
    """A packed block format: its name as GGUF and ``--quantization`` spell it."""

    Q8_0 = "q8_0"  # w = d * q, q int8 in [-127, 127]
    Q4_0 = "q4_0"  # w = d * (q - 8), q in [0, 15]
    Q4_1 = "q4_1"  # w = d * q + m, q in [0, 15]
    Q4_K = "q4_k"  # per 32: w = (d * sc) * q - dmin * m, q in [0, 15], sc and m 6-bit
    Q5_K = "q5_k"  # the same with q in [0, 31]
    Q6_K = "q6_k"  # per 16: w = (d * sc) * (q - 32), q in [0, 63], sc int8

    @property
    def is_k(self) -> bool:
        """A K-quant: super-blocks of 256 kept as raw bytes."""
        return self.name.endswith("_K")

    @property
    def block(self) -> int:
        """Weights per block along k (a weight's columns must be a multiple)."""
        return SUPER_BLOCK if self.is_k else BLOCK

    @property
    def quant_bytes(self) -> int:
        """Bytes per block in ``quants``: the values of a block of 32, or a whole raw K block."""
        if self.is_k:
            return self.bytes_per_block
        return 32 if self is QuantType.Q8_0 else 16

    @property
    def has_min(self) -> bool:
        """Holds a separate ``mins`` array (Q4_1; the K-quants keep theirs inside their bytes)."""
        return self is QuantType.Q4_1

    @property
    def bytes_per_block(self) -> int:
        """Bytes per block as GGUF stores it: the float16 scale (and min), then the values."""
        k_bytes = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
        if self.name in k_bytes:
            return k_bytes[self.name]
        return self.quant_bytes + (4 if self.has_min else 2)

    @property
    def fallback(self) -> QuantType:
        """What a K-quant packs a weight as whose columns are not whole super-blocks (llama.cpp
        falls back too: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0; we have no Q5 kernel, so Q4_K
        takes Q4_1 and Q5_K takes Q8_0)."""
        return {QuantType.Q4_K: QuantType.Q4_1}.get(self, QuantType.Q8_0) if self.is_k else self


# The packed kernel's format codes (kernels/quant.cpp's Kind).
KERNEL_CODES = {QuantType.Q8_0: 0, QuantType.Q4_0: 1, QuantType.Q4_1: 2, QuantType.Q4_K: 3,
                QuantType.Q5_K: 4, QuantType.Q6_K: 5}

# The weights a packed model keeps packed, by HF name: every linear of attention and the MLP,
# the head and the embedding. Norms, biases and MoE routers stay float.
PACKABLE = re.compile(r"(^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight"
                      r"|^lm_head\.weight|^model\.embed_tokens\.weight)$")

# Precision order when rows of different formats are joined into one matrix (fused qkv).
_PRECISION = [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K,
              QuantType.Q8_0]


@dataclass(slots=True, frozen=True)
class PackedWeight:
    """A (n, k) weight as blocks: ``quants`` (n, k / 32, 32) int8 for Q8_0 or (n, k / 32, 16)
    uint8 for Q4 (element i of a block in the low nibble of byte i, element i + 16 in its high
    nibble, GGML's layout); ``scales`` and ``mins`` (n, k / 32) float16. K-quants: ``quants``
    (n, k / 256, bytes_per_block) uint8, GGML's block bytes, and no ``scales`` or ``mins``.
    Frozen: a Linear takes its ``kernel_args()`` once, so the parts are never swapped."""

    qtype: QuantType
    quants: torch.Tensor
    scales: torch.Tensor | None
    mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, blocks, width = self.quants.shape
        fits = (self.scales is None and self.quants.dtype == torch.uint8 if self.qtype.is_k
                else self.scales is not None and self.scales.shape == (n, blocks))
        if width != self.qtype.quant_bytes or not fits:
            scales = None if self.scales is None else tuple(self.scales.shape)
            raise ValueError(f"{self.qtype.name} blocks: quants {tuple(self.quants.shape)} and "
                             f"scales {scales} do not fit")
        if self.qtype.has_min != (self.mins is not None):
            raise ValueError(f"{self.qtype.name} {'needs' if self.qtype.has_min else 'has no'} mins")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.quants.shape[0], self.quants.shape[1] * self.qtype.block))

    def numel(self) -> int:
        """Weights held (n * k), as a tensor's numel."""
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Resident bytes (what the forward streams per pass over the weight)."""
        parts = [part for part in (self.quants, self.scales, self.mins) if part is not None]
        return sum(part.numel() * part.element_size() for part in parts)

    def kernel_args(self) -> tuple:
        """(code, quants, scales, mins): what kernels/quant.cpp's functions take after x."""
        return KERNEL_CODES[self.qtype], self.quants, self.scales, self.mins

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The rows ``index`` (a permutation, a selection), still packed."""
        def pick(part):
            return None if part is None else part[index].contiguous()
        return PackedWeight(self.qtype, pick(self.quants), pick(self.scales), pick(self.mins))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, k) values in ``dtype`` (computed in float32, as ggml dequantizes)."""
        if self.qtype.is_k:
            codes, scale, offset = k_parts(self)  # (n, B, 32), (n, B, H), (n, B) or None
            n, blocks, _ = codes.shape
            values = scale.unsqueeze(-1) * codes.reshape(n, blocks, scale.shape[-1], -1)
            values = values.reshape(n, blocks, BLOCK)
            if offset is not None:
                values = values - offset.unsqueeze(-1)
            return values.reshape(self.shape).to(dtype)
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
    K-quants follow llama-quantize's K mixes where it departs from the base type: the output
    matrix (the head, or a tied embedding) takes Q6_K, and a weight whose columns are not whole
    super-blocks takes the fallback (``QuantType.fallback``; Q8_0 for Q6_K).
    Raises ValueError naming a weight whose rows are not whole blocks of 32."""
    repacked, fell_back = {}, []
    output = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    for name, weight in tensors.items():
        if not PACKABLE.match(name):
            continue
        if weight.shape[-1] % BLOCK:
            raise ValueError(f"{name} has {weight.shape[-1]} columns, not a multiple of {BLOCK}: "
                             f"it cannot be packed as {qtype.name}; use --quantization none")
        wanted = QuantType.Q6_K if qtype.is_k and name == output else qtype
        target = wanted
        if weight.shape[-1] % wanted.block:  # a K-quant on a width that is not whole super-blocks
            target = wanted.fallback
            fell_back.append(f"{name} as {target.name}")
        if isinstance(weight, PackedWeight):
            if weight.qtype is target:
                continue
            repacked.setdefault(f"{weight.qtype.name} as {target.name}", 0)
            repacked[f"{weight.qtype.name} as {target.name}"] += 1
            weight = weight.dequantize()
        tensors[name] = quantize(weight, target)
    if repacked:
        log.warning("weights already packed were dequantized and packed again: %s",
                    ", ".join(f"{count} {kinds}" for kinds, count in sorted(repacked.items())))
    if fell_back:
        log.warning("%d weights have columns that are not whole super-blocks of %d (e.g. %s): "
                    "packed in the fallback type, as llama-quantize does", len(fell_back),
                    SUPER_BLOCK, fell_back[0])


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
    if k % qtype.block:
        raise ValueError(f"a weight of {k} columns cannot be packed in blocks of {qtype.block}")
    if qtype.is_k:
        return _quantize_k(weight.detach().float(), qtype)
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


def _nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (round half to even, through the float magic number)."""
    return torch.round(values)


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """float16 values (...) as their two little-endian bytes (..., 2) uint8."""
    return values.half().contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _quantize_k(weight: torch.Tensor, qtype: QuantType) -> PackedWeight:
    """A float32 (n, k) weight as K-quant blocks, with ggml's scale encoding: per sub-block a float
    scale (and minimum) from the sub-block's range, those scales rounded to 6 bits (Q4_K/Q5_K) or
    int8 (Q6_K) against the super-block's largest, then each weight's code from the rounded ones.
    (ggml's make_qkx2_quants / make_qx_quants also search a few scales for the least squared
    error; this takes the range as it is.)"""
    n, k = weight.shape
    supers = weight.reshape(n, k // SUPER_BLOCK, SUPER_BLOCK)
    if qtype is QuantType.Q6_K:
        sub = supers.reshape(n, -1, 16, 16)  # (n, S, 16 sub-blocks, 16)
        peak = sub.gather(-1, sub.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = peak / -32.0  # the value of largest magnitude maps to -32
        largest = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))  # (n, S, 1)
        inverse = torch.where(largest != 0, -128.0 / largest, torch.zeros_like(largest))
        sc = _nearest(inverse * scale).clamp(-128, 127)
        d = torch.where(largest != 0, 1.0 / inverse, torch.zeros_like(inverse)).half()
        step = d.float() * sc  # (n, S, 16)
        codes = torch.where(step.unsqueeze(-1) != 0, sub / step.unsqueeze(-1),
                            torch.zeros_like(sub))
        u = (_nearest(codes).clamp(-32, 31) + 32).to(torch.uint8).reshape(n, -1, 2, 4, 32)
        low = u & 0x0F  # (n, S, half, quarter, 32)
        ql = torch.cat([low[:, :, :, 0] | (low[:, :, :, 2] << 4),
                        low[:, :, :, 1] | (low[:, :, :, 3] << 4)], dim=-1)  # (n, S, 2, 64)
        high = u >> 4
        qh = high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | \
            (high[:, :, :, 3] << 6)  # (n, S, 2, 32)
        raw = torch.cat([ql.reshape(n, -1, 128), qh.reshape(n, -1, 64),
                         sc.to(torch.int8).view(torch.uint8), _half_bytes(d.squeeze(-1))], dim=-1)
        return PackedWeight(qtype, raw.contiguous(), None)
    levels = 15 if qtype is QuantType.Q4_K else 31
    sub = supers.reshape(n, -1, 8, 32)  # (n, S, 8 sub-blocks, 32)
    low = sub.amin(-1).clamp(max=0.0)  # ggml keeps the minimum at or below 0
    scale = (sub.amax(-1) - low) / levels
    minimum = -low
    top_scale, top_min = scale.amax(-1, keepdim=True), minimum.amax(-1, keepdim=True)
    sc = torch.where(top_scale > 0, _nearest(scale * (63.0 / top_scale)), 0.0).clamp(max=63)
    mn = torch.where(top_min > 0, _nearest(minimum * (63.0 / top_min)), 0.0).clamp(max=63)
    d, dmin = (top_scale / 63.0).half(), (top_min / 63.0).half()
    step, offset = d.float() * sc, dmin.float() * mn  # (n, S, 8)
    codes = torch.where(step.unsqueeze(-1) > 0,
                        (sub + offset.unsqueeze(-1)) / step.unsqueeze(-1), torch.zeros_like(sub))
    q = _nearest(codes).clamp(0, levels).to(torch.uint8)  # (n, S, 8, 32)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    packed_scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
                               mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                               (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], dim=-1)
    pairs = q.reshape(n, -1, 4, 2, 32)  # sub-blocks 2j (low nibble) and 2j + 1 (high)
    qs = ((pairs[:, :, :, 0] & 0x0F) | ((pairs[:, :, :, 1] & 0x0F) << 4)).reshape(n, -1, 128)
    parts = [_half_bytes(d.squeeze(-1)), _half_bytes(dmin.squeeze(-1)), packed_scales]
    if qtype is QuantType.Q5_K:
        bits = (q >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32).view(1, 1, 8, 1)
        parts.append(bits.sum(2).to(torch.uint8))  # (n, S, 32): bit i from sub-block i
    raw = torch.cat(parts + [qs], dim=-1)
    return PackedWeight(qtype, raw.contiguous(), None)


def k_parts(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A K-quant weight decoded per block of 32 (the activations' blocks): integer codes
    (n, B, 32) float32, the float scale of each of the block's H sub-blocks (n, B, H: H = 1 for
    Q4_K/Q5_K, 2 for Q6_K's sub-blocks of 16), and the offset each value loses (n, B), or None.
    The value is scale * code - offset, computed as ggml (and the gguf package) do."""
    raw = weight.quants
    n, supers, _ = raw.shape

    def half(lo: int) -> torch.Tensor:
        return raw[..., lo:lo + 2].contiguous().view(torch.float16).float()  # (n, S, 1)

    if weight.qtype is QuantType.Q6_K:
        ql, qh = raw[..., :128].reshape(n, supers, 2, 64), raw[..., 128:192].reshape(n, supers, 2, 32)
        sc = raw[..., 192:208].contiguous().view(torch.int8).float()  # (n, S, 16)
        low = torch.stack([ql & 0x0F, ql >> 4], dim=3).reshape(n, supers, 256)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
        high = ((qh.unsqueeze(3) >> shifts) & 0x03).reshape(n, supers, 256)
        codes = (low | (high << 4)).float() - 32.0
        scale = half(208) * sc
        return codes.reshape(n, -1, BLOCK), scale.reshape(n, -1, 2), None
    scales = raw[..., 4:16]
    dq, mq, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([dq & 0x3F, (md & 0x0F) | ((dq >> 2) & 0x30)], dim=-1).float()  # (n, S, 8)
    mn = torch.cat([mq & 0x3F, (md >> 4) | ((mq >> 2) & 0x30)], dim=-1).float()
    qs = raw[..., -128:].reshape(n, supers, 4, 1, 32)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, supers, 8, 32)
    if weight.qtype is QuantType.Q5_K:
        qh = raw[..., 16:48].reshape(n, supers, 1, 32)
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
        codes = codes | (((qh >> shifts) & 0x01) << 4)
    scale = half(0) * sc
    offset = half(2) * mn
    return codes.float().reshape(n, -1, BLOCK), scale.reshape(n, -1, 1), offset.reshape(n, -1)


def from_gguf_bytes(raw: np.ndarray, shape: tuple[int, int], qtype: QuantType) -> PackedWeight:
    """A GGUF tensor's bytes (n * k / block blocks, GGML order) as a PackedWeight, not
    dequantized."""
    n, k = shape
    if qtype.is_k:
        blocks = np.ascontiguousarray(raw).reshape(n, k // SUPER_BLOCK, qtype.bytes_per_block)
        return PackedWeight(qtype, torch.from_numpy(blocks.copy()), None)
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

        def stack(part: str):
            return None if getattr(first, part) is None else torch.cat(
                [getattr(w, part) for w in weights])
        return PackedWeight(first.qtype, stack("quants"), stack("scales"), stack("mins"))
    target = (QuantType.Q8_0 if None in kinds
              else max(kinds, key=_PRECISION.index))
    log.warning("fusing weights stored as %s into one matrix: packing them again as %s",
                sorted(kind.name if kind else "float" for kind in kinds), target.name)
    dense = [w.dequantize() if isinstance(w, PackedWeight) else w.float() for w in weights]
    return quantize(torch.cat(dense), target)
