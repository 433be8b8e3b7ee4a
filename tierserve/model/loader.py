"""Load a checkpoint (a GGUF file or an HF safetensors folder) as HF-named tensors plus its ModelArchConfig.

Whatever the source, the result uses transformers' parameter names and layouts, so the model code
and the golden tests against transformers see one convention. GGUF specifics live in loader_gguf.py.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tierserve.model.arch import ModelArchConfig

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"


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


# A routed expert's tensor, under its HF name (its layer, its expert, which projection).
ROUTED_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32,
                    skip_experts: bool = False, quantization: str = "none") -> LoadedCheckpoint:
    """Load the weights at ``path`` (a .gguf file or a folder with config.json) as ``dtype``.

    GGUF weights are dequantized to float32 once, then cast. Every expected tensor must be present
    with the shape the config implies; anything else raises CheckpointError. ``skip_experts``:
    leave every routed expert's weights in the files (an expert disk tier reads them itself), so
    a model whose experts do not fit in memory still loads. ``quantization`` (ModelConfig's):
    "gguf" keeps a GGUF's packed linears packed; "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"
    pack every linear.
    """
    path = Path(path)
    source_format = _source_format(path)
    if quantization == "gguf" and source_format != "gguf":
        raise CheckpointError(f"--quantization gguf keeps a GGUF file's packed tensors; {path} is "
                              "a safetensors folder: pass --quantization q8_0, q4_0, q4_1, q4_k, "
                              "q5_k or q6_k to pack it at load")
    start = time.perf_counter()
    # Packing quantizes from float32 (bytes as llama-quantize writes them); the rest is cast after.
    load_dtype = torch.float32 if quantization != "none" else dtype
    if source_format == "gguf":
        from tierserve.model.gguf_file import read_gguf
        from tierserve.model.loader_gguf import gguf_arch_config, load_gguf_tensors

        gguf_file = read_gguf(path)
        arch = gguf_arch_config(gguf_file)
        _check_quantizable(arch, path, quantization)
        tensors = load_gguf_tensors(gguf_file, arch, load_dtype, skip_experts,
                                    keep_packed=quantization != "none")
    else:
        from tierserve.model.loader_hf import hf_arch_config, load_safetensors

        arch = hf_arch_config(path)
        _check_quantizable(arch, path, quantization)
        tensors = load_safetensors(path, arch, load_dtype, skip_experts)
    _check_tensors(tensors, arch, path, skip_experts)
    if quantization != "none":
        _pack(tensors, quantization, dtype, path)
    log.info(
        "loaded %s (%d tensors, %s) in %.1f s",
        path,
        len(tensors),
        source_format,
        time.perf_counter() - start,
    )
    return LoadedCheckpoint(arch=arch, tensors=tensors, source_format=source_format, path=path)


def _check_quantizable(arch: ModelArchConfig, path: Path, quantization: str) -> None:
    if quantization != "none" and arch.num_experts:
        raise CheckpointError(f"--quantization packs dense models' weights; {path} is an MoE "
                              "model: its experts' memory is set by --expert-host-format q8|q4")


def _pack(tensors: dict, quantization: str, dtype: torch.dtype, path: Path) -> None:
    """Pack the packable float32 weights (--quantization q8_0 ... q6_k), then cast what stays
    float to dtype."""
    from tierserve.model.packed import PackedWeight, QuantType, pack_tensors

    if quantization != "gguf":
        try:
            pack_tensors(tensors, QuantType(quantization))
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
    for name, weight in tensors.items():
        if not isinstance(weight, PackedWeight):
            tensors[name] = weight.to(dtype)


def load_arch_config(path: str | Path) -> ModelArchConfig:
    """Read only the architecture of the checkpoint at ``path``: no weights are loaded (tens of ms)."""
    path = Path(path)
    if _source_format(path) == "gguf":
        from tierserve.model.gguf_file import read_gguf
        from tierserve.model.loader_gguf import gguf_arch_config

        return gguf_arch_config(read_gguf(path))
    from tierserve.model.loader_hf import hf_arch_config

    return hf_arch_config(path)


def expected_tensor_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``arch`` must hold, by HF name, with its torch shape."""
    hidden, vocab = arch.hidden_size, arch.vocab_size
    q_rows, kv_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
    }
    if arch.attention_bias:
        attention |= {
            "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,),
        }
    if arch.qk_norm:
        q_width, k_width = ((arch.head_dim, arch.head_dim) if arch.qk_norm == "head"
                            else (q_rows, kv_rows))
        attention |= {"self_attn.q_norm.weight": (q_width,), "self_attn.k_norm.weight": (k_width,)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(arch.num_layers):
        layer = attention | (_moe_shapes(arch) if arch.is_moe_layer(i)
                             else _mlp_shapes("mlp.", arch.intermediate_size, hidden))
        shapes |= {f"model.layers.{i}.{suffix}": shape for suffix, shape in layer.items()}
    return shapes


def _mlp_shapes(prefix: str, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}gate_proj.weight": (ffn, hidden), f"{prefix}up_proj.weight": (ffn, hidden),
            f"{prefix}down_proj.weight": (hidden, ffn)}


def _moe_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    hidden = arch.hidden_size
    shapes = {"mlp.gate.weight": (arch.num_experts, hidden)}
    for e in range(arch.num_experts):
        shapes |= _mlp_shapes(f"mlp.experts.{e}.", arch.moe_intermediate_size, hidden)
    if arch.shared_expert_intermediate_size:
        shapes |= _mlp_shapes("mlp.shared_expert.", arch.shared_expert_intermediate_size, hidden)
        shapes["mlp.shared_expert_gate.weight"] = (1, hidden)
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


def _check_tensors(tensors: dict[str, torch.Tensor], arch: ModelArchConfig, path: Path,
                   skip_experts: bool = False) -> None:
    expected = expected_tensor_shapes(arch)
    if skip_experts:  # their tier checks them
        expected = {name: shape for name, shape in expected.items()
                    if not ROUTED_EXPERT.match(name)}
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its {arch.architecture} config: missing {few(missing)}, "
            f"unexpected {few(unexpected)}; check that the config describes these weights"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)} but the config implies {shape} "
                f"(hidden {arch.hidden_size}, heads {arch.num_heads}/{arch.num_kv_heads} x {arch.head_dim}, "
                f"ffn {arch.intermediate_size}, vocab {arch.vocab_size}); the config does not fit the weights"
            )


def few(names: list[str], limit: int = 4) -> str:
    """Up to ``limit`` names for an error message, then how many more."""
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
