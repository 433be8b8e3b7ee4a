"""Cost models: how long one engine step takes, from the shape of its batch.

A ``CostModel`` sees a ``BatchShape`` (per chunk: new tokens, context it attends, whether it
samples), never tokens. ``RooflineCostModel`` prices each operator from a model's sizes and a
hardware profile: time = max(FLOPs / (peak * achieved fraction), bytes / (bandwidth *
achieved fraction)), the compute fraction rising with tokens per step (small GEMMs do not fill
the machine), plus tensor/pipeline-parallel communication and a per-step CPU overhead.

Per layer, for T new tokens over chunks (n_i tokens after c_i cached ones), tensor parallel t:

    qkv, o_proj, mlp   FLOPs 2 T P / t          bytes P b / t (weights streamed once a step)
    attention          FLOPs 4 q sum n_i (c_i + (n_i + 1) / 2) / t
                       bytes 2 kv b sum (c_i + n_i) / t   (each chunk reads its K/V once)
    elementwise        bytes ~ T (12 H + 3 I) b  (norms, rotary, residuals, activation)
    all-reduce         2 per layer of T H b bytes, ring: 2 (t - 1) / t of it per link

Prefill chunks and decodes are priced as two attention kernels (as FlashAttention's varlen and
paged-decode kernels are separate launches); the LM head runs on sampled rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from tierserve.sim.hardware import HardwareProfile
from tierserve.sim.model_shape import ModelShape


@dataclass(slots=True, frozen=True)
class ChunkShape:
    """One request's share of a step: ``num_tokens`` new tokens after ``context`` tokens of KV."""

    num_tokens: int
    context: int
    sample: bool = True

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.context > 0


@dataclass(slots=True, frozen=True)
class BatchShape:
    """What a cost model sees of a step."""

    chunks: tuple[ChunkShape, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def num_sampled(self) -> int:
        return sum(chunk.sample for chunk in self.chunks)

    @property
    def decodes(self) -> list[ChunkShape]:
        return [chunk for chunk in self.chunks if chunk.is_decode]

    @property
    def prefills(self) -> list[ChunkShape]:
        return [chunk for chunk in self.chunks if not chunk.is_decode]

    @classmethod
    def of(cls, *chunks: tuple[int, int]) -> BatchShape:
        """From (num_tokens, context) pairs, each sampling."""
        return cls(tuple(ChunkShape(n, c) for n, c in chunks))


class CostModel(Protocol):
    """Prices a step. ``breakdown`` splits the same total into named parts (seconds)."""

    def step_seconds(self, batch: BatchShape) -> float: ...

    def breakdown(self, batch: BatchShape) -> dict[str, float]: ...


@dataclass(slots=True, frozen=True)
class LinearCostModel:
    """``fixed_s + per_token_s * tokens + per_context_s * attended context``: for tests and
    for what-if runs with a known step time."""

    fixed_s: float = 0.01
    per_token_s: float = 0.0
    per_context_s: float = 0.0

    def step_seconds(self, batch: BatchShape) -> float:
        return sum(self.breakdown(batch).values())

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        context = sum(chunk.context + chunk.num_tokens for chunk in batch.chunks)
        return {"fixed": self.fixed_s if batch.chunks else 0.0,
                "tokens": self.per_token_s * batch.num_tokens,
                "context": self.per_context_s * context}


@dataclass(slots=True, frozen=True)
class Efficiency:
    """Achieved fractions of the peaks, and the CPU's share of a step.

    Defaults are typical of published A100/H100 measurements of bf16 serving: cuBLAS GEMMs near
    65-70% of peak at thousands of rows, weight streaming at ~80% of HBM bandwidth,
    FlashAttention-2 at ~50% of peak in prefill and paged decode attention at ~60% of HBM
    bandwidth; vLLM-era engines spend ~2-4 ms of CPU per step.
    """

    gemm_peak_fraction: float = 0.7
    gemm_half_tokens: float = 64.0  # tokens per step at which GEMMs reach half that fraction
    weight_bandwidth_fraction: float = 0.8
    attention_flops_fraction: float = 0.5
    attention_bandwidth_fraction: float = 0.6
    elementwise_bandwidth_fraction: float = 0.7
    step_overhead_s: float = 2.5e-3
    per_chunk_overhead_s: float = 15e-6

    def __post_init__(self) -> None:
        for name in ("gemm_peak_fraction", "weight_bandwidth_fraction", "attention_flops_fraction",
                     "attention_bandwidth_fraction", "elementwise_bandwidth_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")

    def gemm_fraction(self, num_tokens: int) -> float:
        """Achieved fraction of peak FLOPS for GEMMs of ``num_tokens`` rows: rises with the rows
        and saturates (MFU by tokens per step)."""
        return self.gemm_peak_fraction * num_tokens / (num_tokens + self.gemm_half_tokens)


@dataclass(slots=True, frozen=True)
class Parallelism:
    """Tensor and pipeline parallel degrees."""

    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        if self.tensor < 1 or self.pipeline < 1:
            raise ValueError("tensor and pipeline parallel degrees must be >= 1")


@dataclass(slots=True)
class RooflineCostModel:
    """Per-operator roofline of a model on hardware (see the module docstring).

    Pipeline parallelism runs the stages one after another within a step (no micro-batches
    in flight across stages), so it adds capacity, not speed: a stated simplification.
    """

    model: ModelShape
    hardware: HardwareProfile
    efficiency: Efficiency = field(default_factory=Efficiency)
    parallel: Parallelism = field(default_factory=Parallelism)

    def step_seconds(self, batch: BatchShape) -> float:
        return sum(self.breakdown(batch).values())

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        if not batch.chunks:
            return {}
        m, hw, eff = self.model, self.hardware, self.efficiency
        tp, layers = self.parallel.tensor, m.num_layers
        tokens, b = batch.num_tokens, m.dtype_bytes
        gemm_flops_rate = hw.bf16_flops * eff.gemm_fraction(tokens)
        weight_rate = hw.memory_bandwidth * eff.weight_bandwidth_fraction

        def gemm(params: int, rows: int, rate: float = gemm_flops_rate) -> float:
            return max(2 * rows * params / tp / rate, params * b / tp / weight_rate)

        parts = {
            "qkv_proj": layers * gemm(m.hidden_size * (m.q_size + 2 * m.kv_size), tokens),
            "o_proj": layers * gemm(m.q_size * m.hidden_size, tokens),
            "mlp": layers * self._mlp_seconds(tokens, gemm),
            "attention_prefill": layers * self._attention(batch.prefills),
            "attention_decode": layers * self._attention(batch.decodes),
            "elementwise": layers * tokens * (12 * m.hidden_size + 3 * m.intermediate_size) * b
            / tp / (hw.memory_bandwidth * eff.elementwise_bandwidth_fraction),
        }
        sampled = batch.num_sampled
        parts["lm_head"] = gemm(m.embedding_params, sampled,
                                hw.bf16_flops * eff.gemm_fraction(max(1, sampled)))
        parts["tp_all_reduce"] = layers * 2 * self._all_reduce(tokens * m.hidden_size * b)
        parts["pp_send_recv"] = (self.parallel.pipeline - 1) * (
            hw.interconnect_latency_s + tokens * m.hidden_size * b / hw.interconnect_bandwidth)
        parts["cpu_overhead"] = eff.step_overhead_s + eff.per_chunk_overhead_s * len(batch.chunks)
        return parts

    def _mlp_seconds(self, tokens: int, gemm) -> float:
        m = self.model
        if not m.num_experts:
            return gemm(m.expert_params, tokens)
        # Experts touched by `tokens` tokens routed uniformly: E (1 - (1 - k/E)^T).
        touched = m.num_experts * (1 - (1 - m.experts_per_token / m.num_experts) ** tokens)
        rows_each = tokens * m.experts_per_token / max(touched, 1e-9)
        experts = max(1, math.ceil(touched))
        shared = 3 * m.hidden_size * m.shared_expert_intermediate_size
        return (experts * gemm(m.expert_params, max(1, round(rows_each)))
                + (gemm(shared, tokens) if shared else 0.0)
                + gemm(m.hidden_size * m.num_experts, tokens))

    def _attention(self, chunks: list[ChunkShape]) -> float:
        if not chunks:
            return 0.0
        m, hw, eff, tp = self.model, self.hardware, self.efficiency, self.parallel.tensor
        flops = sum(4 * m.q_size * c.num_tokens * (c.context + (c.num_tokens + 1) / 2)
                    for c in chunks) / tp
        kv_bytes = sum(2 * m.kv_size * m.dtype_bytes * (c.context + c.num_tokens)
                       for c in chunks) / tp
        return max(flops / (hw.bf16_flops * eff.attention_flops_fraction),
                   kv_bytes / (hw.memory_bandwidth * eff.attention_bandwidth_fraction))

    def _all_reduce(self, message_bytes: int) -> float:
        tp = self.parallel.tensor
        if tp == 1:
            return 0.0
        hw = self.hardware
        return hw.interconnect_latency_s + 2 * (tp - 1) / tp * message_bytes / hw.interconnect_bandwidth

    def kv_capacity_tokens(self, memory_utilization: float = 0.9,
                           activation_reserve_bytes: float = 2e9) -> int:
        """Tokens of KV that fit beside the weights, summed over the tensor-parallel group (each
        GPU holds 1/t of the weights and of every token's KV), per pipeline stage likewise."""
        m, hw = self.model, self.hardware
        gpus = self.parallel.tensor * self.parallel.pipeline
        free = gpus * (hw.memory_bytes * memory_utilization - activation_reserve_bytes) - m.weight_bytes
        if free <= 0:
            raise ValueError(f"{m.name} ({m.weight_bytes / 1e9:.1f} GB of weights) does not fit "
                             f"{gpus} x {hw.name}; raise --tp or --pp")
        return int(free // m.kv_bytes_per_token)
