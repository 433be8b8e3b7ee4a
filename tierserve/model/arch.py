"""ModelArchConfig: the shape of a decoder-only transformer, read from a checkpoint's metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                           "qwen3_moe", "olmoe", "tierserve_moefied")


@dataclass(slots=True)
class ModelArchConfig:
    """Everything the model code needs to know about a checkpoint's architecture.

    Built by the loader from GGUF metadata or an HF ``config.json``; never from guesses.
    """

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; None means plain RoPE.
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    # RMSNorm on q and k before rotary: "head" normalizes each head (Qwen3), "full" the whole
    # projection (OLMoE); "" none. clip_qkv clamps q, k, v after it (OLMoE).
    qk_norm: str = ""
    clip_qkv: float | None = None
    # Mixture of experts (num_experts 0: dense). Each MoE layer routes every token to
    # num_experts_per_tok of num_experts gated MLPs of moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the chosen experts' weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert, sigmoid-gated
    moe_layer_ids: tuple[int, ...] | None = None  # None: every layer (when num_experts > 0)
    # Mixtral weighs expert outputs in float32, Qwen-MoE and OLMoE in the model dtype.
    route_weights_float32: bool = False
    # MoEfied dense models (tierserve moefy): the experts partition a dense FFN, so each chosen
    # expert's output counts once, unweighted, and all experts together equal the dense layer.
    unit_expert_weights: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"tierserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.qk_norm not in ("", "head", "full"):
            raise ValueError(f"qk_norm must be '', 'head' or 'full', got {self.qk_norm!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.num_experts}, got "
                             f"{self.num_experts_per_tok}")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` routes to experts (else it has the dense MLP)."""
        if not self.num_experts:
            return False
        return self.moe_layer_ids is None or index in self.moe_layer_ids
