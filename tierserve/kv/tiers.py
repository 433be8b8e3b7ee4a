"""Moving KV blocks between tiers: swap out, swap in, host-tier prefix hits, victim saves.

Tiers are device (the pool the model reads), host and disk. Each lower tier is a BlockPool plus a
PrefixCache of the full blocks it holds, so a block copied out once is found again by content
(multi-turn reuse: the next turn of a conversation swaps its history in instead of recomputing,
and a block already in the host tier is never copied out twice).

Lower-tier eviction is LSM-GNN's hybrid: a static score (how many waiting requests need the
block's prefix) first, recency (least recently freed) to break ties; uncached blocks go first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tierserve.kv.block_pool import BlockPool, require
from tierserve.kv.prefix_cache import BlockHash, PrefixCache
from tierserve.kv.tiers_types import SwapOp, Tier, coalesce
from tierserve.request import Request

if TYPE_CHECKING:
    from tierserve.kv.manager import KVCacheManager


@dataclass(slots=True)
class TierStore:
    """One tier's blocks and the content cache of its full blocks."""

    tier: Tier
    pool: BlockPool
    cache: PrefixCache


@dataclass(slots=True)
class SwapOrder:
    """Copies to run for one request under one key; ``wait``: the next step needs them done."""

    key: str
    request_id: str
    ops: list[SwapOp]
    direction: str  # "out" | "in" | "victim"
    wait: bool = False

    @property
    def num_blocks(self) -> int:
        return sum(op.num_blocks for op in self.ops)

    @property
    def num_copies(self) -> int:
        return sum(len(op.runs) for op in self.ops)


@dataclass(slots=True)
class SwapCounters:
    swap_outs: int = 0
    swap_ins: int = 0
    blocks_out: int = 0
    blocks_in: int = 0
    blocks_not_recopied: int = 0  # already in a lower tier: no copy (multi-turn reuse)
    lower_prefix_hits: int = 0  # blocks a new request took from host/disk instead of computing
    victim_saves: int = 0  # evicted device blocks written back to the host tier
    copies_per_swap: list[int] = field(default_factory=list)
    blocks_per_swap: list[int] = field(default_factory=list)


Move = tuple[Tier, int, Tier, int]  # (source tier, source block, destination tier, destination block)


class TierMovesMixin:
    """The tier half of KVCacheManager (kept apart to keep each file one idea)."""

    def swap_out(self: KVCacheManager, request: Request) -> SwapOrder | None:
        """Move a running request's blocks to host (then disk); None if they do not fit."""
        request_id = request.request_id
        table = self._tables.get(request_id)
        if not self.lower or not table:
            return None
        self._drop_reserve(request_id)
        hashes = self._hashes.get(request_id, [])
        placements: list[tuple[TierStore, int] | None] = []
        for index in range(len(table)):
            found = self._lower_lookup_hash(hashes[index]) if index < len(hashes) else None
            if found is not None:
                found[0].pool.touch(found[1])
            placements.append(found)
        to_copy = [i for i, p in enumerate(placements) if p is None]
        targets = self._allocate_lower(len(to_copy))
        if targets is None:
            for placement in placements:
                if placement is not None:
                    placement[0].pool.release([placement[1]])
            return None
        moves = []
        for index, (store, block) in zip(to_copy, targets):
            placements[index] = (store, block)
            moves.append((Tier.DEVICE, table[index], store.tier, block))
            if index < len(hashes):
                self._register(store, hashes[index], block)
        order = self._order(request_id, "out", moves)
        self._inflight[order.key] = self._tables.pop(request_id)  # held until the copy is done
        self._swapped[request_id] = placements  # type: ignore[assignment]
        counters = self.counters
        counters.swap_outs += 1
        counters.blocks_out += len(moves)
        counters.blocks_not_recopied += len(table) - len(moves)
        counters.copies_per_swap.append(order.num_copies)
        counters.blocks_per_swap.append(len(moves))
        return order

    def num_swapped_blocks(self: KVCacheManager, request_id: str) -> int:
        return len(self._swapped.get(request_id, ()))

    def can_swap_out(self: KVCacheManager, request: Request) -> bool:
        """Whether the lower tiers have room for every block of the request (conservatively,
        as if none were there already)."""
        blocks = len(self._tables.get(request.request_id, ()))
        return 0 < blocks <= sum(store.pool.num_free for store in self.lower)

    def swap_in(self: KVCacheManager, request: Request, wait: bool = True) -> SwapOrder | None:
        """Bring a swapped request's blocks back to the device; None if they do not fit yet.

        ``wait``: the coming step needs them (False for a prefetch)."""
        request_id = request.request_id
        placements = self._swapped[request_id]
        if len(placements) > self.pool.num_free:
            return None
        hashes = self._hashes.get(request_id, [])
        table: list[int] = []
        moves: list[Move] = []
        arriving: list[tuple[BlockHash, int]] = []
        for index, (store, block) in enumerate(placements):
            cached = self.prefix_cache.block_of(hashes[index]) if index < len(hashes) else None
            if cached is not None:  # still on the device: share it, no copy
                self.pool.touch(cached)
                table.append(cached)
                continue
            (device_block,) = self.pool.allocate(1, after=table[-1] if table else None)
            table.append(device_block)
            moves.append((store.tier, block, Tier.DEVICE, device_block))
            if index < len(hashes):
                arriving.append((hashes[index], device_block))
        order = self._order(request_id, "in", moves)
        order.wait = wait
        # NOTE: a request that found these blocks by content would read them in a step that
        # does not wait for this copy unless the copy is waited for in this very step: a
        # prefetch's blocks are registered only when it is reported done.
        if wait:
            for block_hash, device_block in arriving:
                self._register(self.device, block_hash, device_block)
        elif arriving:
            self._deferred[order.key] = arriving
        held = [move[3] for move in moves]
        for block in held:
            self.pool.touch(block)
        self._inflight[order.key] = held
        for store, block in reversed(self._swapped.pop(request_id)):
            store.pool.release([block])
        self._tables[request_id] = table
        self.counters.swap_ins += 1
        self.counters.blocks_in += len(moves)
        self.counters.copies_per_swap.append(order.num_copies)
        self.counters.blocks_per_swap.append(len(moves))
        return order

    # -- helpers ---------------------------------------------------------------------------
    def _allocate_lower(self: KVCacheManager, count: int) -> list[tuple[TierStore, int]] | None:
        """``count`` blocks from host first, then disk; None (and nothing taken) if short."""
        if count > sum(store.pool.num_free for store in self.lower):
            return None
        taken: list[tuple[TierStore, int]] = []
        for store in self.lower:
            want = min(count - len(taken), store.pool.num_free)
            if want:
                taken.extend((store, b) for b in store.pool.allocate(want))
        return taken

    def _lower_lookup(self: KVCacheManager, block_hash: BlockHash, parent: BlockHash | None,
                      tokens: tuple[int, ...]) -> tuple[TierStore, int] | None:
        for store in self.lower:
            block = store.cache.lookup(block_hash, parent, tokens, self.namespace)
            if block is not None:
                return store, block
        return None

    def _lower_lookup_hash(self: KVCacheManager, block_hash: BlockHash
                           ) -> tuple[TierStore, int] | None:
        for store in self.lower:
            block = store.cache.block_of(block_hash)
            if block is not None:
                return store, block
        return None

    def _register(self: KVCacheManager, store: TierStore, block_hash: BlockHash, block: int
                  ) -> None:
        entry = self.prefix_cache.entry(block_hash)
        if entry is None:
            found = self._lower_lookup_hash(block_hash)
            entry = found[0].cache.entry(block_hash) if found else None
        if entry is not None:
            store.cache.insert(block_hash, block, entry.parent, entry.token_ids, entry.namespace)

    def _order(self: KVCacheManager, request_id: str, direction: str, moves: list[Move]
               ) -> SwapOrder:
        ops = []
        for src_tier, dst_tier in sorted({(m[0], m[2]) for m in moves}, key=str):
            pairs = [(m[1], m[3]) for m in moves if (m[0], m[2]) == (src_tier, dst_tier)]
            runs = coalesce([p[0] for p in pairs], [p[1] for p in pairs])
            ops.append(SwapOp(src_tier, dst_tier, tuple(runs)))
        order = SwapOrder(f"{direction}-{next(self._keys)}-{request_id}", request_id, ops,
                          direction)
        if direction != "victim":
            self._flush_victims()  # saves decided earlier must copy before anything after them
        self._orders.append(order)
        self._order_of[order.key] = order
        return order

    def _on_device_evict(self: KVCacheManager, block: int) -> None:
        """A cached device block is being reused: write it back to the host tier first
        (LSM-GNN's victim buffer), unless the host already holds that content."""
        entry = self.prefix_cache.entry_of_block(block)
        if entry is not None and self.save_evicted_to_host:
            block_hash, cached = entry
            host = self.lower[0]
            if host.tier is Tier.HOST and host.cache.block_of(block_hash) is None \
                    and host.pool.num_free > 0:
                (host_block,) = host.pool.allocate(1)
                host.cache.insert(block_hash, host_block, cached.parent, cached.token_ids,
                                  cached.namespace)
                host.pool.release([host_block])  # cached, unreferenced: evictable by score
                # No hold on the device block: its new owner writes it only in this step's
                # forward, which waits for this copy (the order has wait=True).
                self._victims.append((block, host_block))
                self.counters.victim_saves += 1
        self.prefix_cache.evict(block)

    def _flush_victims(self: KVCacheManager) -> None:
        if not self._victims:
            return
        moves = [(Tier.DEVICE, d, Tier.HOST, h) for d, h in self._victims]
        self._victims = []
        order = self._order("-", "victim", moves)
        order.wait = True
        self._inflight[order.key] = []

    def take_pending_orders(self: KVCacheManager) -> list[SwapOrder]:
        """Every copy decided since the last call, in the order it must run (FIFO)."""
        self._flush_victims()
        orders, self._orders = self._orders, []
        return orders

    def _lower_tier_score(self: KVCacheManager, cache: PrefixCache) -> Callable[[int], float]:
        def score(block: int) -> float:
            block_hash = cache.hash_of(block)
            return -1.0 if block_hash is None else float(self.waiting_demand[block_hash])

        return score

    def check_invariants(self: KVCacheManager) -> None:
        """Every reference is accounted for: tables and in-flight copies on the device,
        swapped placements in the lower tiers."""
        self.pool.check_invariants()
        counts = [0] * self.pool.num_blocks
        owners = [*self._tables.values(), *self._inflight.values(), *self._reserves.values()]
        for table in owners:
            for block in table:
                counts[block] += 1
        require(counts == self.pool.ref_counts, "device ref counts disagree with owners")
        for store in self.lower:
            store.pool.check_invariants()
            lower_counts = [0] * store.pool.num_blocks
            for placements in self._swapped.values():
                for owner, block in placements:
                    if owner is store:
                        lower_counts[block] += 1
            require(lower_counts == store.pool.ref_counts,
                    f"{store.tier.value} ref counts disagree")
