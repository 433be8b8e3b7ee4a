"""ExpertOffload: the expert provider of every MoE layer. It owns the fast slots (preallocated
weight tensors, on the device on GPU), loads experts into them on the KV tiers' copy worker
(``SwapWorker``: a thread, a CUDA stream on GPU), and asks its policy what to load ahead.

A forward waits only for the experts its tokens chose, each just before it runs; the others keep
loading meanwhile. Loads never change numerics: a slot holds exactly the weights the source
returns, and an expert runs through the same code as a resident one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tierserve.experts.cache import ExpertCache, ExpertKey
from tierserve.experts.policies import ExpertPolicy
from tierserve.experts.routes import StepRequest, prompt_key
from tierserve.experts.tiers import ExpertSource, ExpertTierError
from tierserve.model.kv_storage import SwapWorker
from tierserve.model.moe import DenseMLP, MoEBlock
from tierserve.sched.plan import CopyError

log = logging.getLogger(__name__)
OBSERVED_ROWS = 8  # a chunk's last rows that correct its request's predicted route


@dataclass(slots=True, frozen=True)
class ExpertLoad:
    """Copy expert ``key`` from the source tier into fast slot ``slot`` (one SwapWorker op)."""

    key: ExpertKey
    slot: int

    @property
    def num_blocks(self) -> int:
        return 1

    @property
    def runs(self) -> tuple[ExpertLoad, ...]:
        return (self,)


@dataclass(slots=True)
class OffloadStats:
    steps: int = 0
    stall_seconds: float = 0.0  # forwards waiting for expert loads
    bytes_loaded: dict[str, int] = field(default_factory=dict)  # source tier -> bytes
    distinct_per_step: list[int] = field(default_factory=list)  # experts run, all layers
    experts_this_step: int = 0


class ExpertOffload:
    """``num_slots`` experts resident; the rest come from ``source`` when needed."""

    def __init__(self, blocks: list[MoEBlock], source: ExpertSource, num_slots: int,
                 policy: ExpertPolicy, make_linear, predictor=None, traces=None) -> None:
        if not blocks:
            raise ValueError("expert offloading needs an MoE model; this one has no MoE layers")
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
        self.cache = ExpertCache(num_slots, policy.score if policy.scores else None)
        policy.bind(sorted(self.blocks), first.num_experts, first.top_k, num_slots)
        self.stats = OffloadStats()
        self.reserve = first.num_experts
        self._known: dict[str, None] = {}  # live request ids, arrival order
        self._load_key: dict[int, str] = {}  # slot -> worker key of its load in flight
        self._serial = itertools.count()
        self._chunks: list[StepRequest] = []  # this step's, in row order
        self.worker = SwapWorker(self)
        for block in blocks:
            block.provider = self
        self.pinned = self._pin(policy.pinned())

    # -- the SwapWorker's storage side ---------------------------------------------------------
    def copy(self, op: ExpertLoad, non_blocking: bool = False) -> int:
        moved = self.source.read_into(op.key, self.gate_up[op.slot], self.down[op.slot])
        tier = self.source.tier
        self.stats.bytes_loaded[tier] = self.stats.bytes_loaded.get(tier, 0) + moved
        return moved

    # -- requests and steps --------------------------------------------------------------------
    def annotate(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """A request arrived: predict its path (expertflow) or find its trace (oracle)."""
        self._known[request_id] = None
        if self.predictor is not None:
            self.policy.annotate(request_id, self.predictor.predict(prompt_token_ids))
        elif self.traces:
            self.policy.annotate(request_id, self.traces.get(prompt_key(prompt_token_ids)))

    def begin_step(self, plan) -> None:
        """A step is about to run ``plan``: forget ended requests, prefetch what it will need."""
        chunks = [StepRequest(c.request_id, c.start_pos, c.num_tokens) for c in plan.chunks]
        self._chunks = chunks
        for request_id in plan.finished_request_ids:
            self._known.pop(request_id, None)
            self.policy.forget(request_id)
        self._reap()
        if self.stats.steps:
            self.stats.distinct_per_step.append(self.stats.experts_this_step)
        self.stats.steps += 1
        self.stats.experts_this_step = 0
        running = {c.request_id for c in chunks}
        waiting = [r for r in self._known if r not in running]
        self._prefetch(self.policy.begin_step(chunks, waiting))

    @contextlib.contextmanager
    def use(self, layer: int, experts: list[int], x: torch.Tensor, ids: torch.Tensor) -> Iterator:
        """Hold ``experts`` of ``layer`` for one forward (``x``: its rows, ``ids``: their
        (rows, top_k) choices); yields ``get(expert) -> mlp``, which waits for that expert's
        load only. Everything held is released on exit."""
        self._reap()
        if self.policy.observes:
            self._observe(layer, ids)
        self.stats.experts_this_step += len(experts)
        counters = self.cache.counters.layer(layer)
        held: dict[int, int] = {}
        try:
            for expert in experts:
                slot = self.cache.acquire((layer, expert), counters)
                if slot is None:
                    slot = self._load((layer, expert), prefetch=False)
                    self.cache.hold(slot)
                held[expert] = slot
            self._prefetch(self.policy.after_route(layer))
            if self.policy.lookahead:
                self._prefetch(self._gate_lookahead(layer, x))
            yield lambda expert: self._ready(held[expert])
        finally:
            self.cache.release(list(held.values()))

    def _ready(self, slot: int) -> DenseMLP:
        key = self._load_key.get(slot)
        if key is not None:
            started = time.perf_counter()
            try:
                self.worker.wait([key])
            except CopyError as exc:
                self._reap()
                raise ExpertTierError(f"loading expert {self.cache.key_of(slot) or ''} failed: "
                                      f"{next(iter(exc.failures.values()), exc)}") from exc
            finally:
                self.stats.stall_seconds += time.perf_counter() - started
            self._reap()
        return self.mlps[slot]

    def _observe(self, layer: int, ids: torch.Tensor) -> None:
        """Tell the policy each request's last few true choices (rows are chunk after chunk)."""
        rows, row = ids.tolist(), 0
        for chunk in self._chunks:
            end = row + chunk.num_tokens
            self.policy.observe(chunk.request_id, layer, rows[max(row, end - OBSERVED_ROWS):end])
            row = end

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        return self.policy.hot_sets(request_id)

    # -- mechanics ------------------------------------------------------------------------------
    def _load(self, key: ExpertKey, prefetch: bool) -> int:
        slot = self.cache.reserve(key, prefetch)
        if slot is None and not prefetch and self._load_key:
            self.settle()  # loads in flight hold slots until they are reaped
            slot = self.cache.reserve(key, prefetch)
        if slot is None:
            raise ExpertTierError(f"no free expert slot for {key}: all {self.cache.num_slots} are "
                                  "held; raise --expert-cache")
        worker_key = f"expert:{key[0]}:{key[1]}:{next(self._serial)}"
        self._load_key[slot] = worker_key
        self.worker.submit(worker_key, [ExpertLoad(key, slot)])
        return slot

    def _prefetch(self, keys: list[ExpertKey]) -> None:
        for key in keys:
            if self.cache.slot_of(key) is not None:
                continue
            # Prefetches leave one layer's worth of slots free: a forward's misses must fit.
            if self.cache.num_free <= self.reserve:
                return
            if self.policy.scores:
                victim = self.cache.pool.peek_victim()
                old = self.cache.key_of(victim)
                if old is not None and self.policy.score(old) >= self.policy.score(key):
                    return  # everything evictable is worth more than what is asked for
            self._load(key, prefetch=True)

    def _gate_lookahead(self, layer: int, x: torch.Tensor) -> list[ExpertKey]:
        later = [index for index in self.blocks if index > layer]
        if not later:
            return []
        block = self.blocks[min(later)]
        chosen = torch.topk(F.linear(x, block.router), block.top_k, dim=-1).indices
        return [(block.layer_index, int(e)) for e in torch.unique(chosen)]

    def _reap(self) -> None:
        """Mark finished loads ready (or their slots empty, when they failed)."""
        for stats in self.worker.poll():
            slot = next((s for s, k in self._load_key.items() if k == stats.key), None)
            if slot is None:
                continue
            del self._load_key[slot]
            if stats.error is not None:
                log.warning("expert load %s failed: %s", stats.key, stats.error)
            self.cache.loaded(slot, ok=stats.error is None)

    def _pin(self, keys: list[ExpertKey]) -> int:
        """Load ``keys`` and hold them for good (a static hot set)."""
        for key in keys:
            self._load(key, prefetch=False)
            self.cache.hold(self.cache.slot_of(key))
        self.settle()
        return len(keys)

    def settle(self) -> None:
        """Wait for every load in flight (tests, and before measuring)."""
        with contextlib.suppress(CopyError):
            self.worker.wait(list(self._load_key.values()))
        self._reap()

    def resident_bytes(self) -> int:
        return self.cache.num_slots * self.expert_bytes

    def check_invariants(self) -> None:
        self.settle()
        self.cache.check_invariants(held=self.pinned)

    def close(self) -> None:
        self.worker.close()
        self.source.close()
