"""GGUF checkpoints: llama.cpp names and metadata mapped to HF names and a ModelArchConfig.

The name tables are data (principle 8). llama.cpp's converter changes two things beyond names:
  - ggml dims are stored reversed (read_gguf already returns torch order), and
  - for the llama architecture it permutes the rows of attn_q / attn_k so that each head's rotary
    pairs are interleaved (ggml's "normal" RoPE); HF's rotate_half wants the two halves of a head
    apart, so we undo it per head. Qwen2/3, Qwen-MoE and OLMoE use ggml's NEOX RoPE (=
    rotate_half) and are not permuted.
MoE files stack each layer's experts in one tensor per projection (``ffn_{gate,up,down}_exps``,
(experts, rows, cols)); they are sliced back into transformers' per-expert tensors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from tierserve.model.arch import SUPPORTED_ARCHITECTURES, ModelArchConfig
from tierserve.model.gguf_file import GGUFFile
from tierserve.model.loader import CheckpointError
from tierserve.model.packed import PACKABLE, PackedWeight, QuantType, from_gguf_bytes

log = logging.getLogger(__name__)

# GGUF name -> HF name; "{i}" is the layer index.
LLAMA_GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
QWEN2_GGUF_NAMES: dict[str, str] = {
    **LLAMA_GGUF_NAMES,
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
}
QK_NORM_GGUF_NAMES: dict[str, str] = {
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Experts are stacked in one tensor (experts, rows, cols); "{e}" names each slice's HF name.
MOE_GGUF_NAMES: dict[str, str] = {
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    # (hidden,) in GGUF, transformers' Linear(hidden, 1): (1, hidden)
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}
# Tensors that are not weights of the HF model: rope_freqs holds Llama 3's RoPE divisors.
NON_WEIGHT_TENSORS = frozenset({"rope_freqs.weight"})


@dataclass(frozen=True, slots=True)
class GGUFArchSpec:
    """How one llama.cpp architecture maps onto a tierserve architecture."""

    architecture: str  # tierserve / HF name
    tensor_names: dict[str, str]  # GGUF name template -> HF name template
    # GGUF name template -> ModelArchConfig field with that tensor's head count, for tensors whose
    # rows llama.cpp permuted (see module docstring); empty when nothing was permuted.
    permuted_rows: dict[str, str]
    attention_bias: bool
    qk_norm: str = ""
    moe_architecture: str = ""  # the architecture when the file has experts (llama: Mixtral)
    norm_topk_prob: bool = False  # unless {arch}.expert_weights_norm says
    route_weights_float32: bool = False


_LLAMA_PERMUTED = {"blk.{i}.attn_q.weight": "num_heads", "blk.{i}.attn_k.weight": "num_kv_heads"}
GGUF_ARCHITECTURES: dict[str, GGUFArchSpec] = {
    # Mistral GGUFs say "llama" too: same tensors, same permutation; so do Mixtral's, with experts.
    "llama": GGUFArchSpec("llama", LLAMA_GGUF_NAMES | MOE_GGUF_NAMES, _LLAMA_PERMUTED,
                          attention_bias=False, moe_architecture="mixtral", norm_topk_prob=True,
                          route_weights_float32=True),
    "qwen2": GGUFArchSpec("qwen2", QWEN2_GGUF_NAMES, {}, attention_bias=True),
    "qwen3": GGUFArchSpec("qwen3", LLAMA_GGUF_NAMES | QK_NORM_GGUF_NAMES, {},
                          attention_bias=False, qk_norm="head"),
    "qwen2moe": GGUFArchSpec("qwen2_moe", QWEN2_GGUF_NAMES | MOE_GGUF_NAMES, {},
                             attention_bias=True, moe_architecture="qwen2_moe"),
    "qwen3moe": GGUFArchSpec("qwen3_moe", LLAMA_GGUF_NAMES | QK_NORM_GGUF_NAMES | MOE_GGUF_NAMES,
                             {}, attention_bias=False, qk_norm="head",
                             moe_architecture="qwen3_moe", norm_topk_prob=True),
    "olmoe": GGUFArchSpec("olmoe", LLAMA_GGUF_NAMES | QK_NORM_GGUF_NAMES | MOE_GGUF_NAMES, {},
                          attention_bias=False, qk_norm="full", moe_architecture="olmoe"),
}
_LAYER_PREFIX = re.compile(r"^blk\.(\d+)\.")


def unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved pairs back to two halves.

    llama.cpp's ``permute`` is ``w.reshape(n_head, 2, dim, ...).swapaxes(1, 2)``; this is its inverse,
    the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``. Works on weights
    (rows, cols) and biases (rows,).
    """
    dim = weight.shape[0] // n_head // 2
    # (n_head, dim, 2, ...) -> (n_head, 2, dim, ...)
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_arch_config(gguf_file: GGUFFile) -> ModelArchConfig:
    """Build the ModelArchConfig from GGUF metadata (reads at most the small rope_freqs tensor)."""
    md = gguf_file.metadata
    spec = _arch_spec(gguf_file)
    prefix = f"{md['general.architecture']}."

    def get(key: str, default=None):
        return md.get(prefix + key, default)

    def need(key: str):
        if prefix + key not in md:
            raise CheckpointError(
                f"{gguf_file.path} lacks the metadata key {prefix + key}; re-convert it with a current llama.cpp"
            )
        return md[prefix + key]

    hidden, num_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(
        get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    )
    rope_theta = float(get("rope.freq_base", 10000.0))
    moe = _moe_fields(gguf_file, spec, get, int(need("block_count")))
    return ModelArchConfig(
        architecture=spec.moe_architecture if moe else spec.architecture,
        vocab_size=_vocab_size(gguf_file, get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=_kv_heads(get("attention.head_count_kv", num_heads), gguf_file),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in gguf_file.tensors,
        attention_bias=spec.attention_bias,
        rope_scaling=_rope_scaling(gguf_file, get, head_dim, rope_theta),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(md),
        name=str(md.get("general.name") or gguf_file.path.stem),
        qk_norm=spec.qk_norm,
        clip_qkv=get("attention.clamp_kqv"),
        **moe,
    )


def _moe_fields(gguf_file: GGUFFile, spec: GGUFArchSpec, get, num_layers: int) -> dict:
    """The MoE part of the config: counts from metadata, sizes from the stacked tensors, and
    the MoE layers as those that have a router (Qwen-MoE files may keep some layers dense)."""
    num_experts = int(get("expert_count") or 0)
    if not num_experts or not spec.moe_architecture:
        return {}
    tensors = gguf_file.tensors
    moe_layers = tuple(i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" in tensors)
    if not moe_layers:
        raise CheckpointError(f"{gguf_file.path} declares {num_experts} experts but no layer "
                              "has a router (blk.N.ffn_gate_inp.weight)")
    first = moe_layers[0]
    shared = tensors.get(f"blk.{first}.ffn_gate_shexp.weight")
    norm = get("expert_weights_norm")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(get("expert_used_count") or 0),
        moe_intermediate_size=int(tensors[f"blk.{first}.ffn_gate_exps.weight"].shape[1]),
        norm_topk_prob=spec.norm_topk_prob if norm is None else bool(norm),
        shared_expert_intermediate_size=int(shared.shape[0]) if shared is not None else 0,
        moe_layer_ids=moe_layers,
        route_weights_float32=spec.route_weights_float32,
    )


def load_gguf_tensors(
    gguf_file: GGUFFile, arch: ModelArchConfig, dtype: torch.dtype, skip_experts: bool = False,
    keep_packed: bool = False,
) -> dict[str, torch.Tensor]:
    """Dequantize every weight once, un-permute q/k where needed, and return it under its HF name
    (without the stacked routed experts with ``skip_experts``: those are never read).
    ``keep_packed``: linear and embedding weights stored as Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K stay packed
    (PackedWeight, rows un-permuted as blocks); other types are dequantized, and the log says
    which."""
    spec = _arch_spec(gguf_file)
    tensors: dict[str, torch.Tensor] = {}
    unpacked: set[str] = set()
    for name, info in gguf_file.tensors.items():
        if name in NON_WEIGHT_TENSORS:
            continue
        match = _LAYER_PREFIX.match(name)
        template = _LAYER_PREFIX.sub("blk.{i}.", name) if match else name
        if template not in spec.tensor_names:
            raise CheckpointError(
                f"{gguf_file.path}: tensor {name!r} has no HF name for architecture {spec.architecture}; "
                "this GGUF has parts tierserve's model lacks (check it is a plain text decoder)"
            )
        if skip_experts and "{e}" in spec.tensor_names[template]:
            continue
        hf_name = spec.tensor_names[template]
        layer = {"i": int(match.group(1))} if match else {}
        if keep_packed and "{e}" not in hf_name and PACKABLE.match(hf_name.format(**layer)):
            packed = _packed(gguf_file, info, template, spec, arch)
            if packed is not None:
                tensors[hf_name.format(**layer)] = packed
                continue
            unpacked.add(info.qtype.name)
        try:
            values = gguf_file.read_float32(name)
        except NotImplementedError:
            raise CheckpointError(
                f"{gguf_file.path}: tensor {name!r} is stored as {info.qtype.name}, which the installed gguf "
                "package cannot dequantize; upgrade gguf (pip install -U gguf) or re-quantize the "
                "model to Q8_0, Q4_0, Q4_1 or a K-quant with llama-quantize"
            ) from None
        if template in spec.permuted_rows:
            values = unpermute_rotary_rows(values, getattr(arch, spec.permuted_rows[template]))
        if "{e}" in hf_name:  # stacked experts: one HF tensor per slice
            for expert, part in enumerate(values):
                tensors[hf_name.format(e=expert, **layer)] = torch.from_numpy(part).to(dtype)
            continue
        if template == "blk.{i}.ffn_gate_inp_shexp.weight":
            values = values.reshape(1, -1)
        tensors[hf_name.format(**layer)] = torch.from_numpy(values).to(dtype)
    if unpacked:
        log.warning("%s: linear weights stored as %s have no packed kernel; dequantized to %s",
                    gguf_file.path.name, ", ".join(sorted(unpacked)), dtype)
    return tensors


def _packed(gguf_file: GGUFFile, info, template: str, spec: GGUFArchSpec,
            arch: ModelArchConfig) -> PackedWeight | None:
    """A GGUF tensor of a packed kernel's type as a PackedWeight, or None for other types."""
    try:
        qtype = QuantType(info.qtype.name.lower())
    except ValueError:
        return None
    raw = np.memmap(gguf_file.path, dtype=np.uint8, mode="r", offset=info.offset,
                    shape=(info.n_bytes,))
    packed = from_gguf_bytes(raw, info.shape, qtype)
    if template in spec.permuted_rows:  # llama.cpp permuted whole rows: move them back
        order = np.arange(info.shape[0], dtype=np.int64)
        order = unpermute_rotary_rows(order, getattr(arch, spec.permuted_rows[template]))
        packed = packed.rows(torch.from_numpy(np.ascontiguousarray(order)))
    return packed


def _arch_spec(gguf_file: GGUFFile) -> GGUFArchSpec:
    gguf_arch = gguf_file.metadata.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf_file.path} is a GGUF of architecture {gguf_arch!r}; tierserve runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (GGUF architectures {', '.join(GGUF_ARCHITECTURES)})"
        )
    return GGUF_ARCHITECTURES[gguf_arch]


def _vocab_size(gguf_file: GGUFFile, declared: int | None) -> int:
    if declared:
        return int(declared)
    if "token_embd.weight" in gguf_file.tensors:
        return gguf_file.tensors["token_embd.weight"].shape[0]  # (vocab, hidden)
    return len(gguf_file.metadata.get("tokenizer.ggml.tokens", ()))


def _kv_heads(value: int | list[int], gguf_file: GGUFFile) -> int:
    if isinstance(value, list):  # some converters write one count per layer
        if len(set(value)) != 1:
            raise CheckpointError(
                f"{gguf_file.path} has per-layer kv head counts {sorted(set(value))}; tierserve needs one"
            )
        value = value[0]
    return int(value)


def _eos_token_ids(md: dict) -> list[int]:
    # llama.cpp stops on every end-of-generation token: eos, end-of-turn (Llama 3's <|eot_id|>), end-of-message.
    keys = (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    )
    ids = [int(md[k]) for k in keys if md.get(k) is not None]
    return list(dict.fromkeys(ids))


def _rope_scaling(gguf_file: GGUFFile, get, head_dim: int, rope_theta: float) -> dict | None:
    """HF-style rope_scaling from ``{arch}.rope.scaling.*`` keys, or from a rope_freqs tensor."""
    if "rope_freqs.weight" in gguf_file.tensors:
        return _llama3_rope_scaling(
            gguf_file.read_float32("rope_freqs.weight"), head_dim, rope_theta, gguf_file
        )
    rope_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor") or get("rope.scale_linear")  # scale_linear: older files
    if rope_type in (None, "none"):
        return (
            {"rope_type": "linear", "factor": float(factor)} if factor and factor != 1.0 else None
        )
    scaling: dict = {"rope_type": str(rope_type)}
    if factor:
        scaling["factor"] = float(factor)
    if original := get("rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(
    divisors: np.ndarray, head_dim: int, theta: float, gguf_file: GGUFFile
) -> dict | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's rope_freqs (one divisor per frequency).

    The divisors are 1 at high frequencies, ``factor`` at low ones, and in the band between
    1/d = (1 - s)/factor + s with s = (orig/wavelen - low)/(high - low). (orig, low, high) are fixed
    only up to a common scale, so we take low = 1 (as every Llama 3.x does) and fit high and orig
    from the band; with under two band points we fall back to Llama 3.1's high = 4, orig = 8192.
    """
    divisors = divisors.astype(np.float64).reshape(-1)
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(divisors.max())
    if divisors.shape != wavelen.shape or factor <= 1.0:
        log.warning(
            "%s: ignoring rope_freqs of shape %s (head_dim %d)",
            gguf_file.path,
            divisors.shape,
            head_dim,
        )
        return None
    band = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    high, original = 4.0, 8192.0
    if band.sum() >= 2:
        smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(
            1 / wavelen[band], smooth, 1
        )  # smooth = slope/wavelen + intercept
        if intercept < 0:
            high = 1 - 1 / intercept
            original = slope * (high - 1)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(round(original)),
    }
    if not np.allclose(llama3_rope_divisors(scaling, wavelen), divisors, rtol=1e-3):
        log.warning(
            "%s: rope_freqs do not fit Llama 3 rope scaling; using %s anyway",
            gguf_file.path,
            scaling,
        )
    return scaling


def llama3_rope_divisors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    """llama.cpp's rope_freqs for an HF llama3 rope_scaling dict (inv_freq is divided by these)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    band = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, band)
    )
