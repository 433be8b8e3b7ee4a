"""ExpertCache: which expert sits in which fast slot. Slots are the KV tiers' BlockPool blocks.

A slot is in one of three states, kept by the pool's reference counts:

    loading   ref held by the load        -- load done -->  ready, referenced or free
    in use    ref held by a forward       -- release   -->  ready & free (cached: evictable)
    free      no ref; cached or empty      -- reserve   -->  loading (evicts its old expert)

Eviction among free cached slots is the pool's: least recently freed first, or the lowest
``score`` (a policy's predicted next use; LSM-GNN's look-ahead rule), ties by recency. A slot a
load or a forward holds is never handed out, so nothing in use is overwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tierserve.kv.block_pool import BlockPool, require

ExpertKey = tuple[int, int]  # (layer index, expert index)
# Scored eviction weighs every free slot (None; the KV pool weighs its 64 least recently freed).
# The MoE layers are swept in a cycle larger than the cache, where the least recently freed
# slots hold the experts needed soonest: weighing only the oldest 16 made predicted next use
# little better than LRU. At GPU scale (simulated, 16-32 concurrent) the full scan took
# expertflow from 1.07-1.17x LRU's tok/s to 1.41-2.52x (oracle 1.45-2.67x); at batch 1, whose
# predictions are weakest, from 1.11x to 0.83x (docs/paper-results.md).
EVICTION_SCAN: int | None = None


@dataclass(slots=True)
class LayerCounters:
    hits: int = 0  # ready in a slot when the forward asked
    late: int = 0  # being loaded (a prefetch) when asked: the forward waited for the rest
    misses: int = 0  # not in a slot: loaded on demand

    @property
    def requests(self) -> int:
        return self.hits + self.late + self.misses


@dataclass(slots=True)
class ExpertCounters:
    layers: dict[int, LayerCounters] = field(default_factory=dict)
    loads: int = 0
    prefetches: int = 0  # loads started before anyone asked
    prefetches_used: int = 0  # of those, asked for before being evicted
    evictions: int = 0
    failed_loads: int = 0

    def layer(self, index: int) -> LayerCounters:
        if index not in self.layers:
            self.layers[index] = LayerCounters()
        return self.layers[index]

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.layers.values())

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.layers.values())

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class ExpertCache:
    """``num_slots`` fast slots for experts; pure bookkeeping, the caller moves the weights."""

    def __init__(self, num_slots: int,
                 score: Callable[[ExpertKey], float] | None = None) -> None:
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: dict[int, ExpertKey] = {}
        self._loading: set[int] = set()
        self._prefetched: set[int] = set()  # loaded ahead, not asked for yet
        self.evicted: ExpertKey | None = None  # what the last ``reserve`` put out of its slot
        self._score = score
        self.pool = BlockPool(num_slots, on_evict=self._evicted, is_cached=self._key_of.__contains__,
                              evict_score=self._slot_score if score is not None else None,
                              eviction_scan=EVICTION_SCAN or num_slots)
        self.counters = ExpertCounters()

    @property
    def num_slots(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def slot_of(self, key: ExpertKey) -> int | None:
        return self._slot_of.get(key)

    def key_of(self, slot: int) -> ExpertKey | None:
        return self._key_of.get(slot)

    def is_loading(self, slot: int) -> bool:
        return slot in self._loading

    def reserve(self, key: ExpertKey, prefetch: bool = False) -> int | None:
        """A slot for ``key``'s load (evicting a free one), held by the load; None when every
        slot is held. The caller starts the load and reports it with ``loaded``."""
        require(key not in self._slot_of, f"expert {key} is already in slot {self._slot_of.get(key)}")
        self.evicted = None
        if self.pool.num_free == 0:
            return None
        slot = self.pool.allocate(1)[0]
        self._slot_of[key], self._key_of[slot] = slot, key
        self._loading.add(slot)
        self.counters.loads += 1
        if prefetch:
            self.counters.prefetches += 1
            self._prefetched.add(slot)
        return slot

    def loaded(self, slot: int, ok: bool = True) -> None:
        """The load into ``slot`` finished; a failed one empties the slot."""
        require(slot in self._loading, f"slot {slot} has no load in flight")
        self._loading.discard(slot)
        if not ok:
            self.counters.failed_loads += 1
            self._forget(slot)
        self.pool.release([slot])

    def acquire(self, key: ExpertKey, layer_counters: LayerCounters | None = None) -> int | None:
        """Hold ``key``'s slot for a forward (counted as a hit or a late prefetch); None when it
        is in no slot (the caller reserves one and loads it: a miss)."""
        slot = self._slot_of.get(key)
        counters = layer_counters or self.counters.layer(key[0])
        if slot is None:
            counters.misses += 1
            return None
        if slot in self._loading:
            counters.late += 1
        else:
            counters.hits += 1
        if slot in self._prefetched:
            self._prefetched.discard(slot)
            self.counters.prefetches_used += 1
        self.pool.touch(slot)
        return slot

    def hold(self, slot: int) -> None:
        """One more reference on a slot (a forward that reserved it for its own miss)."""
        self.pool.touch(slot)

    def release(self, slots: list[int]) -> None:
        self.pool.release(slots)

    def check_invariants(self, held: int = 0) -> None:
        """Books agree; with no forward running, only loads hold slots (``held`` extra refs
        are pins, e.g. a static hot set)."""
        self.pool.check_invariants()
        require(len(self._slot_of) == len(self._key_of), "slot maps disagree")
        for key, slot in self._slot_of.items():
            require(self._key_of.get(slot) == key, f"expert {key} / slot {slot} maps disagree")
        refs = sum(self.pool.ref_counts)
        require(refs == len(self._loading) + held,
                f"{refs} slot references, {len(self._loading)} loads in flight and {held} pins")

    # -- pool callbacks ------------------------------------------------------------------------
    def _evicted(self, slot: int) -> None:
        if slot in self._key_of:
            self.counters.evictions += 1
            self.evicted = self._key_of[slot]
            self._forget(slot)

    def _forget(self, slot: int) -> None:
        key = self._key_of.pop(slot, None)
        if key is not None:
            del self._slot_of[key]
        self._prefetched.discard(slot)

    def _slot_score(self, slot: int) -> float:
        key = self._key_of.get(slot)
        return 0.0 if key is None else self._score(key)
