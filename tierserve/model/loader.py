"""Load a checkpoint (a GGUF file or an HF safetensors folder) as HF-named tensors plus its ModelArchConfig.

Whatever the source, the result uses transformers' parameter names and layouts, so the model code
and the golden tests against transformers see one convention. GGUF specifics live in loader_gguf.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tierserve.model.arch import SUPPORTED_ARCHITECTURES, ModelArchConfig

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
# Buffers some older HF checkpoints saved next to the weights; the model recomputes them.
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as it is; the message says what to change."""


@dataclass(slots=True)
class LoadedCheckpoint:
    """A checkpoint's weights under HF names, ready for the model to take.

    Names: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``
    (plus ``.bias`` on q/k/v when ``arch.attention_bias``), ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
    ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight`` and
    ``lm_head.weight`` (absent when ``arch.tie_word_embeddings``: the model ties it to the embedding).
    """

    arch: ModelArchConfig
    tensors: dict[str, torch.Tensor]
    source_format: str  # "gguf" | "safetensors"
    path: Path

    def __post_init__(self) -> None:
        if self.source_format not in ("gguf", "safetensors"):
            raise ValueError(
                f"source_format must be 'gguf' or 'safetensors', not {self.source_format!r}"
            )


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Load the weights at ``path`` (a .gguf file or a folder with config.json) as ``dtype``.

    GGUF weights are dequantized to float32 once, then cast. Every expected tensor must be present
    with the shape the config implies; anything else raises CheckpointError.
    """
    path = Path(path)
    source_format = _source_format(path)
    start = time.perf_counter()
    if source_format == "gguf":
        from tierserve.model.gguf_file import read_gguf
        from tierserve.model.loader_gguf import gguf_arch_config, load_gguf_tensors

        gguf_file = read_gguf(path)
        arch = gguf_arch_config(gguf_file)
        tensors = load_gguf_tensors(gguf_file, arch, dtype)
    else:
        arch = _hf_arch_config(path)
        tensors = _load_safetensors(path, arch, dtype)
    _check_tensors(tensors, arch, path)
    log.info(
        "loaded %s (%d tensors, %s) in %.1f s",
        path,
        len(tensors),
        source_format,
        time.perf_counter() - start,
    )
    return LoadedCheckpoint(arch=arch, tensors=tensors, source_format=source_format, path=path)


def load_arch_config(path: str | Path) -> ModelArchConfig:
    """Read only the architecture of the checkpoint at ``path``: no weights are loaded (tens of ms)."""
    path = Path(path)
    if _source_format(path) == "gguf":
        from tierserve.model.gguf_file import read_gguf
        from tierserve.model.loader_gguf import gguf_arch_config

        return gguf_arch_config(read_gguf(path))
    return _hf_arch_config(path)


def expected_tensor_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``arch`` must hold, by HF name, with its torch shape."""
    hidden, ffn, vocab = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q_rows, kv_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    if arch.attention_bias:
        layer |= {
            "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,),
        }
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(arch.num_layers):
        shapes |= {f"model.layers.{i}.{suffix}": shape for suffix, shape in layer.items()}
    return shapes


def _source_format(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a .gguf file or a Hugging Face folder with "
            "config.json and *.safetensors (tierserve.model.hub.resolve_model also takes names like 'smollm2')"
        )
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == _GGUF_MAGIC:
                return "gguf"
        raise CheckpointError(
            f"{path} is not a GGUF file; pass a .gguf file or a folder with config.json"
        )
    if (path / "config.json").is_file():
        return "safetensors"
    raise CheckpointError(
        f"{path} has no config.json; pass a Hugging Face model folder, or the .gguf file itself"
    )


def _check_tensors(tensors: dict[str, torch.Tensor], arch: ModelArchConfig, path: Path) -> None:
    expected = expected_tensor_shapes(arch)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its {arch.architecture} config: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; check that the config describes these weights"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)} but the config implies {shape} "
                f"(hidden {arch.hidden_size}, heads {arch.num_heads}/{arch.num_kv_heads} x {arch.head_dim}, "
                f"ffn {arch.intermediate_size}, vocab {arch.vocab_size}); the config does not fit the weights"
            )


def _few(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- HF safetensors folders ---------------------------------------------------------------


def _hf_arch_config(folder: Path) -> ModelArchConfig:
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{folder}/config.json has model_type {model_type!r}; tierserve runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("mlp_bias") or (model_type != "qwen2" and config.get("attention_bias")):
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
    return ModelArchConfig(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(need("rms_norm_eps")),
        rope_theta=rope_theta,
        max_position_embeddings=int(need("max_position_embeddings")),
        # Llama, Mistral and Qwen2 configs all default to untied.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",  # Qwen2's q/k/v always carry biases
        rope_scaling=rope_scaling,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_token_ids(eos_sources),
        name=folder.name,
    )


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
    if (window and config.get("model_type") == "mistral") or config.get("use_sliding_window"):
        log.warning(
            "%s uses sliding-window attention (%s tokens), which tierserve does not implement; "
            "outputs differ from the reference past the window",
            folder,
            window,
        )


def _load_safetensors(
    folder: Path, arch: ModelArchConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        for name, tensor in load_file(file).items():
            if name.endswith(_IGNORED_HF_SUFFIXES):
                continue
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if arch.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a saved copy of the embedding; the model ties
    return tensors


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    # Sharded: take only the listed shards (a folder may also hold consolidated.safetensors).
    if index.is_file():
        files = [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(
                f"{folder} lacks the shards {_few(missing)} listed in {index.name}; download them"
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
