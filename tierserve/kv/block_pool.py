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

EVICTION_SCAN = 64  # scored eviction looks at this many least recently freed blocks at most
RUN_SCAN_GROUPS = 64  # a search for a run of free blocks looks this many runs' length ahead


class BlockPoolExhausted(RuntimeError):
    """Asked for more blocks than are free; callers check ``num_free`` first."""


class BlockPool:
    """``num_blocks`` KV blocks, identified by integer ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None,
                 is_cached: Callable[[int], bool] | None = None, group_size: int = 0,
                 evict_score: Callable[[int], float] | None = None,
                 eviction_scan: int = EVICTION_SCAN) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Insertion order is eviction order: the first key is the least recently freed block.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # The free blocks that hold no cached content: handed out before any cached one.
        self._uncached: OrderedDict[int, None] = OrderedDict(self._free)
        self._on_evict = on_evict  # told when a free block is handed out (drop its cache entry)
        self._is_cached = is_cached or (lambda block: False)
        # Block groups (FastSwitch): > 0 means "hand out runs of neighbouring blocks", so that a
        # request's blocks coalesce into few large copies when it is swapped.
        self.group_size = group_size
        self._cursor = 0  # next-fit search start for a free run
        # Eviction strategy: None is LRU; else the free block with the lowest score goes first
        # (ties: least recently freed). Uncached blocks should score lowest.
        self._evict_score = evict_score
        self._eviction_scan = eviction_scan  # scored eviction looks at this many oldest free

    @property
    def num_free(self) -> int:
        """Blocks with no reference, cached or not: what an allocation may use."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int, after: int | None = None) -> list[int]:
        """Take ``count`` free blocks, each with ref_count 1.

        Blocks holding no cached content go first (oldest freed first); then cached blocks are
        evicted, least recently freed first (or by ``evict_score``). With block groups: first
        the blocks right after ``after`` (the request's last block), then runs of neighbours.
        """
        if count > len(self._free):
            raise BlockPoolExhausted(f"asked for {count} blocks, {len(self._free)} free")
        blocks: list[int] = []
        if self.group_size > 0:
            blocks = self._take_runs(count, after)
        while len(blocks) < count:
            block = next(iter(self._uncached)) if self._uncached else self._victim()
            self._take(block)
            blocks.append(block)
        return blocks

    def peek_victim(self) -> int | None:
        """The block ``allocate(1)`` would hand out now (without block groups), not taken;
        None when no block is free."""
        if not self._free:
            return None
        return next(iter(self._uncached)) if self._uncached else self._victim()

    def _victim(self) -> int:
        """The cached free block to evict: LRU, or the lowest score among the oldest few."""
        if self._evict_score is None:
            return next(iter(self._free))
        best, best_score = None, 0.0
        for seen, block in enumerate(self._free):
            score = self._evict_score(block)
            if score <= 0:
                return block  # the oldest block nobody waits for
            if best is None or score < best_score:
                best, best_score = block, score
            if seen >= self._eviction_scan:
                break
        return best

    def _take(self, block: int) -> None:
        del self._free[block]
        self._uncached.pop(block, None)
        if self._on_evict is not None:
            self._on_evict(block)
        self.ref_counts[block] = 1

    def _takeable(self, block: int) -> bool:
        return block in self._uncached

    def _take_runs(self, count: int, after: int | None) -> list[int]:
        taken: list[int] = []
        nxt = after + 1 if after is not None else None
        while len(taken) < count:
            if nxt is None or nxt >= self.num_blocks or not self._runnable(nxt):
                nxt = self._find_run(min(self.group_size, count - len(taken)))
                if nxt is None:
                    break
            self._take(nxt)
            taken.append(nxt)
            nxt += 1
        return taken

    def _find_run(self, length: int) -> int | None:
        """Start of a run of ``length`` free blocks (next-fit), uncached ones preferred; else
        the start of the longest run found."""
        start = self._scan(length, self._takeable)
        if start is None or not self._run_at_least(start, length, self._takeable):
            start = self._scan(length, self._runnable)
        return start

    def _runnable(self, block: int) -> bool:
        """Free blocks a group may take. With an eviction score, cached blocks are left to the
        score (they may hold content someone waits for); with LRU, contiguity wins."""
        if self._evict_score is not None:
            return self._takeable(block)
        return block in self._free

    def _run_at_least(self, start: int, length: int, ok: Callable[[int], bool]) -> bool:
        return all(start + i < self.num_blocks and ok(start + i) for i in range(length))

    def _scan(self, length: int, ok: Callable[[int], bool]) -> int | None:
        best_start, best_len, run_start, run_len = None, 0, 0, 0
        for step in range(min(self.num_blocks, RUN_SCAN_GROUPS * max(length, 1))):
            block = (self._cursor + step) % self.num_blocks
            if block == 0:
                run_len = 0
            if ok(block):
                if run_len == 0:
                    run_start = block
                run_len += 1
                if run_len > best_len:
                    best_start, best_len = run_start, run_len
                if run_len >= length:
                    self._cursor = (run_start + length) % self.num_blocks
                    return run_start
            else:
                run_len = 0
        return best_start

    def touch(self, block: int) -> None:
        """Add a reference to ``block`` (a prefix-cache hit), taking it off the free queue."""
        if self.ref_counts[block] == 0:
            del self._free[block]
            self._uncached.pop(block, None)
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
                if not self._is_cached(block):
                    self._uncached[block] = None

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0

    def check_invariants(self) -> None:
        """Every block is either referenced or free, never both; counts are never negative."""
        for block, count in enumerate(self.ref_counts):
            require(count >= 0, f"block {block} has ref_count {count}")
            require((count == 0) == (block in self._free), f"block {block} free-queue mismatch")
        require(all(block in self._free for block in self._uncached), "uncached block not free")


def require(condition: bool, message: str) -> None:
    """An accounting check that holds under ``python -O`` too (the engine relies on it)."""
    if not condition:
        raise AssertionError(message)
