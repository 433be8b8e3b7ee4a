"""KVCacheManager: the scheduler's only door to KV memory: prefix lookup, allocate, commit, free,
and moving a request's blocks between tiers (device <-> host <-> disk).

The scheduler asks in tokens and gets yes/no answers or opaque copy orders (SwapOps); block ids
only leave this class as a copy of a request's block table, for the executor.

Copies run on the executor's swap worker, in submission order (FIFO). Until a copy is reported
done, the device blocks it reads or writes stay referenced by the copy itself ("in flight"), so
no other request can be handed them; that single rule keeps every overlap safe.
"""

from __future__ import annotations

import itertools
from collections import Counter

from tierserve.kv.block_pool import BlockPool
from tierserve.kv.prefix_cache import BlockHash, PrefixCache, hash_block
from tierserve.kv.tiers import SwapCounters, SwapOrder, TierMovesMixin, TierStore
from tierserve.kv.tiers_types import Tier
from tierserve.request import Request


class KVCacheManager(TierMovesMixin):
    """Paged KV bookkeeping over a device tier and optional host and disk tiers."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 namespace: str = "", num_host_blocks: int = 0, num_disk_blocks: int = 0,
                 block_group_size: int = 0, save_evicted_to_host: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace
        self.save_evicted_to_host = save_evicted_to_host and num_host_blocks > 0
        self.prefix_cache = PrefixCache()
        self.pool = BlockPool(num_blocks, on_evict=self._on_device_evict,
                              is_cached=self.prefix_cache.holds, group_size=block_group_size)
        self.device = TierStore(Tier.DEVICE, self.pool, self.prefix_cache)
        self.lower: list[TierStore] = []
        for tier, count in ((Tier.HOST, num_host_blocks), (Tier.DISK, num_disk_blocks)):
            if count > 0:
                cache = PrefixCache()
                pool = BlockPool(count, on_evict=cache.evict, is_cached=cache.holds,
                                 group_size=block_group_size,
                                 evict_score=self._lower_tier_score(cache))
                self.lower.append(TierStore(tier, pool, cache))
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # chained hashes of committed full blocks
        self._swapped: dict[str, list[tuple[TierStore, int]]] = {}
        self._inflight: dict[str, list[int]] = {}  # copy key -> device blocks it holds
        self._order_of: dict[str, SwapOrder] = {}  # copy key -> its order, until reported done
        # Prefetched blocks (a copy nothing waits for) are found by content only once they are
        # in: key -> (hash, device block) to register when the copy is reported done.
        self._deferred: dict[str, list[tuple[BlockHash, int]]] = {}
        self._reserves: dict[str, list[int]] = {}  # request -> unused blocks of its last group
        self._victims: list[tuple[int, int]] = []  # (device, host) blocks to save this step
        self._orders: list[SwapOrder] = []  # copies decided, not yet handed to the scheduler
        self._keys = itertools.count()
        self.waiting_demand: Counter[BlockHash] = Counter()  # static score: waiting requests per hash
        self.counters = SwapCounters()

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of device blocks referenced by some request or copy."""
        return self.pool.num_used / self.pool.num_blocks

    def tier_usage(self) -> dict[str, float]:
        return {store.tier.value: store.pool.num_used / store.pool.num_blocks
                for store in [self.device, *self.lower]}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (block ids in token order)."""
        return list(self._tables.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    @property
    def has_inflight(self) -> bool:
        """Copies whose completion has not been reported yet."""
        return bool(self._inflight)

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._swapped

    # -- admission -----------------------------------------------------------------------------
    def lookup_prefix(self, request: Request, use_cache: bool = True
                      ) -> tuple[int, SwapOrder | None]:
        """Attach the longest cached prefix of a request that holds no blocks.

        Device hits are shared in place; hits that only the host or disk tier still holds are
        copied up into new device blocks (the returned order; the step must wait for it). Returns
        the number of cached tokens. At least one token is always left to compute.
        ``use_cache=False`` attaches nothing (the request computes every token).
        """
        if request.request_id in self._tables:
            raise AssertionError(f"{request.request_id} already holds blocks")
        table: list[int] = []
        hashes: list[BlockHash] = []
        copies: list[tuple[TierStore, int, int]] = []  # (source tier, its block, device block)
        if self.enable_prefix_caching and use_cache:
            parent: BlockHash | None = None
            for index in range((request.num_tokens - 1) // self.block_size):
                tokens = tuple(request.token_ids(index * self.block_size,
                                                 (index + 1) * self.block_size))
                block_hash = hash_block(parent, tokens, self.namespace)
                block = self.prefix_cache.lookup(block_hash, parent, tokens, self.namespace)
                if block is not None and not copies:
                    self.pool.touch(block)
                    table.append(block)
                else:
                    found = self._lower_lookup(block_hash, parent, tokens)
                    if found is None or self.pool.num_free == 0:
                        break
                    # Hold the source first: the device allocation below may evict a block whose
                    # victim save would otherwise take this very host block.
                    found[0].pool.touch(found[1])
                    (device_block,) = self.pool.allocate(1, after=table[-1] if table else None)
                    copies.append((found[0], found[1], device_block))
                    table.append(device_block)
                hashes.append(block_hash)
                parent = block_hash
        self._tables[request.request_id] = table
        self._hashes[request.request_id] = hashes
        order = self._copy_up(request.request_id, copies, hashes[len(table) - len(copies):])
        return len(table) * self.block_size, order

    def _copy_up(self, request_id: str, copies: list[tuple[TierStore, int, int]],
                 hashes: list[BlockHash]) -> SwapOrder | None:
        if not copies:
            return None
        self.counters.lower_prefix_hits += len(copies)
        order = self._order(request_id, "in", [(s.tier, b, Tier.DEVICE, d) for s, b, d in copies])
        order.wait = True
        self._inflight[order.key] = [device_block for _, _, device_block in copies]
        for (store, block, device_block), block_hash in zip(copies, hashes):
            self.pool.touch(device_block)  # held by the copy until it has run
            store.pool.release([block])
            self._register(self.device, block_hash, device_block)
        return order

    def can_allocate(self, request: Request, num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether ``num_new_tokens`` more tokens fit, leaving ``reserve`` blocks free."""
        return self._blocks_missing(request, num_new_tokens) + reserve <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_kv_tokens + num_new_tokens`` tokens.

        With block groups, a request takes whole groups of neighbouring blocks while memory is
        plentiful and keeps the unused tail as its private reserve, so its table stays in few
        contiguous runs even when many requests grow in the same steps.
        """
        if self._blocks_missing(request, num_new_tokens) > self.pool.num_free:
            return False
        table = self._tables.setdefault(request.request_id, [])
        missing = self.blocks_for(request.num_kv_tokens + num_new_tokens) - len(table)
        reserve = self._reserves.get(request.request_id, [])
        while missing > 0 and reserve:
            table.append(reserve.pop(0))
            missing -= 1
        if missing > 0:
            group = self.pool.group_size
            take = missing
            if group and self.pool.num_free >= 4 * (missing + group):
                take = -(-missing // group) * group
            blocks = self.pool.allocate(take, after=table[-1] if table else None)
            table.extend(blocks[:missing])
            if blocks[missing:]:
                self._reserves[request.request_id] = blocks[missing:]
        return True

    def _blocks_missing(self, request: Request, num_new_tokens: int) -> int:
        needed = self.blocks_for(request.num_kv_tokens + num_new_tokens)
        held = len(self._tables.get(request.request_id, ()))
        return needed - held - len(self._reserves.get(request.request_id, ()))

    def _drop_reserve(self, request_id: str) -> None:
        reserve = self._reserves.pop(request_id, None)
        if reserve:
            self.pool.release(reversed(reserve))

    # -- after a step --------------------------------------------------------------------------
    def commit(self, request: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching or request.evicts_kv:
            return
        table = self._tables[request.request_id]
        hashes = self._hashes[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        parent = hashes[-1] if hashes else None
        for index in range(len(hashes), num_full):
            tokens = tuple(request.token_ids(index * self.block_size,
                                             (index + 1) * self.block_size))
            block_hash = hash_block(parent, tokens, self.namespace)
            self.prefix_cache.insert(block_hash, table[index], parent, tokens, self.namespace)
            hashes.append(block_hash)
            parent = block_hash

    def trim(self, request: Request) -> None:
        """Release the blocks past the request's cached tokens (after static eviction)."""
        table = self._tables.get(request.request_id)
        keep = self.blocks_for(request.num_kv_tokens)
        if table is not None and len(table) > keep:
            self.pool.release(reversed(table[keep:]))
            del table[keep:]

    def free(self, request: Request) -> None:
        """Release every block of the request in every tier (cached blocks stay cached)."""
        self.free_request_id(request.request_id)

    def free_request_id(self, request_id: str) -> None:
        """``free`` by id (also for blocks whose request object is gone: a repair)."""
        self._drop_reserve(request_id)
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table:
            self.pool.release(reversed(table))
        for store, block in reversed(self._swapped.pop(request_id, [])):
            store.pool.release([block])

    def owners(self) -> set[str]:
        """Every request id that holds blocks in some tier (or a private reserve)."""
        return set(self._tables) | set(self._swapped) | set(self._reserves)

    def copy_done(self, key: str) -> None:
        """The executor finished the copies of ``key``: its device blocks may be reused, and
        what a prefetch brought in is now found by content."""
        self._order_of.pop(key, None)
        for block_hash, block in self._deferred.pop(key, ()):
            self._register(self.device, block_hash, block)
        self.pool.release(self._inflight.pop(key, []))

    def fail_copies(self, keys: list[str]) -> set[str]:
        """The copies of ``keys`` failed: their destination blocks hold garbage, and so does
        whatever a later copy (still in flight) read from them. Every such block loses its
        cache entry; the requests that moved or hold one are returned (they must fail); the
        failed copies' blocks are released. Copies already settled are ignored."""
        poisoned: set[tuple[Tier, int]] = set()
        hit: list[SwapOrder] = []
        for key, order in self._order_of.items():  # submission (FIFO) order
            reads = {(op.src_tier, block) for op in order.ops for block in op.src_blocks()}
            if key in keys or reads & poisoned:
                hit.append(order)
                poisoned |= {(op.dst_tier, block) for op in order.ops for block in op.dst_blocks()}
        stores = {store.tier: store for store in [self.device, *self.lower]}
        for tier, block in poisoned:
            stores[tier].cache.evict(block)
        holders = {order.request_id for order in hit if order.direction != "victim"}
        device = {block for tier, block in poisoned if tier is Tier.DEVICE}
        holders |= {rid for rid, table in self._tables.items() if device.intersection(table)}
        holders |= {rid for rid, placements in self._swapped.items()
                    if any((store.tier, block) in poisoned for store, block in placements)}
        for order in hit:
            self._deferred.pop(order.key, None)  # nothing it wrote is registered
        for key in keys:
            if self._order_of.pop(key, None) is not None:
                self.pool.release(self._inflight.pop(key, []))
        return holders

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (blocks in use are untouched)."""
        self.prefix_cache.clear()

    def set_waiting_demand(self, demand: Counter) -> None:
        """Static part of the lower tiers' eviction score: waiting requests needing each hash."""
        self.waiting_demand = demand

    def request_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks (for the waiting-demand count)."""
        hashes, parent = [], None
        for index in range(request.num_tokens // self.block_size):
            tokens = tuple(request.token_ids(index * self.block_size, (index + 1) * self.block_size))
            parent = hash_block(parent, tokens, self.namespace)
            hashes.append(parent)
        return hashes
