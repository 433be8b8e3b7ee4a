"""Loader: GGUF files and safetensors folders come out under HF names, equal to what transformers loads."""

from __future__ import annotations

import json
import math
from itertools import cycle

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from tierserve.model.gguf_file import read_gguf
from tierserve.model.loader import CheckpointError, load_arch_config, load_checkpoint
from tierserve.model.loader_gguf import unpermute_rotary_rows

TINY = dict(vocab=96, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)  # head_dim 16
TINY_GGUF_METADATA = dict(  # GGUFWriter.add_<key>(value)
    block_count=TINY["layers"], context_length=256, embedding_length=TINY["hidden"],
    feed_forward_length=TINY["ffn"], head_count=TINY["heads"], head_count_kv=TINY["kv_heads"],
    rope_freq_base=10000.0, layer_norm_rms_eps=1e-5, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
MATRIX_QTYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16)
# Largest |dequant(quant(w)) - w| as a fraction of max |w|: half a step (Q4_0's largest value
# is clamped from +8 to +7 steps, a whole step of absmax/8), with margin.
QUANT_TOLERANCE = {Q.Q8_0: 0.01, Q.Q4_0: 0.13, Q.Q4_1: 0.07, Q.F16: 1e-3, Q.F32: 0.0}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


HF_FIELDS = {  # ModelArchConfig field -> transformers config attribute
    "architecture": "model_type", "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}  # fmt: skip


def assert_arch_matches_hf_config(arch, config) -> None:
    ours = {field: getattr(arch, field) for field in HF_FIELDS}
    theirs = {field: getattr(config, attr, None) for field, attr in HF_FIELDS.items()}
    theirs["head_dim"] = theirs["head_dim"] or config.hidden_size // config.num_attention_heads
    assert ours == theirs
    assert arch.rope_theta == config.rope_parameters["rope_theta"]


# --- the real SmolLM2 GGUF against transformers ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path, hf_smollm2):
    """(our checkpoint, transformers' model) for the SmolLM2 GGUF."""
    return load_checkpoint(smollm2_path), hf_smollm2


@pytest.mark.slow
def test_smollm2_gguf_tensors_equal_transformers_dequantized(smollm2_pair):
    ours, hf = smollm2_pair
    hf_state = hf.state_dict()
    assert ours.arch.tie_word_embeddings and "lm_head.weight" not in ours.tensors
    assert set(ours.tensors) | {"lm_head.weight"} == set(hf_state)
    for name, hf_tensor in hf_state.items():
        mine = ours.tensors["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert mine.dtype == torch.float32
        assert torch.equal(mine, hf_tensor), name


@pytest.mark.slow
def test_smollm2_gguf_arch_matches_transformers_config(smollm2_pair):
    ours, hf = smollm2_pair
    assert ours.source_format == "gguf"
    assert_arch_matches_hf_config(ours.arch, hf.config)
    assert (ours.arch.architecture, ours.arch.num_heads, ours.arch.num_kv_heads) == ("llama", 9, 3)
    assert (ours.arch.rope_theta, ours.arch.vocab_size, ours.arch.tie_word_embeddings) == (
        1e5,
        49152,
        True,
    )
    assert (ours.arch.bos_token_id, ours.arch.eos_token_ids, ours.arch.rope_scaling) == (
        1,
        [2],
        None,
    )


@pytest.mark.slow
def test_load_arch_config_equals_the_full_load(smollm2_pair, smollm2_path):
    assert load_arch_config(smollm2_path) == smollm2_pair[0].arch


def test_fast_gguf_header_reader_agrees_with_gguf_reader(smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    ours = read_gguf(smollm2_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == fields
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert (info.offset, info.n_bytes, info.qtype) == (
            tensor.data_offset,
            tensor.n_bytes,
            tensor.tensor_type,
        )
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
    for tensor in reader.tensors[:12]:  # Q8_0 embedding, Q4_1 matrices, F32 norms
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(ours.read_float32(tensor.name), expected)


# --- safetensors folders against transformers ------------------------------------------------


def test_tiny_llama_safetensors_equal_transformers_state_dict(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ours = load_checkpoint(tiny_llama_dir)
    assert ours.source_format == "safetensors"
    hf_state = hf.state_dict()
    assert set(ours.tensors) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(ours.tensors[name], tensor), name
    assert_arch_matches_hf_config(ours.arch, hf.config)
    assert (ours.arch.num_kv_heads, ours.arch.tie_word_embeddings, ours.arch.attention_bias) == (
        2,
        False,
        False,
    )
    assert (ours.arch.bos_token_id, ours.arch.eos_token_ids, ours.arch.rope_scaling) == (
        1,
        [2],
        None,
    )


def test_safetensors_cast_to_requested_dtype(tiny_llama_dir):
    ours = load_checkpoint(tiny_llama_dir, dtype=torch.bfloat16)
    assert {t.dtype for t in ours.tensors.values()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=[5, 6],
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF initialises biases to zero, which would hide a mix-up
        for param in model.parameters():
            param.normal_()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7]}))
    return path, model


def test_qwen2_safetensors_has_attention_bias_and_biases(tiny_qwen2):
    path, model = tiny_qwen2
    ours = load_checkpoint(path)
    assert_arch_matches_hf_config(ours.arch, model.config)
    assert (
        ours.arch.architecture == "qwen2"
        and ours.arch.attention_bias
        and ours.arch.tie_word_embeddings
    )
    for i in range(2):
        for proj in ("q", "k", "v"):
            name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
            assert torch.equal(ours.tensors[name], model.state_dict()[name])
    assert "lm_head.weight" not in ours.tensors
    assert ours.arch.eos_token_ids == [5, 6, 7]  # config.json, then generation_config.json
    assert ours.arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_tied_checkpoint_drops_a_saved_lm_head(tiny_qwen2, tmp_path):
    path, _ = tiny_qwen2
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert "lm_head.weight" not in load_checkpoint(tmp_path).tensors


# --- tiny GGUF files written here, quantized the way llama.cpp does ---------------------------


def hf_tiny_tensors(model_type: str) -> dict[str, np.ndarray]:
    """Random float32 weights under transformers' own names and layouts: TINY llama, or tied qwen2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tied = model_type == "qwen2"
    config = AutoConfig.for_model(
        model_type, vocab_size=TINY["vocab"], hidden_size=TINY["hidden"],
        intermediate_size=TINY["ffn"], num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"],
        tie_word_embeddings=tied,
    )  # fmt: skip
    state = AutoModelForCausalLM.from_config(config).state_dict()
    rng = np.random.default_rng(0)  # not HF's init: zero biases and unit norms would hide mistakes
    return {
        name: rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        for name, tensor in state.items()
        if not (tied and name == "lm_head.weight")
    }


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], **metadata) -> None:
    """Write a GGUF with TINY's metadata (overridable) and named tensors, quantized here unless uint8."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (TINY_GGUF_METADATA | metadata).items():
        getattr(writer, f"add_{key}")(value)
    for name, (values, qtype) in tensors.items():
        stored = values if values.dtype == np.uint8 else gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors_like_llama_cpp(hf: dict[str, np.ndarray], arch: gguf.MODEL_ARCH, permute: bool):
    """GGUF name -> (values, qtype): llama.cpp's names, q/k rows permuted when ``permute``."""
    name_map = gguf.get_tensor_name_map(arch, TINY["layers"])
    matrix_qtypes = cycle(MATRIX_QTYPES)
    out = {}
    for name, values in hf.items():
        if permute and ".q_proj." in name:
            values = llama_cpp_permute(values, TINY["heads"], TINY["heads"])
        elif permute and ".k_proj." in name:
            values = llama_cpp_permute(values, TINY["heads"], TINY["kv_heads"])
        qtype = next(matrix_qtypes) if values.ndim == 2 else Q.F32
        out[name_map.get_name(name, try_suffixes=(".weight", ".bias"))] = (values, qtype)
    return out


def tiny_llama_gguf_tensors() -> dict[str, tuple[np.ndarray, Q]]:
    return gguf_tensors_like_llama_cpp(
        hf_tiny_tensors("llama"), gguf.MODEL_ARCH.LLAMA, permute=True
    )


def quant_roundtrip(values: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype).reshape(values.shape)


def test_permutation_round_trips_and_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reverse = LlamaTensorProcessor()._reverse_permute_weights
    w = np.random.default_rng(1).standard_normal((6 * 16, 32)).astype(np.float32)  # 6 heads x 16
    for n_head in (6, 3, 2):
        permuted = llama_cpp_permute(w, 6, n_head)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute_rotary_rows(permuted, n_head), w)
        assert np.array_equal(unpermute_rotary_rows(permuted, n_head), reverse(permuted, 6, n_head))
    bias = np.arange(32, dtype=np.float32)
    assert np.array_equal(unpermute_rotary_rows(llama_cpp_permute(bias, 2, 2), 2), bias)


def test_tiny_llama_gguf_dequantizes_and_unpermutes(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hf = hf_tiny_tensors("llama")
    written = gguf_tensors_like_llama_cpp(hf, gguf.MODEL_ARCH.LLAMA, permute=True)
    write_gguf(tmp_path / "tiny.gguf", "llama", written)
    ours = load_checkpoint(tmp_path / "tiny.gguf")
    assert set(ours.tensors) == set(hf) and not ours.arch.tie_word_embeddings
    assert {qtype for _, qtype in written.values()} == {*MATRIX_QTYPES, Q.F32}
    # Quantization is row-wise and the permutation moves whole rows, so they commute:
    # dequant(quant(permute(w))) un-permuted is exactly dequant(quant(w)).
    qtypes = dict(zip(hf, (qtype for _, qtype in written.values()), strict=True))
    for name, original in hf.items():
        mine = ours.tensors[name].numpy()
        assert np.array_equal(mine, quant_roundtrip(original, qtypes[name])), name
        error = np.abs(mine - original).max()
        assert error <= QUANT_TOLERANCE[qtypes[name]] * np.abs(original).max(), name
    # And against the stored bytes, un-permuted by transformers' own code.
    reverse = LlamaTensorProcessor()._reverse_permute_weights
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, TINY["layers"])
    for tensor in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors:
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            kv = TINY["heads"] if ".attn_q." in tensor.name else TINY["kv_heads"]
            stored = reverse(stored, TINY["heads"], kv)
        hf_name = next(
            n for n in hf if name_map.get_name(n, try_suffixes=(".weight", ".bias")) == tensor.name
        )
        assert np.array_equal(ours.tensors[hf_name].numpy(), stored), tensor.name


def test_tiny_qwen2_gguf_is_not_unpermuted_and_keeps_biases(tmp_path):
    hf = hf_tiny_tensors("qwen2")
    written = gguf_tensors_like_llama_cpp(hf, gguf.MODEL_ARCH.QWEN2, permute=False)
    write_gguf(tmp_path / "qwen.gguf", "qwen2", written)
    ours = load_checkpoint(tmp_path / "qwen.gguf")
    assert (ours.arch.architecture, ours.arch.attention_bias, ours.arch.tie_word_embeddings) == (
        "qwen2", True, True)  # fmt: skip
    qtypes = dict(zip(hf, (qtype for _, qtype in written.values()), strict=True))
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.k_proj.bias",
    ):
        assert np.array_equal(ours.tensors[name].numpy(), quant_roundtrip(hf[name], qtypes[name]))


def llama3_rope_freqs(head_dim, theta, factor, low, high, original) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, condensed."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "head_dim, factor, high, original",
    [
        (128, 8.0, 4.0, 8192),  # Llama 3.1 8B
        (64, 32.0, 4.0, 8192),  # Llama 3.2 1B
        (128, 16.0, 8.0, 4096),  # made up: the fit must find these, not the Llama 3.1 fallback
    ],
)
def test_llama3_rope_freqs_become_hf_rope_scaling(tmp_path, head_dim, factor, high, original):
    freqs = llama3_rope_freqs(head_dim, 500000.0, factor, 1.0, high, original)
    tensors = {"rope_freqs.weight": (freqs, Q.F32)}
    metadata = dict(embedding_length=head_dim * 4, rope_freq_base=500000.0, vocab_size=32)
    write_gguf(tmp_path / "l3.gguf", "llama", tensors, **metadata)
    assert load_arch_config(tmp_path / "l3.gguf").rope_scaling == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def test_gguf_with_rope_freqs_loads_its_weights(tmp_path):
    tensors = tiny_llama_gguf_tensors()
    tensors["rope_freqs.weight"] = (llama3_rope_freqs(16, 10000.0, 8.0, 1.0, 4.0, 8192), Q.F32)
    write_gguf(tmp_path / "tiny.gguf", "llama", tensors)
    ours = load_checkpoint(tmp_path / "tiny.gguf")
    assert ours.arch.rope_scaling["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in ours.tensors


def test_yarn_metadata_becomes_hf_rope_scaling(tmp_path):
    yarn = dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0)
    write_gguf(
        tmp_path / "y.gguf", "qwen2", {}, vocab_size=32, rope_scaling_orig_ctx_len=32768, **yarn
    )
    expected = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)
    assert load_arch_config(tmp_path / "y.gguf").rope_scaling == expected


# --- errors that name the fix ----------------------------------------------------------------


def test_missing_path_is_reported_with_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a .gguf file"):
        load_checkpoint(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_arch_config(tmp_path)


def test_unknown_gguf_architecture_is_refused(tmp_path):
    write_gguf(tmp_path / "phi.gguf", "phi3", {}, vocab_size=32)
    with pytest.raises(
        CheckpointError, match="architecture 'phi3'; tierserve runs llama, mistral, qwen2"
    ):
        load_checkpoint(tmp_path / "phi.gguf")


def test_unknown_hf_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'; tierserve runs"):
        load_arch_config(tmp_path)


def test_quant_type_gguf_cannot_dequantize_is_refused(tmp_path):
    tensors = tiny_llama_gguf_tensors()
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw_q8_1 = np.zeros((TINY["vocab"], TINY["hidden"] // block_size * type_size), dtype=np.uint8)
    tensors["token_embd.weight"] = (raw_q8_1, Q.Q8_1)
    write_gguf(tmp_path / "q8_1.gguf", "llama", tensors)
    with pytest.raises(CheckpointError, match="token_embd.weight.*Q8_1.*cannot dequantize"):
        load_checkpoint(tmp_path / "q8_1.gguf")


def test_missing_layer_tensor_is_refused(tmp_path):
    tensors = tiny_llama_gguf_tensors()
    del tensors["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "cut.gguf", "llama", tensors)
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(tmp_path / "cut.gguf")
