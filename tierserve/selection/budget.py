"""How many tokens a static eviction keeps and how many blocks a decode attends to: the
counting rules of ``eviction.py`` and ``policies.py`` for one request, without torch (the
simulator prices KV selection with them)."""

from __future__ import annotations

import math

# What each policy (``--kv-selection``) reads, by name: ``policies.py`` and the simulator both ask.
READS_BOUNDS = frozenset({"quest", "mpcache"})  # score blocks by their per-block key bounds
SHARES_LAYER_PAIRS = frozenset({"mpcache"})  # layers 2i and 2i+1 share one selection


def kept_after_eviction(budget: float, length: int, forced: int) -> int:
    """Prompt tokens a budgeted static eviction keeps: ``budget`` of ``length`` (a share up to
    1, tokens above 1), never fewer than the ``forced`` ones (sink and last block)."""
    count = math.ceil(budget * length) if budget <= 1 else int(budget)
    return min(length, max(count, forced))


def selected_blocks(budget: float, num_blocks: int, forced: int, block_size: int) -> int:
    """Blocks one decode attends to under a selection budget (a share of the context's blocks
    up to 1, tokens above 1), the ``forced`` sink and recent blocks included."""
    keep = math.ceil(num_blocks * budget) if budget <= 1 else math.ceil(budget / block_size)
    return min(max(keep, forced), num_blocks)


LONG_PROMPT = 24 * 1024  # MPCache halves its observation window beyond this many tokens


def mpcache_window(share: float, length: int) -> int:
    """Queries at the end of a ``length``-token prompt that observe for MPCache's static stage."""
    if length > LONG_PROMPT:
        share /= 2
    return max(1, math.ceil(share * length))
