"""The feed-forward half of a decoder layer: the dense gated MLP, and the mixture-of-experts layer
(route, group tokens by expert, run each active expert once over its tokens, scatter back).

Both take the step's flattened tokens ``(T, hidden)``. The MoE layer loops over the experts that
some token chose (at most ``num_experts`` per layer), never over tokens: the grouping is one
stable sort of the (token, expert) pairs, the scatter one ``index_add_``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tierserve.model.packed import concat_rows

# The linear layer type the model builds (tierserve.model.llama.Linear): ``linear(x)``.
LinearFactory = Callable[[torch.Tensor], object]


class DenseMLP:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one GEMM."""

    __slots__ = ("gate_up", "down")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 make_linear: LinearFactory) -> None:
        self.gate_up = make_linear(concat_rows([gate, up]))  # (2 * ffn, hidden)
        self.down = make_linear(down)  # (hidden, ffn)

    def __call__(self, x: torch.Tensor, ops=None, num_rows: int | None = None) -> torch.Tensor:
        if ops is not None:
            return self.down(ops.silu_mul(self.gate_up(x)))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    @classmethod
    def from_linears(cls, gate_up, down) -> DenseMLP:
        """An MLP over prepared linears (an offloaded expert's slot)."""
        mlp = cls.__new__(cls)
        mlp.gate_up, mlp.down = gate_up, down
        return mlp

    def linears(self) -> list:
        return [self.gate_up, self.down]


class MoEBlock:
    """Top-k routing over ``experts`` (each a DenseMLP), plus an optional sigmoid-gated shared
    expert (Qwen2-MoE). Numerics follow transformers: softmax of the router logits in float32,
    top-k of the probabilities, renormalised when ``norm_topk_prob``; weights in float32
    (Mixtral) or the model dtype (Qwen-MoE, OLMoE); each expert's output scaled by its weight
    and summed per token in expert order.

    ``unit_weights`` (MoEfied models): every chosen expert's output counts once.

    ``on_route``, when set, is called with the (T, top_k) expert ids of every forward: the hook
    the router traces (and the parity tests) read.

    ``experts`` is None when they are offloaded: then ``provider`` (an ``ExpertOffload``) holds
    the experts a forward needs and hands each over when its weights are in a fast slot.
    """

    def __init__(self, router: torch.Tensor, experts: list[DenseMLP] | None, top_k: int,
                 norm_topk_prob: bool, weights_float32: bool,
                 shared: DenseMLP | None = None, shared_gate: torch.Tensor | None = None,
                 layer_index: int = 0, unit_weights: bool = False) -> None:
        self.router = router  # (num_experts, hidden): tiny, a plain matmul
        self.experts = experts
        self.num_experts = router.shape[0]
        self.provider = None
        # Batch invariance (float32 on CPU): an expert's GEMM over fewer rows than this takes
        # another kernel with other roundings, so a token's output would depend on how many
        # others chose the same expert; groups are zero-padded up to it (the runner sets it).
        self.min_rows = 1
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weights_float32 = weights_float32
        self.shared, self.shared_gate = shared, shared_gate  # shared_gate: (1, hidden)
        self.layer_index = layer_index
        self.unit_weights = unit_weights
        self.on_route: Callable[[int, torch.Tensor], None] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, hidden) -> expert ids (T, k) int64 and their weights (T, k)."""
        logits = F.linear(x, self.router)  # (T, E)
        if self.unit_weights:  # the softmax would not change which experts win
            ids = torch.topk(logits, self.top_k, dim=-1).indices
            return ids, torch.ones(ids.shape, dtype=x.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_float32:
            weights = weights.to(x.dtype)
        return ids, weights

    def __call__(self, x: torch.Tensor, ops=None, num_rows: int | None = None) -> torch.Tensor:
        """(T, hidden) -> (T, hidden). Every row is routed (the step's padding keeps the router
        GEMM on one kernel), but only the first ``num_rows`` (the real tokens) run experts:
        padding wakes none, and its routed-expert output is zero."""
        ids, weights = self.route(x)
        real = x.shape[0] if num_rows is None else min(num_rows, x.shape[0])
        ids, weights = ids[:real], weights[:real]
        if self.on_route is not None:
            self.on_route(self.layer_index, ids)
        out = self.run_experts(x[:real], ids, weights, ops)
        if real < x.shape[0]:
            out = torch.cat([out, out.new_zeros(x.shape[0] - real, x.shape[1])])
        if self.shared is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_gate))  # (T, 1)
            out = out + gate * self.shared(x, ops)
        return out

    def run_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    ops=None) -> torch.Tensor:
        """Each chosen expert once over the rows that chose it; (T, hidden)."""
        num_tokens, k = ids.shape
        flat = ids.reshape(-1)  # (T * k,): pair p is token p // k's choice p % k
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        pair_weights = weights.reshape(-1)[order, None]  # (T * k, 1)
        rows = x[tokens]  # (T * k, hidden)
        outputs = torch.empty_like(rows)
        active = [expert for expert, count in enumerate(counts) if count]
        starts = dict(zip(active, itertools.accumulate([0] + [counts[e] for e in active])))
        # Small groups run padded to min_rows in one scratch buffer; its other rows hold
        # zeros or an earlier group's rows, which cannot change this group's (rows independent).
        scratch = rows.new_zeros(self.min_rows, rows.shape[1]) if self.min_rows > 1 else None

        def rows_of(expert: int) -> torch.Tensor:  # the rows that chose ``expert``
            return rows[starts[expert]:starts[expert] + counts[expert]]

        with self._experts(active, x, ids, counts, rows_of) as (expert_mlp, run_order):
            if len(run_order) != len(active):  # every group's rows must be written
                raise RuntimeError(f"layer {self.layer_index}: the expert provider ordered "
                                   f"{len(run_order)} of {len(active)} experts")
            for expert in run_order:  # groups are independent: any order gives the same rows
                start = starts[expert]
                end = start + counts[expert]
                group = rows[start:end]
                if counts[expert] < self.min_rows:
                    scratch[: counts[expert]] = group
                    group = scratch
                produced = expert_mlp(expert)(group, ops)[: counts[expert]]
                outputs[start:end] = (produced * pair_weights[start:end]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, outputs)

    def _experts(self, active: list[int], x: torch.Tensor, ids: torch.Tensor,
                 counts: list[int], rows_of: Callable[[int], torch.Tensor]):
        """A context that yields ``(expert -> mlp, the order to run active in)``: resident
        experts, or the provider's (which may run some elsewhere last). ``counts[e]``: the rows
        that chose expert ``e``; ``rows_of(e)``: those rows, in token order."""
        if self.provider is not None:
            return self.provider.use(self.layer_index, active, x, ids, counts, rows_of)
        return contextlib.nullcontext((self.experts.__getitem__, active))

    def linears(self) -> list:
        shared = self.shared.linears() if self.shared is not None else []
        experts = self.experts or []
        return [linear for expert in experts for linear in expert.linears()] + shared
