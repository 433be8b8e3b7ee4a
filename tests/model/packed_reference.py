"""The packed kernel's arithmetic in torch (kernels/quant.cpp's specification): activations
rounded to int8 per block of 32, exact integer block dots, float32 scaling."""

from __future__ import annotations

import torch

from tierserve.model.packed import BLOCK, PackedWeight, QuantType, _unpack_nibbles, k_parts


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
    integer block dots, float32 scaling. Equal to the kernel up to float rounding (the order of
    sums, and for K-quants the grouping of the scale products)."""
    codes, x_scale = quantize_activations(x)  # (m, B, 32), (m, B)
    if weight.qtype.is_k:
        w_codes, w_scale, offset = k_parts(weight)  # (n, B, 32), (n, B, H), (n, B) or None
        m, blocks, _ = codes.shape
        n, subs = w_codes.shape[0], w_scale.shape[-1]
        dots = torch.einsum("mbhi,nbhi->mnbh", codes.reshape(m, blocks, subs, -1),
                            w_codes.reshape(n, blocks, subs, -1))  # (m, n, B, H), exact
        out = ((dots * w_scale.unsqueeze(0)).sum(-1) * x_scale.unsqueeze(1)).sum(-1)
        if offset is not None:
            out = out - (codes.sum(-1) * x_scale) @ offset.T
        return out
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
