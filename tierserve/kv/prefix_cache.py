"""PrefixCache: chained content hashes of full KV blocks -> the block that holds them.

A block's hash covers its parent's hash, its own token ids and a namespace (anything else that
changes KV: a LoRA, a multimodal input). Lookups walk a request's blocks from the first and stop
at the first miss, checking the stored tokens on each hit, so a hash collision can never serve
wrong KV. Eviction order lives in the BlockPool's free queue (LRU among unreferenced blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

BlockHash = int


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], namespace: str = "") -> BlockHash:
    """The chained hash of one full block."""
    return hash((parent, token_ids, namespace))


@dataclass(slots=True)
class CachedBlock:
    block_id: int
    parent: BlockHash | None
    token_ids: tuple[int, ...]
    namespace: str


class PrefixCache:
    """Hash -> block map with the stored content needed to verify a hit."""

    def __init__(self) -> None:
        self._by_hash: dict[BlockHash, CachedBlock] = {}
        self._hash_of_block: dict[int, BlockHash] = {}
        self.queries = 0  # blocks looked up
        self.hits = 0  # blocks found

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: BlockHash, parent: BlockHash | None,
               token_ids: tuple[int, ...], namespace: str) -> int | None:
        """The block holding exactly this content, or None."""
        self.queries += 1
        entry = self._by_hash.get(block_hash)
        if entry is None or (entry.parent, entry.token_ids, entry.namespace) != (
            parent, token_ids, namespace
        ):
            return None
        self.hits += 1
        return entry.block_id

    def insert(self, block_hash: BlockHash, block_id: int, parent: BlockHash | None,
               token_ids: tuple[int, ...], namespace: str) -> None:
        """Register a newly filled block; a block already cached under another id is kept."""
        if block_hash in self._by_hash or block_id in self._hash_of_block:
            return
        self._by_hash[block_hash] = CachedBlock(block_id, parent, token_ids, namespace)
        self._hash_of_block[block_id] = block_hash

    def holds(self, block_id: int) -> bool:
        """Whether ``block_id`` holds cached content."""
        return block_id in self._hash_of_block

    def hash_of(self, block_id: int) -> BlockHash | None:
        return self._hash_of_block.get(block_id)

    def block_of(self, block_hash: BlockHash) -> int | None:
        """The block cached under a hash the caller computed itself (no content check needed)."""
        entry = self._by_hash.get(block_hash)
        return entry.block_id if entry else None

    def entry(self, block_hash: BlockHash) -> CachedBlock | None:
        return self._by_hash.get(block_hash)

    def entry_of_block(self, block_id: int) -> tuple[BlockHash, CachedBlock] | None:
        block_hash = self._hash_of_block.get(block_id)
        return None if block_hash is None else (block_hash, self._by_hash[block_hash])

    def evict(self, block_id: int) -> None:
        """Forget whatever ``block_id`` held (it is being reused)."""
        block_hash = self._hash_of_block.pop(block_id, None)
        if block_hash is not None:
            del self._by_hash[block_hash]

    def clear(self) -> None:
        self._by_hash.clear()
        self._hash_of_block.clear()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
