"""Eviction policies for the feature cache: which resident lines leave, which missed lines enter.

A policy scores lines; a higher score leaves first. The cache (`tiergnn.cache`) owns the mechanism:
it sorts the missed lines by score ascending and the resident lines by score descending, and a
missed line replaces a resident one only while it scores lower (free slots take lines outright).
That one exchange rule gives each policy its admission behaviour for free:

- `lru`: resident lines score minus their last use, a missed line minus now: a miss enters
  while lines not used in this step remain to evict.
- `static`: minus a static importance percentile (degree by default): the cache converges to the
  most important nodes and a miss of a colder node bypasses it. Preloaded with the top nodes.
- `hybrid` (LSM-GNN): the next-reuse distance from the look-ahead window of already-sampled
  batches dominates; the static percentile breaks ties (mostly among lines not seen in the window).
  With a window covering the whole future and no static part this is Belady's rule with bypass.

Policies are bookkeeping on torch tensors of node ids; they hold no features.
"""

from __future__ import annotations

import torch

POLICIES: dict[str, type[EvictionPolicy]] = {}


def register(name: str):
    def wrap(cls):
        POLICIES[name] = cls
        cls.name = name
        return cls
    return wrap


def make_policy(name: str, num_nodes: int, static_score: torch.Tensor | None = None,
                static_weight: float = 0.5) -> EvictionPolicy:
    """The policy registered as `name` (lru, static, hybrid, none)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](num_nodes, static_score, static_weight)


def percentile(score: torch.Tensor) -> torch.Tensor:
    """Each node's rank in `score` scaled to [0, 1): 0 is the least important."""
    ranks = torch.empty(len(score), dtype=torch.float32)
    ranks[torch.argsort(score, stable=True)] = torch.arange(len(score), dtype=torch.float32)
    return ranks / max(1, len(score))


class EvictionPolicy:
    """Scores lines; higher leaves first. `step` counts gathers (one per mini-batch)."""

    name = "base"
    admits = True          # False: nothing enters after the preload

    def __init__(self, num_nodes: int, static_score: torch.Tensor | None, static_weight: float):
        self.num_nodes = num_nodes
        self.static_weight = static_weight
        self.static = (percentile(static_score) if static_score is not None
                       else torch.zeros(num_nodes))

    def observe(self, nodes: torch.Tensor, step: int) -> None:
        """`nodes` were used at `step` (hits and admitted lines)."""

    def set_future(self, window: list[torch.Tensor]) -> None:
        """The node sets of the next batches, nearest first (look-ahead policies use it)."""

    def score(self, nodes: torch.Tensor, step: int, incoming: bool) -> torch.Tensor:
        raise NotImplementedError

    def preload(self, capacity: int) -> torch.Tensor | None:
        """Nodes to fill the cache with before the first batch, or None."""
        return None


@register("none")
class NoCache(EvictionPolicy):
    """Nothing is cached: every row comes from storage."""

    admits = False

    def score(self, nodes, step, incoming):
        return torch.zeros(len(nodes))


@register("lru")
class LRU(EvictionPolicy):
    def __init__(self, num_nodes, static_score, static_weight):
        super().__init__(num_nodes, static_score, static_weight)
        self.last_use = torch.full((num_nodes,), -1, dtype=torch.long)

    def observe(self, nodes, step):
        self.last_use[nodes] = step

    def score(self, nodes, step, incoming):
        if incoming:
            return torch.full((len(nodes),), -float(step))
        return -self.last_use[nodes].float()


@register("static")
class Static(EvictionPolicy):
    def score(self, nodes, step, incoming):
        return -self.static[nodes]

    def preload(self, capacity):
        return torch.argsort(self.static, descending=True)[:capacity]


@register("hybrid")
class Hybrid(EvictionPolicy):
    """LSM-GNN's rule: next reuse in the look-ahead window first, static importance second."""

    def __init__(self, num_nodes, static_score, static_weight):
        super().__init__(num_nodes, static_score, static_weight)
        self.next_use = torch.full((num_nodes,), 0, dtype=torch.float32)
        self._marked: list[torch.Tensor] = []
        self.window_len = 0

    def set_future(self, window):
        for nodes in self._marked:           # undo only what was marked, O(window), not O(nodes)
            self.next_use[nodes] = 0
        self.window_len = len(window)
        for distance in range(len(window), 0, -1):   # far to near: the nearest use wins
            self.next_use[window[distance - 1]] = distance
        self._marked = list(window)

    def score(self, nodes, step, incoming):
        distance = self.next_use[nodes]
        distance = torch.where(distance == 0, float(self.window_len + 1), distance)
        # Distances are integers; the static part stays below 1 so it only breaks ties.
        return distance - self.static_weight * self.static[nodes]

    def preload(self, capacity):
        return torch.argsort(self.static, descending=True)[:capacity]
