"""BlockPool: fixed-size KV blocks with reference counts and an LRU queue of free blocks.

A block is in exactly one of two places:

    referenced (ref_count > 0)  <-- allocate / touch --   free queue (ref_count == 0)
                                -- release to 0 ------>   (oldest first = evicted first)

A free block may still hold a cached prefix (its hash stays registered in the PrefixCache) until
it is handed out again; handing it out evicts that cache entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class BlockPoolExhausted(RuntimeError):
    """Asked for more blocks than are free; callers check ``num_free`` first."""


class BlockPool:
    """``num_blocks`` KV blocks, identified by integer ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Insertion order is eviction order: the first key is the least recently freed block.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._on_evict = on_evict  # told when a free block is handed out (drop its cache entry)

    @property
    def num_free(self) -> int:
        """Blocks with no reference, cached or not: what an allocation may use."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the front of the free queue, each with ref_count 1."""
        if count > len(self._free):
            raise BlockPoolExhausted(f"asked for {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, block: int) -> None:
        """Add a reference to ``block`` (a prefix-cache hit), taking it off the free queue."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue's tail.

        Pass a request's blocks tail first so that, among them, the deepest prefix blocks are
        evicted first and the shared heads stay cached longest.
        """
        for block in blocks:
            count = self.ref_counts[block]
            if count <= 0:
                raise AssertionError(f"block {block} released with ref_count {count}")
            self.ref_counts[block] = count - 1
            if count == 1:
                self._free[block] = None

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0

    def check_invariants(self) -> None:
        """Every block is either referenced or free, never both; counts are never negative."""
        for block, count in enumerate(self.ref_counts):
            assert count >= 0, f"block {block} has ref_count {count}"
            assert (count == 0) == (block in self._free), f"block {block} free-queue mismatch"
