"""HF safetensors folders: config.json -> ModelArchConfig, and the weights under the names the
model code reads (transformers' Llama names; MoE experts as ``mlp.experts.{e}.*``).

What differs between families is data: ``FAMILIES`` says where each config.json keeps its MoE
and attention settings, and ``RENAMES`` maps checkpoint names that differ from ours (Mixtral's
``block_sparse_moe.experts.{e}.w1``) onto them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tierserve.model.arch import SUPPORTED_ARCHITECTURES, ModelArchConfig
from tierserve.model.loader import CheckpointError, few

log = logging.getLogger(__name__)

# Buffers some older HF checkpoints saved next to the weights; the model recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class Family:
    """Where a model_type's config.json keeps what ModelArchConfig needs beyond a Llama's."""

    attention_bias: bool = False  # q/k/v biases always present (Qwen2's)
    attention_bias_key: str | None = None  # ...or present when this key is true
    qk_norm: str = ""
    clip_qkv_key: str | None = None
    experts_keys: tuple[str, ...] = ()  # the first present counts the experts; (): dense
    expert_ffn_key: str = "moe_intermediate_size"
    norm_topk_prob: bool | None = None  # None: read "norm_topk_prob" from the config
    weights_float32: bool = False
    sparse_step: bool = False  # decoder_sparse_step / mlp_only_layers pick the MoE layers
    shared_expert: bool = False
    unit_expert_weights: bool = False
    renames: tuple[tuple[str, str], ...] = field(default=())


_MIXTRAL_RENAMES = (
    (r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
)

# transformers 5 writes num_local_experts where older configs (and other families) say num_experts
_NUM_EXPERTS = ("num_experts", "num_local_experts")

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(attention_bias=True),
    "qwen3": Family(qk_norm="head"),
    "mixtral": Family(experts_keys=("num_local_experts",), expert_ffn_key="intermediate_size",
                      norm_topk_prob=True, weights_float32=True, renames=_MIXTRAL_RENAMES),
    "qwen2_moe": Family(attention_bias_key="qkv_bias", experts_keys=_NUM_EXPERTS,
                        sparse_step=True, shared_expert=True),
    "qwen3_moe": Family(qk_norm="head", experts_keys=_NUM_EXPERTS, sparse_step=True),
    "olmoe": Family(qk_norm="full", clip_qkv_key="clip_qkv", experts_keys=_NUM_EXPERTS,
                    expert_ffn_key="intermediate_size"),
    # Written by tierserve moefy: a Llama whose FFNs are partitioned into unweighted experts.
    "tierserve_moefied": Family(attention_bias_key="qkv_bias", experts_keys=("num_local_experts",),
                                unit_expert_weights=True),
}


def hf_arch_config(folder: Path) -> ModelArchConfig:
    """The architecture a folder's config.json (and generation_config.json) describes."""
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{folder}/config.json has model_type {model_type!r}; tierserve runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = FAMILIES[model_type]
    attention_bias = family.attention_bias or bool(
        family.attention_bias_key and config.get(family.attention_bias_key, True))
    if config.get("mlp_bias") or (not attention_bias and config.get("attention_bias")):
        raise CheckpointError(
            f"{folder}: {model_type} with attention_bias/mlp_bias (biases on o_proj or the MLP) "
            "is not supported; tierserve's Llama has no biases there"
        )
    _warn_sliding_window(config, folder)

    def need(key: str):
        if config.get(key) is None:
            raise CheckpointError(
                f"{folder}/config.json lacks {key!r}; re-save it with transformers"
            )
        return config[key]

    hidden, num_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope_theta, rope_scaling = _hf_rope(config)
    generation = folder / "generation_config.json"
    eos_sources = [config.get("eos_token_id")]
    if generation.is_file():
        eos_sources.append(_read_json(generation).get("eos_token_id"))
    num_layers = int(need("num_hidden_layers"))
    return ModelArchConfig(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(need("rms_norm_eps")),
        rope_theta=rope_theta,
        max_position_embeddings=int(need("max_position_embeddings")),
        # Llama, Mistral and Qwen2 configs all default to untied.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        rope_scaling=rope_scaling,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_token_ids(eos_sources),
        name=folder.name,
        qk_norm=family.qk_norm,
        clip_qkv=config.get(family.clip_qkv_key) if family.clip_qkv_key else None,
        **_moe_fields(config, family, num_layers, need),
    )


def _moe_fields(config: dict, family: Family, num_layers: int, need) -> dict:
    num_experts = next((config[key] for key in family.experts_keys if config.get(key)), 0)
    if not num_experts:
        return {}
    fields = dict(
        num_experts=int(num_experts),
        num_experts_per_tok=int(need("num_experts_per_tok")),
        moe_intermediate_size=int(need(family.expert_ffn_key)),
        norm_topk_prob=(family.norm_topk_prob if family.norm_topk_prob is not None
                        else bool(config.get("norm_topk_prob", False))),
        route_weights_float32=family.weights_float32,
        unit_expert_weights=family.unit_expert_weights,
    )
    if family.sparse_step:
        step, dense = int(config.get("decoder_sparse_step") or 1), config.get("mlp_only_layers") or []
        fields["moe_layer_ids"] = tuple(i for i in range(num_layers)
                                        if i not in dense and (i + 1) % step == 0)
    if family.shared_expert:
        fields["shared_expert_intermediate_size"] = int(
            config.get("shared_expert_intermediate_size") or 0)
    return fields


def load_safetensors(folder: Path, arch: ModelArchConfig, dtype: torch.dtype,
                     skip_experts: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the folder as ``dtype``, under the model code's names (without the
    routed experts' with ``skip_experts``: those are never read)."""
    from safetensors import safe_open

    from tierserve.model.loader import ROUTED_EXPERT

    renames = [(re.compile(pattern), target) for pattern, target in
               FAMILIES[arch.architecture].renames]
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as weights:
                for stored in weights.keys():  # noqa: SIM118 (safe_open is no dict)
                    if stored.endswith(_IGNORED_SUFFIXES):
                        continue
                    name = stored
                    for pattern, target in renames:
                        name = pattern.sub(target, name)
                    if skip_experts and ROUTED_EXPERT.match(name):
                        continue
                    tensor = weights.get_tensor(stored)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' messages do not say which file
            raise CheckpointError(f"cannot read {file}: {exc}; the file is truncated or damaged, "
                                  "re-create or re-copy the checkpoint") from exc
    if arch.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a saved copy of the embedding; the model ties
    return tensors


def _hf_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or the older keys."""
    scaling = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(scaling.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    return theta, None if rope_type == "default" else {"rope_type": rope_type, **scaling}


def _token_ids(sources: list[int | list[int] | None]) -> list[int]:
    ids: list[int] = []
    for source in sources:
        ids += [source] if isinstance(source, int) else list(source or [])
    return list(dict.fromkeys(ids))


def _warn_sliding_window(config: dict, folder: Path) -> None:
    # NOTE: ModelArchConfig has no sliding window; attention is full. Identical up to the window.
    window = config.get("sliding_window")
    if (window and config.get("model_type") in ("mistral", "mixtral")) or config.get(
            "use_sliding_window"):
        log.warning(
            "%s uses sliding-window attention (%s tokens), which tierserve does not implement; "
            "outputs differ from the reference past the window",
            folder,
            window,
        )


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    # Sharded: take only the listed shards (a folder may also hold consolidated.safetensors).
    if index.is_file():
        files = [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(
                f"{folder} lacks the shards {few(missing)} listed in {index.name}; download them"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder} has no *.safetensors files; tierserve loads safetensors only "
            "(re-save with model.save_pretrained(folder, safe_serialization=True))"
        )
    return files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); re-download or re-save it"
        ) from None
