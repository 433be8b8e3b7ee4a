"""KVCacheManager: the scheduler's only door to KV memory: prefix lookup, allocate, commit, free.

The scheduler asks in tokens and gets yes/no answers; block ids only leave this class as a copy of
a request's block table, for the executor.
"""

from __future__ import annotations

from tierserve.kv.block_pool import BlockPool
from tierserve.kv.prefix_cache import BlockHash, PrefixCache, hash_block
from tierserve.request import Request


class KVCacheManager:
    """Paged KV bookkeeping for ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 namespace: str = "") -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace
        self.prefix_cache = PrefixCache()
        self.pool = BlockPool(num_blocks, on_evict=self.prefix_cache.evict)
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # chained hashes of committed full blocks

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return self.pool.num_used / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (block ids in token order)."""
        return list(self._tables.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    # -- admission -----------------------------------------------------------------------------
    def lookup_prefix(self, request: Request) -> int:
        """Attach the longest cached prefix of a request that holds no blocks; return its tokens.

        At least one token is always left to compute, so the step that follows produces logits.
        """
        if request.request_id in self._tables:
            raise AssertionError(f"{request.request_id} already holds blocks")
        table: list[int] = []
        hashes: list[BlockHash] = []
        if self.enable_prefix_caching:
            max_blocks = (request.num_tokens - 1) // self.block_size
            parent: BlockHash | None = None
            for index in range(max_blocks):
                tokens = tuple(request.token_ids(index * self.block_size,
                                                 (index + 1) * self.block_size))
                block_hash = hash_block(parent, tokens, self.namespace)
                block = self.prefix_cache.lookup(block_hash, parent, tokens, self.namespace)
                if block is None:
                    break
                self.pool.touch(block)
                table.append(block)
                hashes.append(block_hash)
                parent = block_hash
        self._tables[request.request_id] = table
        self._hashes[request.request_id] = hashes
        return len(table) * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether ``num_new_tokens`` more tokens fit, leaving ``reserve`` blocks free."""
        return self._blocks_missing(request, num_new_tokens) + reserve <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_computed_tokens + num_new_tokens`` tokens."""
        missing = self._blocks_missing(request, num_new_tokens)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            self._tables.setdefault(request.request_id, []).extend(self.pool.allocate(missing))
        return True

    def _blocks_missing(self, request: Request, num_new_tokens: int) -> int:
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        return needed - len(self._tables.get(request.request_id, ()))

    # -- after a step --------------------------------------------------------------------------
    def commit(self, request: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
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

    def free(self, request: Request) -> None:
        """Release every block of the request (cached blocks stay cached until evicted)."""
        table = self._tables.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        if table:
            self.pool.release(reversed(table))

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (blocks in use are untouched)."""
        self.prefix_cache.clear()

    def check_invariants(self) -> None:
        """Ref counts equal the number of tables holding each block."""
        self.pool.check_invariants()
        counts = [0] * self.pool.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.pool.ref_counts, "block ref counts disagree with block tables"
