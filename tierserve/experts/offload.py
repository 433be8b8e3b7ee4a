"""ExpertOffload: the expert provider of every MoE layer. It owns the fast slots (preallocated
weight tensors, on the device on GPU), loads experts into them on the KV tiers' copy worker
(``SwapWorker``: a thread, a CUDA stream on GPU), and asks its policy what to load ahead. The
bookkeeping (slots, loads in flight, prefetch) is ``ExpertBooks``, shared with the simulator.

A forward waits only for the experts its tokens chose, each just before it runs; the others keep
loading meanwhile. Loads never change numerics: a slot holds exactly the weights the source
returns, and an expert runs through the same code as a resident one.

With ``host_rows`` (``--expert-host-compute``), a miss that few rows chose is not loaded: the
forward runs it on the host tier's weights where they are (Fiddler's cold experts on the CPU;
on a GPU its rows go to the CPU and back). On a CPU it is the same code over the same weights,
so tokens do not change; on a GPU the CPU's roundings differ from the device's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from tierserve.experts.books import (
    OBSERVED_ROWS,
    ON_HOST,
    PREFETCH_WINDOW,
    ExpertBooks,
    ExpertLoad,
    OffloadStats,
)
from tierserve.experts.cache import ExpertKey
from tierserve.experts.policies import ExpertPolicy
from tierserve.experts.routes import StepRequest, prompt_key
from tierserve.experts.tiers import ExpertSource, HostExperts, VictimBuffer
from tierserve.model.kv_storage import SwapWorker
from tierserve.model.moe import DenseMLP, MoEBlock

__all__ = ["ExpertLoad", "ExpertOffload", "OffloadStats", "OBSERVED_ROWS"]


class ExpertOffload:
    """``num_slots`` experts resident; the rest come from ``source`` when needed."""

    def __init__(self, blocks: list[MoEBlock], source: ExpertSource, num_slots: int,
                 policy: ExpertPolicy, make_linear, predictor=None, traces=None,
                 prefetch_window: int | None = PREFETCH_WINDOW, victim_slots: int = 0,
                 host_rows: int = 0, make_host_linear=None) -> None:
        if not blocks:
            raise ValueError("expert offloading needs an MoE model; this one has no MoE layers")
        if host_rows and not isinstance(source, HostExperts):
            raise ValueError("--expert-host-compute runs experts on the host tier's weights; "
                             "keep them in host memory with --expert-host-format float|q8|q4")
        first = blocks[0]
        if num_slots < first.num_experts:
            raise ValueError(f"--expert-cache {num_slots} holds fewer experts than one layer has "
                             f"({first.num_experts}); a layer may need all of them at once")
        self.blocks = {block.layer_index: block for block in blocks}
        self.source = source
        self.policy = policy
        self.predictor = predictor
        self.traces = {prompt_key(t.prompt): t for t in traces or ()}
        sample = source.read((first.layer_index, 0))
        self.expert_bytes = sample.nbytes
        device = first.router.device
        self.gate_up = torch.zeros((num_slots, *sample.gate_up.shape), dtype=sample.gate_up.dtype,
                                   device=device)
        self.down = torch.zeros((num_slots, *sample.down.shape), dtype=sample.down.dtype,
                                device=device)
        self.mlps = [DenseMLP.from_linears(make_linear(self.gate_up[s]), make_linear(self.down[s]))
                     for s in range(num_slots)]
        self.cuda_device = device if device.type == "cuda" else None
        self.host_rows = host_rows
        self.make_host_linear = make_host_linear or make_linear
        # Set by RouteReplay: layer -> the traced model's lookahead guess (None: run the gate).
        self.lookahead_guess = None
        self.victims = VictimBuffer(victim_slots, sample, pin_memory=self.cuda_device is not None
                                    ) if victim_slots else None
        self.worker = SwapWorker(self)
        try:
            self.books = ExpertBooks(num_slots, policy, sorted(self.blocks), first.num_experts,
                                     first.top_k, self.worker, time.perf_counter,
                                     prefetch_window, host_rows)
            self.books.pin(policy.pinned())
        except BaseException:
            self.worker.close()  # its thread would outlive a half-built provider
            raise
        for block in blocks:
            block.provider = self

    @property
    def cache(self):
        return self.books.cache

    @property
    def stats(self) -> OffloadStats:
        return self.books.stats

    @property
    def pinned(self) -> int:
        return self.books.pinned

    # -- the SwapWorker's storage side ---------------------------------------------------------
    def copy(self, op: ExpertLoad, non_blocking: bool = False) -> int:
        gate_up, down = self.gate_up[op.slot], self.down[op.slot]
        moved, tier = 0, "victim"
        if self.victims is not None:  # the slot still holds op.evicted: the buffer keeps it
            moved = self.victims.exchange(op.evicted, op.key, gate_up, down)
        if not moved:
            moved, tier = self.source.read_into(op.key, gate_up, down), self.source.tier
        self.stats.bytes_loaded[tier] = self.stats.bytes_loaded.get(tier, 0) + moved
        return moved

    # -- requests and steps --------------------------------------------------------------------
    def annotate(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """A request arrived: predict its path (expertflow) or find its trace (oracle)."""
        if self.predictor is not None:
            route = self.predictor.predict(prompt_token_ids)
        else:
            route = self.traces.get(prompt_key(prompt_token_ids)) if self.traces else None
        self.books.annotate(request_id, route)

    def begin_step(self, plan) -> None:
        """A step is about to run ``plan``: forget ended requests, prefetch what it will need."""
        chunks = [StepRequest(c.request_id, c.start_pos, c.num_tokens) for c in plan.chunks]
        self.books.begin_step(chunks, plan.finished_request_ids)

    @contextlib.contextmanager
    def use(self, layer: int, experts: list[int], x: torch.Tensor, ids: torch.Tensor,
            counts: list[int], rows_of: Callable[[int], torch.Tensor]) -> Iterator:
        """Hold ``experts`` of ``layer`` for one forward (``x``: its rows, ``ids``: their
        (rows, top_k) choices, ``counts[e]``: the rows that chose ``e``, ``rows_of(e)``: those
        rows as the block runs them); yields
        ``get(expert) -> mlp``, which waits for that expert's load only, and the order to run
        them in: the host's last. On a GPU the host experts' rows start copying to the host
        before any device expert is queued, so the CPU computes them while the device runs the
        rest. Everything held is released on exit."""
        if self.policy.observes:
            self.books.observe(layer, ids.tolist())
        rows = [counts[e] for e in experts] if self.host_rows else None
        held = self.books.hold(layer, experts, rows)
        try:
            if self.policy.lookahead:
                self.books.prefetch(self._gate_lookahead(layer, x))
            on_host = [e for e in experts if held[e] == ON_HOST]
            staged = self._stage(on_host, rows_of) if on_host and self.cuda_device is not None else {}
            order = [e for e in experts if held[e] != ON_HOST] + on_host
            yield (lambda expert: self._ready(layer, expert, held[expert], staged)), order
        finally:
            self.books.release(held)

    def _ready(self, layer: int, expert: int, slot: int, staged: dict) -> Callable:
        if slot == ON_HOST:
            return self._on_host((layer, expert), staged.get(expert))
        self.books.ready(slot)
        return self.mlps[slot]

    def _stage(self, on_host: list[int], rows_of: Callable[[int], torch.Tensor]) -> dict:
        """GPU: each host expert's rows (the block's own group) copied to pinned host memory
        without blocking; expert -> (rows, event marking the copy)."""
        staged = {}
        for expert in on_host:
            device_rows = rows_of(expert)
            host_rows = torch.empty(device_rows.shape, dtype=device_rows.dtype, pin_memory=True)
            host_rows.copy_(device_rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            staged[expert] = (host_rows, event)
        return staged

    def _on_host(self, key: ExpertKey, staged: tuple | None) -> Callable:
        """The expert as an MLP over the host tier's weights (dequantized when the tier is);
        on a GPU it reads the rows ``_stage`` copied and sends the result back."""
        weights = self.source.read(key)
        mlp = DenseMLP.from_linears(self.make_host_linear(weights.gate_up),
                                    self.make_host_linear(weights.down))
        if staged is None:
            return mlp
        host_rows, event = staged

        def run(group: torch.Tensor, ops=None) -> torch.Tensor:
            event.synchronize()  # the rows' copy only: the device experts queued since go on
            out = mlp(host_rows.to(weights.gate_up.dtype))
            return out.to(group.device, group.dtype, non_blocking=True)

        return run

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        return self.books.hot_sets(request_id)

    # -- mechanics ------------------------------------------------------------------------------
    def _gate_lookahead(self, layer: int, x: torch.Tensor) -> list[ExpertKey]:
        if self.lookahead_guess is not None:
            guess = self.lookahead_guess(layer)
            if guess is not None:
                return guess
        later = [index for index in self.blocks if index > layer]
        if not later:
            return []
        block = self.blocks[min(later)]
        chosen = torch.topk(F.linear(x, block.router), block.top_k, dim=-1).indices
        votes = torch.bincount(chosen.flatten(), minlength=block.num_experts)
        order = torch.argsort(-votes, stable=True)  # most chosen first, ties by id (by_votes)
        return [(block.layer_index, int(e)) for e in order[: int((votes > 0).sum())]]

    def settle(self) -> None:
        """Wait for every load in flight (tests, and before measuring)."""
        self.books.settle()

    def resident_bytes(self) -> int:
        return self.cache.num_slots * self.expert_bytes

    def check_invariants(self) -> None:
        self.books.check_invariants()  # settles: the worker is idle, its books can be read
        if self.victims is not None:
            self.victims.check_invariants()

    def close(self) -> None:
        self.worker.close()
        self.source.close()
