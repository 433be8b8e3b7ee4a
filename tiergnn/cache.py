"""One worker's feature cache hierarchy: accelerator slab, pinned host victim ring, storage.

```
  gather(nodes) ──> slab (cache_rows lines; the GPU, or a fixed CPU slab standing for it)
                     │ miss                      ▲ admit (policy's exchange rule)
                     ▼                           │
                    victim ring (victim_rows, FIFO; pinned host memory on a GPU machine)
                     │ miss          ▲ evicted slab lines land here
                     ▼               │
                    storage (FeatureStorage: pread of the raw feature file)
```

Invariants: a node is in at most one of slab and ring (a ring line admitted to the slab leaves
the ring; one the policy turns away stays in the ring); `slot_of[node]` and `node_of_slot[slot]` mirror each other, as do the ring's two
maps; a row read through any tier equals the storage row (tests/tiergnn/test_cache.py).

`prefetch(nodes)` is the Preemptive Victim-buffer Prefetcher: lines the look-ahead window will need
that sit in the ring are moved up into the slab before their batch runs, so they are hits then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from tiergnn.policies import EvictionPolicy
from tiergnn.storage import FeatureStorage


@dataclass(slots=True)
class CacheStats:
    """Counters since the last reset; rows, except the byte counters."""

    requested: int = 0
    slab_hits: int = 0
    ring_hits: int = 0
    storage_rows: int = 0
    storage_bytes: int = 0
    prefetched: int = 0          # ring -> slab moves made ahead of use
    evicted: int = 0
    bypassed: int = 0            # misses the policy chose not to admit

    def hit_ratio(self) -> dict[str, float]:
        total = max(1, self.requested)
        return {"slab": self.slab_hits / total, "ring": self.ring_hits / total,
                "storage": self.storage_rows / total}

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_ratio": self.hit_ratio()}


class FeatureCache:
    """What the feature store and the trainer call on any cache: rows by node id, the look-ahead
    hooks (no-ops unless the cache uses them), counters. `stats` is a `CacheStats`."""

    stats: CacheStats

    def gather(self, nodes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_future(self, window: list[torch.Tensor]) -> None:
        """The node sets of the next batches, nearest first."""

    def restart_lookahead(self) -> None:
        """A loader pass begins: what was said of the old pass's future no longer holds."""

    def prefetch(self, nodes: torch.Tensor) -> int:
        """Move lines the next batch needs up a tier ahead of use; returns how many moved."""
        return 0

    def reset_stats(self) -> None:
        self.stats = CacheStats()


class TieredCache(FeatureCache):
    """Slab + victim ring over a `FeatureStorage`, managed by an `EvictionPolicy`."""

    def __init__(self, storage: FeatureStorage, cache_rows: int, victim_rows: int,
                 policy: EvictionPolicy, device: str | torch.device = "cpu"):
        if cache_rows < 0 or victim_rows < 0:
            raise ValueError("cache_rows and victim_rows must be >= 0")
        self.storage = storage
        self.policy = policy
        self.device = torch.device(device)
        dim, dtype = storage.dim, torch.from_numpy(np.empty(0, storage.dtype)).dtype
        num_nodes = storage.num_rows
        self.slab = torch.empty(cache_rows, dim, dtype=dtype, device=self.device)
        self.slot_of = torch.full((num_nodes,), -1, dtype=torch.long)
        self.node_of_slot = torch.full((cache_rows,), -1, dtype=torch.long)
        pin = self.device.type == "cuda"
        self.ring = torch.empty(victim_rows, dim, dtype=dtype, pin_memory=pin)
        self.ring_slot_of = torch.full((num_nodes,), -1, dtype=torch.long)
        self.ring_node = torch.full((victim_rows,), -1, dtype=torch.long)
        self.ring_head = 0
        self.step = 0
        self.stats = CacheStats()
        preload = policy.preload(cache_rows)
        if preload is not None and len(preload):
            preload = torch.sort(preload).values          # sorted: coalesced storage reads
            self._place(preload, self._read_storage(preload), torch.arange(len(preload)))
            self.stats = CacheStats()

    @property
    def capacity(self) -> int:
        return len(self.node_of_slot)

    def gather(self, nodes: torch.Tensor) -> torch.Tensor:
        """Feature rows of `nodes` (unique global ids) on the cache's device, then admission."""
        nodes = nodes.long()
        self.stats.requested += len(nodes)
        out = torch.empty(len(nodes), self.slab.shape[1], dtype=self.slab.dtype,
                          device=self.device)
        slots = self.slot_of[nodes]
        hit = slots >= 0
        out[hit] = self.slab[slots[hit].to(self.device)]
        self.stats.slab_hits += int(hit.sum())
        miss_pos = torch.nonzero(~hit).flatten()
        miss_rows = self._fetch_below(nodes[miss_pos])
        out[miss_pos.to(self.device)] = miss_rows
        self.policy.observe(nodes[hit], self.step)
        self._admit(nodes[miss_pos], miss_rows)
        self.step += 1
        return out

    def set_future(self, window: list[torch.Tensor]) -> None:
        self.policy.set_future(window)

    def prefetch(self, nodes: torch.Tensor) -> int:
        """Move ring lines among `nodes` up into the slab now; returns how many moved."""
        nodes = nodes.long()
        in_ring = nodes[(self.ring_slot_of[nodes] >= 0) & (self.slot_of[nodes] < 0)]
        if len(in_ring) == 0 or self.capacity == 0:
            return 0
        admitted = self._admit(in_ring, self._read_ring(in_ring), count_bypass=False)
        self.stats.prefetched += admitted
        return admitted

    def contains(self, nodes: torch.Tensor) -> torch.Tensor:
        """Which of `nodes` sit in the slab (for tests and the benchmark)."""
        return self.slot_of[nodes.long()] >= 0

    # Tiers below the slab --------------------------------------------------------------------
    def _fetch_below(self, nodes: torch.Tensor) -> torch.Tensor:
        rows = torch.empty(len(nodes), self.slab.shape[1], dtype=self.slab.dtype)
        ring_slots = self.ring_slot_of[nodes]
        in_ring = ring_slots >= 0
        rows[in_ring] = self._read_ring(nodes[in_ring])
        self.stats.ring_hits += int(in_ring.sum())
        from_storage = torch.nonzero(~in_ring).flatten()
        if len(from_storage):
            rows[from_storage] = self._read_storage(nodes[from_storage])
        return rows.to(self.device)

    def _read_storage(self, nodes: torch.Tensor) -> torch.Tensor:
        before = self.storage.stats.bytes_read
        rows = torch.from_numpy(self.storage.read(nodes.numpy()))
        self.stats.storage_rows += len(nodes)
        self.stats.storage_bytes += self.storage.stats.bytes_read - before
        return rows

    def _read_ring(self, nodes: torch.Tensor) -> torch.Tensor:
        """Rows of ring-resident `nodes` (host memory). The entries stay: `_place` frees those
        that move up to the slab; a line the slab turns away stays in the ring."""
        return self.ring[self.ring_slot_of[nodes]]

    def _push_to_ring(self, nodes: torch.Tensor, rows: torch.Tensor) -> None:
        """Evicted lines enter the ring FIFO, overwriting its oldest entries."""
        size = len(self.ring_node)
        if size == 0 or len(nodes) == 0:
            return
        if len(nodes) > size:
            nodes, rows = nodes[-size:], rows[-size:]
        positions = (self.ring_head + torch.arange(len(nodes))) % size
        overwritten = self.ring_node[positions]
        self.ring_slot_of[overwritten[overwritten >= 0]] = -1
        self.ring[positions] = rows.to("cpu")     # blocking: the row must be there when read
        self.ring_node[positions] = nodes
        self.ring_slot_of[nodes] = positions
        self.ring_head = int((self.ring_head + len(nodes)) % size)

    # Admission and eviction ------------------------------------------------------------------
    def _admit(self, nodes: torch.Tensor, rows: torch.Tensor, count_bypass: bool = True) -> int:
        """The exchange rule (see tiergnn.policies); returns how many lines entered the slab."""
        if len(nodes) == 0:
            return 0
        if self.capacity == 0 or not self.policy.admits:
            self._turn_away(nodes, count_bypass)
            return 0
        order = torch.argsort(self.policy.score(nodes, self.step, incoming=True))
        nodes, rows = nodes[order], rows[order.to(rows.device)]
        free = torch.nonzero(self.node_of_slot < 0).flatten()
        n_free = min(len(free), len(nodes))
        self._place(nodes[:n_free], rows[:n_free], free[:n_free])
        self.policy.observe(nodes[:n_free], self.step)    # before they can be chosen as victims
        rest, rest_rows = nodes[n_free:], rows[n_free:]
        admitted = n_free
        if len(rest):
            resident = torch.nonzero(self.node_of_slot >= 0).flatten()
            resident_score = self.policy.score(self.node_of_slot[resident], self.step, False)
            k = min(len(rest), len(resident))
            victims_order = torch.topk(resident_score, k, sorted=True).indices   # worst first
            victims = resident[victims_order]
            incoming_score = self.policy.score(rest, self.step, incoming=True)[:len(victims)]
            swap = int((incoming_score < resident_score[victims_order]).sum())
            victims = victims[:swap]
            self._push_to_ring(self.node_of_slot[victims], self.slab[victims.to(self.device)])
            self.slot_of[self.node_of_slot[victims]] = -1
            self.stats.evicted += swap
            self._place(rest[:swap], rest_rows[:swap], victims)
            admitted += swap
            self.policy.observe(rest[:swap], self.step)
            self._turn_away(rest[swap:], count_bypass)
        return admitted

    def _turn_away(self, nodes: torch.Tensor, count: bool) -> None:
        # NOTE: a storage miss the slab turns away does not enter the ring: a batch's bypassed
        # misses outnumber the ring and would flush the evicted lines it exists to keep. A ring
        # line turned away simply stays where it is.
        if count:
            self.stats.bypassed += len(nodes)

    def _place(self, nodes: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
        ring_slots = self.ring_slot_of[nodes]
        from_ring = ring_slots >= 0                       # the line moves up: one tier only
        self.ring_node[ring_slots[from_ring]] = -1
        self.ring_slot_of[nodes[from_ring]] = -1
        self.slab[slots.to(self.device)] = rows.to(self.device)
        self.node_of_slot[slots] = nodes
        self.slot_of[nodes] = slots
