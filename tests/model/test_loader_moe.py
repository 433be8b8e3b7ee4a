"""MoE checkpoints from GGUF: each family's tiny transformers model written the way llama.cpp's
converter writes it (experts stacked per projection, gguf-py's tensor names and metadata keys, q/k
rows permuted for the llama architecture) loads to exactly the tensors and architecture of the
HF folder it came from (whose model is checked against transformers in test_moe.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.model.test_loader import llama_cpp_permute
from tierserve.model.loader import load_checkpoint

T = gguf.MODEL_TENSOR
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "olmoe": "olmoe"}
LAYER_TENSORS = {  # HF name after "model.layers.{i}." -> gguf-py tensor
    "input_layernorm.weight": T.ATTN_NORM, "post_attention_layernorm.weight": T.FFN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q, "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V, "self_attn.o_proj.weight": T.ATTN_OUT,
    "self_attn.q_proj.bias": T.ATTN_Q, "self_attn.k_proj.bias": T.ATTN_K,
    "self_attn.v_proj.bias": T.ATTN_V, "self_attn.q_norm.weight": T.ATTN_Q_NORM,
    "self_attn.k_norm.weight": T.ATTN_K_NORM, "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP, "mlp.down_proj.weight": T.FFN_DOWN,
    "mlp.gate.weight": T.FFN_GATE_INP, "mlp.shared_expert.gate_proj.weight": T.FFN_GATE_SHEXP,
    "mlp.shared_expert.up_proj.weight": T.FFN_UP_SHEXP,
    "mlp.shared_expert.down_proj.weight": T.FFN_DOWN_SHEXP,
    "mlp.shared_expert_gate.weight": T.FFN_GATE_INP_SHEXP,
}  # fmt: skip
STACKED = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}
GLOBAL = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM,
          "lm_head.weight": T.OUTPUT}


def _gguf_name(tensor: gguf.MODEL_TENSOR, layer: int | None, suffix: str) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + suffix


def llama_cpp_tensors(hf: dict[str, np.ndarray], arch) -> dict[str, np.ndarray]:
    """GGUF name -> values, as llama.cpp's converter lays them out."""
    out: dict[str, np.ndarray] = {}
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}."
        for suffix, tensor in LAYER_TENSORS.items():
            values = hf.get(prefix + suffix)
            if values is None:
                continue
            if arch.architecture == "mixtral" and suffix.startswith("self_attn.q_proj"):
                values = llama_cpp_permute(values, arch.num_heads, arch.num_heads)
            elif arch.architecture == "mixtral" and suffix.startswith("self_attn.k_proj"):
                values = llama_cpp_permute(values, arch.num_heads, arch.num_kv_heads)
            if suffix == "mlp.shared_expert_gate.weight":
                values = values.reshape(-1)  # llama.cpp's is (n_embd,)
            out[_gguf_name(tensor, layer, "." + suffix.rsplit(".", 1)[1])] = values
        if arch.is_moe_layer(layer):
            for projection, tensor in STACKED.items():
                out[_gguf_name(tensor, layer, ".weight")] = np.stack(
                    [hf[f"{prefix}mlp.experts.{e}.{projection}.weight"]
                     for e in range(arch.num_experts)])
    for name, tensor in GLOBAL.items():
        if name in hf:
            out[_gguf_name(tensor, None, ".weight")] = hf[name]
    return out


def write_moe_gguf(path, hf: dict[str, np.ndarray], arch, expert_qtype=None,
                   tokenizer_dir=None) -> None:
    """``tokenizer_dir``: a folder whose byte-level BPE tokenizer.json goes in as GPT-2 style
    ``tokenizer.ggml.*`` metadata, so that the file alone is a servable model."""
    writer = gguf.GGUFWriter(path, GGUF_ARCH[arch.architecture])
    if tokenizer_dir is not None:
        _add_bpe_tokenizer(writer, tokenizer_dir)
    writer.add_block_count(arch.num_layers)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_expert_count(arch.num_experts)
    writer.add_expert_used_count(arch.num_experts_per_tok)
    if arch.architecture != "mixtral":  # llama.cpp's Mixtral experts are feed_forward_length wide
        writer.add_expert_feed_forward_length(arch.moe_intermediate_size)
    if arch.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(arch.shared_expert_intermediate_size)
    if arch.clip_qkv is not None:
        writer.add_clamp_kqv(arch.clip_qkv)
    for name, values in llama_cpp_tensors(hf, arch).items():
        block = gguf.GGML_QUANT_SIZES[expert_qtype][0] if expert_qtype is not None else 0
        if block and name.endswith("_exps.weight") and values.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(values, expert_qtype),
                              raw_dtype=expert_qtype)
        else:
            writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_bpe_tokenizer(writer, folder) -> None:
    import json
    from pathlib import Path

    spec = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    specials = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    vocab |= {content: index for index, content in specials.items()}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if vocab[t] in specials else 1 for t in tokens])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])


@pytest.fixture(scope="module")
def from_folder(tiny_moe):
    family, folder, _ = tiny_moe
    return family, load_checkpoint(folder)


ARCH_FIELDS = ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "attention_bias",
               "qk_norm", "clip_qkv", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size",
               "route_weights_float32", "tie_word_embeddings")


def test_a_gguf_moe_loads_the_tensors_and_architecture_of_its_hf_folder(from_folder, tmp_path):
    family, reference = from_folder
    hf = {name: tensor.numpy() for name, tensor in reference.tensors.items()}
    write_moe_gguf(tmp_path / "moe.gguf", hf, reference.arch)
    loaded = load_checkpoint(tmp_path / "moe.gguf")
    for field in ARCH_FIELDS:  # GGUF keeps float metadata in float32
        expected = getattr(reference.arch, field)
        expected = pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected
        assert getattr(loaded.arch, field) == expected, field
    moe_layers = [i for i in range(reference.arch.num_layers) if reference.arch.is_moe_layer(i)]
    assert [i for i in range(loaded.arch.num_layers) if loaded.arch.is_moe_layer(i)] == moe_layers
    assert set(loaded.tensors) == set(reference.tensors)
    for name, tensor in reference.tensors.items():
        assert np.array_equal(loaded.tensors[name].numpy(), tensor.numpy()), (family, name)


def test_quantized_stacked_experts_dequantize_slice_by_slice(from_folder, tmp_path):
    family, reference = from_folder
    hf = {name: tensor.numpy() for name, tensor in reference.tensors.items()}
    write_moe_gguf(tmp_path / "q8.gguf", hf, reference.arch,
                   expert_qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_checkpoint(tmp_path / "q8.gguf")
    name = "model.layers.0.mlp.experts.3.gate_proj.weight"  # rows of hidden (64): quantizable
    original, mine = hf[name], loaded.tensors[name].numpy()
    assert mine.shape == original.shape and not np.array_equal(mine, original)
    assert np.abs(mine - original).max() <= 0.01 * np.abs(original).max()


def test_skipping_experts_loads_everything_else_and_reads_no_expert(from_folder, tmp_path):
    """An expert disk tier reads the experts itself: the loader leaves them in the files, from
    HF folders and GGUF alike, and checks the rest as usual."""
    from tierserve.model.loader import ROUTED_EXPERT

    family, reference = from_folder
    hf = {name: tensor.numpy() for name, tensor in reference.tensors.items()}
    write_moe_gguf(tmp_path / "moe.gguf", hf, reference.arch)
    folder = reference.path
    for path in (folder, tmp_path / "moe.gguf"):
        lean = load_checkpoint(path, skip_experts=True)
        kept = {n for n in reference.tensors if not ROUTED_EXPERT.match(n)}
        assert set(lean.tensors) == kept and len(kept) < len(reference.tensors), (family, path)
        for name in kept:
            assert np.array_equal(lean.tensors[name].numpy(), reference.tensors[name].numpy())
