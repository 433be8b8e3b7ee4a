"""A model's shape for the cost models: read from an HF ``config.json`` or a known name.

Only sizes matter here (no weights). Known names carry the values of their published
``config.json`` so the paper reproductions need no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(slots=True, frozen=True)
class ModelShape:
    """Sizes of a decoder-only transformer (Llama family, optionally MoE)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # per expert (0: intermediate_size)
    shared_expert_intermediate_size: int = 0
    dtype_bytes: int = 2  # bfloat16 weights and KV

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {self.name}: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: {self.num_heads} heads do not split into "
                             f"{self.num_kv_heads} KV heads")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"model {self.name}: experts_per_token must be in 1..num_experts")

    # -- sizes -----------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """Weights of one layer's QKV and output projections."""
        return self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size

    @property
    def expert_params(self) -> int:
        """Weights of one gated MLP expert (the dense MLP when not MoE)."""
        inner = self.moe_intermediate_size or self.intermediate_size
        return 3 * self.hidden_size * inner

    def _feed_forward(self, experts: int) -> int:
        if not self.num_experts:
            return self.expert_params
        shared = 3 * self.hidden_size * self.shared_expert_intermediate_size
        return experts * self.expert_params + shared + self.hidden_size * self.num_experts

    @property
    def mlp_params(self) -> int:
        """Weights of one layer's feed-forward (all experts, shared expert and router)."""
        return self._feed_forward(self.num_experts)

    @property
    def active_mlp_params(self) -> int:
        """Feed-forward weights one token multiplies."""
        return self._feed_forward(self.experts_per_token)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        """All weights: layers, embedding and (untied) LM head."""
        heads = 1 if self.tie_word_embeddings else 2
        per_layer = self.attention_params + self.mlp_params + 2 * self.hidden_size
        return self.dtype_bytes * (self.num_layers * per_layer + heads * self.embedding_params)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model") -> ModelShape:
        """From the fields of an HF ``config.json`` (Llama, Mistral, Qwen2/3, Mixtral, Qwen-MoE)."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                name=name, hidden_size=hidden,
                intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
                num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                num_experts=int(config.get("num_local_experts") or config.get("num_experts") or 0),
                experts_per_token=int(config.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(config.get("moe_intermediate_size") or 0),
                shared_expert_intermediate_size=int(
                    config.get("shared_expert_intermediate_size") or 0))
        except KeyError as exc:
            raise ValueError(f"config of {name} has no {exc.args[0]!r}; is it a decoder-only "
                             "transformer's config.json?") from None
        return shape


def _known(name: str, hidden: int, inner: int, layers: int, heads: int, kv_heads: int,
           vocab: int, **extra) -> ModelShape:
    return ModelShape(name, hidden, inner, layers, heads, kv_heads, hidden // heads, vocab,
                      **extra)


# Values from each model's config.json on its Hugging Face model card.
KNOWN_MODELS: dict[str, ModelShape] = {shape.name: shape for shape in (
    _known("mistral-7b", 4096, 14336, 32, 32, 8, 32000),  # mistralai/Mistral-7B-v0.1
    _known("yi-34b", 7168, 20480, 60, 56, 8, 64000),  # 01-ai/Yi-34B
    _known("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),  # meta-llama/Meta-Llama-3-8B
    _known("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),  # meta-llama/Llama-2-7b-hf
    _known("qwen2.5-32b", 5120, 27648, 64, 40, 8, 152064),  # Qwen/Qwen2.5-32B
    _known("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
    _known("mixtral-8x7b", 4096, 14336, 32, 32, 8, 32000, num_experts=8,
           experts_per_token=2),  # mistralai/Mixtral-8x7B-v0.1
)}


def load_model_shape(spec: str, dtype_bytes: int | None = None) -> ModelShape:
    """A known name, a ``config.json`` file, or a folder holding one."""
    if spec in KNOWN_MODELS:
        shape = KNOWN_MODELS[spec]
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model {spec!r} is neither a known name ({', '.join(KNOWN_MODELS)}) "
                             "nor a config.json (or a folder with one)")
        shape = ModelShape.from_hf_config(json.loads(path.read_text(encoding="utf-8")),
                                          name=path.parent.name or spec)
    return shape if dtype_bytes is None else replace(shape, dtype_bytes=dtype_bytes)
