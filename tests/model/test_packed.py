"""Packed quantized weights: formats against the gguf package (K-quants too), the kernel against its
emulation and against dequantize-then-matmul within the activation quantization's bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tests.model.packed_reference import emulated_linear, quantize_activations
from tierserve.kernels import quant_ops
from tierserve.model.packed import (
    KERNEL_CODES,
    PackedWeight,
    QuantType,
    concat_rows,
    from_gguf_bytes,
    quantize,
)

GGML = {qtype: GGMLQuantizationType[qtype.name] for qtype in QuantType}
FORMATS = list(QuantType)
BLOCK_32 = [qtype for qtype in QuantType if not qtype.is_k]  # those the gguf package quantizes
K_QUANTS = [qtype for qtype in QuantType if qtype.is_k]


def _weight(rows: int = 48, cols: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[3, :32] = 0.0  # an all-zero block: scale 0
    weight[5, 32:64] = 1.5  # a constant block: Q4_1's range 0
    weight[7, :] = 0.0  # an all-zero row: a K-quant super-block of scale 0
    return weight


def _columns(qtype: QuantType) -> int:
    return 512 if qtype.is_k else 128


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_bytes_dequantize_bitwise_as_the_gguf_package_does(qtype):
    # Any bytes are a block (finite float16 scales aside): random ones reach every code, 6-bit
    # scale and minimum, and the sign of Q6_K's int8 scales.
    rng = np.random.default_rng(3)
    rows, supers = 6, 3
    raw = rng.integers(0, 256, size=(rows, supers, qtype.bytes_per_block), dtype=np.uint8)
    halves = [208] if qtype is QuantType.Q6_K else [0, 2]  # where the float16 scales sit
    for offset in halves:
        scales = (rng.standard_normal((rows, supers)) * 0.1).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(rows, supers, 2)
    packed = from_gguf_bytes(raw.reshape(-1), (rows, supers * 256), qtype)
    expected = gguf_dequantize(raw.reshape(rows, -1), GGML[qtype])
    assert np.array_equal(packed.dequantize().numpy(), expected)
    # The same for bytes our quantizer wrote, read back through the gguf package.
    mine = quantize(_weight(cols=512), qtype)
    theirs = gguf_dequantize(mine.quants.numpy().reshape(48, -1), GGML[qtype])
    assert np.array_equal(mine.dequantize().numpy(), theirs)


def test_k_quantizers_are_as_precise_as_their_bits():
    weight = _weight(rows=64, cols=1024, seed=11)
    error = {qtype: (quantize(weight, qtype).dequantize() - weight).abs().mean().item()
             for qtype in QuantType}
    # Per-32 min/max scales in 6 bits: Q4_K's error is Q4_1's (~0.065 here), each further bit
    # about halves it, and Q6_K (per-16 int8 scales) sits between Q5_K and Q8_0.
    assert error[QuantType.Q4_K] < 1.05 * error[QuantType.Q4_1]
    assert error[QuantType.Q5_K] < 0.6 * error[QuantType.Q4_K]
    assert error[QuantType.Q6_K] < 0.6 * error[QuantType.Q5_K]
    assert error[QuantType.Q8_0] < 0.5 * error[QuantType.Q6_K]
    assert torch.equal(quantize(weight, QuantType.Q6_K).dequantize()[7], torch.zeros(1024))


@pytest.mark.parametrize("qtype", BLOCK_32)
def test_gguf_bytes_are_read_packed_and_dequantize_as_the_gguf_package_does(qtype):
    weight = _weight().numpy()
    raw = gguf_quantize(weight, GGML[qtype])  # (rows, bytes) as a GGUF stores it
    packed = from_gguf_bytes(raw.reshape(-1), weight.shape, qtype)
    expected = gguf_dequantize(raw, GGML[qtype])
    assert np.array_equal(packed.dequantize().numpy(), expected)


@pytest.mark.parametrize("qtype", BLOCK_32)
def test_quantizing_at_load_gives_the_bytes_llama_quantize_writes(qtype):
    weight = _weight(seed=1)
    raw = gguf_quantize(weight.numpy(), GGML[qtype])
    ours = quantize(weight, qtype)
    theirs = from_gguf_bytes(raw.reshape(-1), tuple(weight.shape), qtype)
    assert torch.equal(ours.scales, theirs.scales)
    assert torch.equal(ours.quants, theirs.quants)
    if qtype.has_min:
        assert torch.equal(ours.mins, theirs.mins)


def test_rows_of_one_format_are_stacked_packed_and_mixed_ones_repacked_in_the_finer():
    a, b = quantize(_weight(seed=2), QuantType.Q4_1), quantize(_weight(seed=3), QuantType.Q4_1)
    fused = concat_rows([a, b])
    assert fused.qtype is QuantType.Q4_1
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = concat_rows([a, quantize(_weight(seed=4), QuantType.Q8_0)])
    assert mixed.qtype is QuantType.Q8_0 and mixed.shape == (96, 128)
    with_float = concat_rows([quantize(_weight(seed=5), QuantType.Q4_0), _weight(seed=6)])
    assert with_float.qtype is QuantType.Q8_0  # a float member: the finest format
    # K-quants stack their raw blocks; Q4_K_M's Q4_K q/k beside a Q6_K v take Q6_K.
    k4 = [quantize(_weight(seed=s, cols=256), QuantType.Q4_K) for s in (7, 8)]
    stacked = concat_rows(k4)
    assert stacked.qtype is QuantType.Q4_K and stacked.scales is None
    assert torch.equal(stacked.dequantize(), torch.cat([w.dequantize() for w in k4]))
    assert concat_rows([*k4, quantize(_weight(seed=9, cols=256), QuantType.Q6_K)]).qtype \
        is QuantType.Q6_K
    assert torch.equal(concat_rows([_weight(), _weight()]), torch.cat([_weight(), _weight()]))


def test_a_packed_embedding_looks_up_dequantized_rows():
    packed = quantize(_weight(), QuantType.Q8_0)
    ids = torch.tensor([7, 0, 7, 47])
    assert torch.equal(packed.embed(ids, torch.float32), packed.dequantize()[ids])


def test_packed_weight_refuses_blocks_that_do_not_fit():
    with pytest.raises(ValueError, match="needs mins"):
        PackedWeight(QuantType.Q4_1, torch.zeros(2, 1, 16, dtype=torch.uint8),
                     torch.zeros(2, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit"):
        PackedWeight(QuantType.Q8_0, torch.zeros(2, 1, 16, dtype=torch.int8),
                     torch.zeros(2, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit"):  # K-quants keep their scales inside
        PackedWeight(QuantType.Q4_K, torch.zeros(2, 1, 144, dtype=torch.uint8),
                     torch.zeros(2, 1, dtype=torch.float16))


def test_a_packed_weights_parts_cannot_be_swapped():
    # Frozen: a Linear takes the kernel's arguments from it once.
    packed = quantize(_weight(), QuantType.Q8_0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        packed.quants = packed.quants.clone()


@pytest.mark.parametrize("qtype", FORMATS)
def test_emulated_linear_is_within_the_activation_rounding_bound_of_dequantized_matmul(qtype):
    # The weight is exact in both; only x is rounded, by at most half its block step d_x / 2,
    # so |error| <= sum over blocks of d_x / 2 * sum |w| over the block.
    cols = _columns(qtype)
    packed = quantize(_weight(cols=cols), qtype)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(5)) * 3
    dense = packed.dequantize()
    exact = x.double() @ dense.double().T
    _, x_scale = quantize_activations(x)
    block_weight = dense.abs().reshape(48, cols // 32, 32).sum(-1)  # (n, blocks)
    bound = (x_scale.double() / 2) @ block_weight.double().T + 1e-4
    error = (emulated_linear(x, packed).double() - exact).abs()
    assert (error <= bound).all()
    assert error.max() > 0  # the activation rounding is really there


needs_kernel = pytest.mark.skipif(quant_ops() is None, reason="packed kernel not built here (no AVX2)")


@needs_kernel
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
def test_packed_kernel_equals_its_torch_emulation(qtype, rows):
    cols = 160 if not qtype.is_k else 768
    packed = quantize(_weight(rows=37, cols=cols, seed=6), qtype)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    out = quant_ops().packed_linear(x, *packed.kernel_args())
    torch.testing.assert_close(out, emulated_linear(x, packed), rtol=1e-5, atol=5e-5)


@needs_kernel
@pytest.mark.parametrize("qtype", [QuantType.Q4_1, QuantType.Q4_K, QuantType.Q6_K])
def test_packed_kernel_rows_do_not_depend_on_the_batch(qtype):
    packed = quantize(_weight(rows=40, cols=256), qtype)
    x = torch.randn(11, 256, generator=torch.Generator().manual_seed(8))
    together = quant_ops().packed_linear(x, *packed.kernel_args())
    alone = torch.cat([quant_ops().packed_linear(x[i:i + 1], *packed.kernel_args())
                       for i in range(11)])
    assert torch.equal(together, alone)


@needs_kernel
@pytest.mark.parametrize("qtype", FORMATS)
def test_native_dequantize_equals_the_torch_one(qtype):
    packed = quantize(_weight(cols=_columns(qtype)), qtype)
    native = quant_ops().packed_dequantize(*packed.kernel_args())
    # d * q + m may be fused into one rounding by the compiler: within an ulp.
    torch.testing.assert_close(native, packed.dequantize(), rtol=2e-7, atol=0)


@needs_kernel
def test_the_kernel_quantizes_activations_bit_for_bit_as_the_reference():
    # A one-hot Q8_0 weight (code 1, scale 1) makes each output one activation code times its
    # block's scale, exactly: so the kernel's codes, ties rounded to even included, show.
    cols = 96
    quants = torch.zeros(cols, cols // 32, 32, dtype=torch.int8)
    quants.view(cols, cols)[torch.arange(cols), torch.arange(cols)] = 1
    weight = PackedWeight(QuantType.Q8_0, quants, torch.ones(cols, cols // 32, dtype=torch.half))
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(11)) * 4
    x[0, :32] = torch.arange(32) - 15.5  # max 15.5: d = 15.5 / 127, codes near ties
    x[1, :32] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5] + [0.0] * 26)  # d = 1: ties
    x[2, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    codes, scale = quantize_activations(x)
    out = quant_ops().packed_linear(x, *weight.kernel_args())
    assert torch.equal(out, (codes * scale.unsqueeze(-1)).reshape(5, cols))
    assert out[1, 1:6].tolist() == [2.0, -4.0, 0.0, -0.0, 2.0]


@needs_kernel
def test_a_non_finite_activation_gives_nan_outputs_for_its_row_only():
    packed = quantize(_weight(rows=8, cols=64), QuantType.Q8_0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    out = quant_ops().packed_linear(x, KERNEL_CODES[QuantType.Q8_0], packed.quants,
                                    packed.scales, packed.mins)
    assert out[0].isfinite().all()
    assert out[1].isnan().all() and out[2].isnan().all()


@needs_kernel
def test_the_kernel_refuses_arrays_that_do_not_fit_each_other():
    packed = quantize(_weight(), QuantType.Q4_1)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="scales"):
        quant_ops().packed_linear(x, 2, packed.quants, packed.scales[:5], packed.mins)
    with pytest.raises(RuntimeError, match="mins"):
        quant_ops().packed_linear(x, 2, packed.quants, packed.scales, packed.mins.float())
    with pytest.raises(RuntimeError, match="block width"):
        quant_ops().packed_linear(x, 0, packed.quants, packed.scales, None)
    k_quant = quantize(_weight(cols=256), QuantType.Q4_K)
    with pytest.raises(RuntimeError, match="no scales"):
        quant_ops().packed_linear(torch.randn(1, 256), 3, k_quant.quants, packed.scales, None)
    with pytest.raises(RuntimeError, match="block width"):  # Q4_K's bytes read as Q6_K's
        quant_ops().packed_linear(torch.randn(1, 256), 5, k_quant.quants, None, None)
    with pytest.raises(RuntimeError, match="columns"):
        quant_ops().packed_linear(torch.randn(1, 128), 3, k_quant.quants, None, None)
