"""A pure-torch uniform neighbour sampler over CSC (pyg-lib is not on PyPI), as a PyG BaseSampler.

Each hop samples, for every frontier node, `fanout` distinct in-neighbours uniformly at random (all
of them when it has fewer), the semantics of PyG's `NeighborLoader(replace=False)`. Two vectorized
ways, chosen per node by degree:
- degree <= 8 * fanout: a random key per in-edge, the `fanout` smallest keys in each segment win;
- larger: 2 * fanout draws with replacement, the first `fanout` distinct ones in draw order (a
  uniformly random subset by symmetry); the rare node left short is drawn again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch_geometric.sampler import (
    BaseSampler,
    EdgeSamplerInput,
    NegativeSampling,
    NodeSamplerInput,
    SamplerOutput,
)
from torch_geometric.sampler.neighbor_sampler import edge_sample

_KEY_SORT_LIMIT = 8


@dataclass(slots=True)
class SampledSubgraph:
    """One mini-batch's computation graph; local ids index `node` (the seeds come first)."""

    node: torch.Tensor              # (num_nodes,) global ids
    row: torch.Tensor               # (num_edges,) local source (the sampled neighbour)
    col: torch.Tensor               # (num_edges,) local destination
    edge: torch.Tensor              # (num_edges,) position in the CSC `indices` array
    num_sampled_nodes: list[int]
    num_sampled_edges: list[int]


def _segment_rank(segment: torch.Tensor) -> torch.Tensor:
    """Rank of each element within its run, for a non-decreasing `segment` vector."""
    n = len(segment)
    if n == 0:
        return segment
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    start_pos = torch.where(starts, torch.arange(n), torch.zeros(n, dtype=torch.long))
    return torch.arange(n) - torch.cummax(start_pos, 0).values


def _pick_by_random_key(seg_begin, degree, fanout, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """All in-edges of each segment, keep the `fanout` with the smallest random keys."""
    owner = torch.repeat_interleave(torch.arange(len(degree)), degree)
    offsets = torch.arange(len(owner)) - torch.repeat_interleave(
        torch.cumsum(degree, 0) - degree, degree)
    keys = torch.rand(len(owner), generator=gen, dtype=torch.float64) + owner  # owner-major order
    order = torch.argsort(keys)
    owner, offsets = owner[order], offsets[order]
    keep = _segment_rank(owner) < fanout
    return owner[keep], seg_begin[owner[keep]] + offsets[keep]


def _pick_by_draws(seg_begin, degree, fanout, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """First `fanout` distinct of 2 * fanout draws with replacement; redraws the short ones."""
    owners, positions = [], []
    todo = torch.arange(len(degree))
    while len(todo):
        draws = 2 * fanout
        owner = todo.repeat_interleave(draws)
        pick = (torch.rand(len(owner), generator=gen, dtype=torch.float64)
                * degree[owner]).long()
        draw_order = torch.arange(len(owner))
        # Stable sort by (owner, pick): the first of equal picks is the earliest draw.
        key = owner * (degree.max() + 1) + pick
        order = torch.sort(key, stable=True).indices
        key_sorted = key[order]
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = key_sorted[1:] != key_sorted[:-1]
        kept = order[first]
        kept = kept[torch.argsort(draw_order[kept])]            # back to draw order ...
        kept = kept[torch.sort(owner[kept], stable=True).indices]  # ... grouped by owner
        keep = _segment_rank(owner[kept]) < fanout
        kept = kept[keep]
        counts = torch.bincount(owner[kept], minlength=len(degree))[todo]
        done = counts >= fanout
        done_mask = torch.zeros(len(degree), dtype=torch.bool)
        done_mask[todo[done]] = True
        ok = done_mask[owner[kept]]
        owners.append(owner[kept][ok])
        positions.append(seg_begin[owner[kept][ok]] + pick[kept][ok])
        todo = todo[~done]
    return torch.cat(owners), torch.cat(positions)


def sample_hop(indptr: torch.Tensor, indices: torch.Tensor, nodes: torch.Tensor, fanout: int,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `nodes`, up to `fanout` distinct in-edges: (index into nodes, CSC position)."""
    seg_begin = indptr[nodes]
    degree = indptr[nodes + 1] - seg_begin
    if fanout < 0:                                  # -1: every neighbour, as in PyG
        fanout = int(degree.max()) if len(degree) else 0
    parts = []
    small = degree <= fanout
    take_all = torch.nonzero(small).flatten()
    owner = torch.repeat_interleave(take_all, degree[take_all])
    within = torch.arange(len(owner)) - torch.repeat_interleave(
        torch.cumsum(degree[take_all], 0) - degree[take_all], degree[take_all])
    parts.append((owner, seg_begin[owner] + within))
    mid = torch.nonzero(~small & (degree <= _KEY_SORT_LIMIT * fanout)).flatten()
    if len(mid):
        o, p = _pick_by_random_key(seg_begin[mid], degree[mid], fanout, gen)
        parts.append((mid[o], p))
    big = torch.nonzero(degree > _KEY_SORT_LIMIT * fanout).flatten()
    if len(big):
        o, p = _pick_by_draws(seg_begin[big], degree[big], fanout, gen)
        parts.append((big[o], p))
    return torch.cat([o for o, _ in parts]), torch.cat([p for _, p in parts])


class NeighborSampler(BaseSampler):
    """Multi-hop uniform sampling from a `CSCGraphStore` (or any (indptr, indices) pair)."""

    def __init__(self, graph, num_neighbors: list[int], seed: int | None = None):
        indptr, indices = graph.csc() if hasattr(graph, "csc") else graph
        self.indptr = indptr
        self.indices = indices.long() if indices.dtype != torch.long else indices
        self.num_nodes = len(indptr) - 1
        self.num_neighbors = list(num_neighbors)
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self._local_of = torch.full((self.num_nodes,), -1, dtype=torch.long)
        self._lock = threading.Lock()   # `_local_of` is scratch shared by calls
        self._worker_seeded: int | None = None  # the DataLoader worker seed last drawn from

    def _seed_for_worker(self) -> None:
        """In a DataLoader worker process, draw from that worker's own stream. Each worker gets a
        copy of this sampler, generator state included, so without this every worker would
        draw the same neighbours for the same seeds. DataLoader gives each worker a distinct
        seed per epoch (from the main process's torch RNG: reproducible after
        `torch.manual_seed`), mixed here with ``seed``."""
        info = torch.utils.data.get_worker_info()
        if info is None or self._worker_seeded == info.seed:
            return
        self._worker_seeded = info.seed
        self.generator.manual_seed((info.seed + 1_000_003 * (self.seed or 0)) % (1 << 63))

    def sample(self, seeds: torch.Tensor) -> SampledSubgraph:
        """The computation graph of `seeds` (global ids, unique)."""
        with self._lock:
            self._seed_for_worker()
            return self._sample(seeds.long())

    def _sample(self, seeds: torch.Tensor) -> SampledSubgraph:
        local_of = self._local_of
        nodes = [seeds]
        local_of[seeds] = torch.arange(len(seeds))
        total = len(seeds)
        frontier_local = torch.arange(len(seeds))
        frontier = seeds
        rows, cols, edges = [], [], []
        num_nodes, num_edges = [len(seeds)], []
        try:
            for fanout in self.num_neighbors:
                owner, position = sample_hop(self.indptr, self.indices, frontier, fanout,
                                             self.generator)
                neighbor = self.indices[position]
                new = torch.unique(neighbor[local_of[neighbor] < 0])
                local_of[new] = torch.arange(total, total + len(new))
                rows.append(local_of[neighbor])
                cols.append(frontier_local[owner])
                edges.append(position)
                nodes.append(new)
                num_nodes.append(len(new))
                num_edges.append(len(position))
                frontier_local = torch.arange(total, total + len(new))
                frontier = new
                total += len(new)
            node = torch.cat(nodes)
        finally:
            for part in nodes:
                local_of[part] = -1
        empty = torch.empty(0, dtype=torch.long)
        return SampledSubgraph(node=node, row=torch.cat(rows) if rows else empty,
                               col=torch.cat(cols) if cols else empty,
                               edge=torch.cat(edges) if edges else empty,
                               num_sampled_nodes=num_nodes, num_sampled_edges=num_edges)

    # PyG's BaseSampler interface -------------------------------------------------------------
    def sample_from_nodes(self, inputs: NodeSamplerInput, **kwargs) -> SamplerOutput:
        seeds = inputs.node
        if len(torch.unique(seeds)) != len(seeds):
            raise ValueError("seed nodes in one batch must be distinct")
        return self._output(seeds, metadata=(inputs.input_id, inputs.time))

    def sample_from_edges(self, inputs: EdgeSamplerInput,
                          neg_sampling: NegativeSampling | None = None) -> SamplerOutput:
        """Link prediction (PyG's `LinkNeighborLoader` / `LinkLoader`): the computation graph of
        each batch's edge endpoints, with PyG's own negative sampling (binary or triplet) and
        edge-label bookkeeping (`torch_geometric.sampler.neighbor_sampler.edge_sample`)."""
        if inputs.time is not None:
            raise ValueError("tiergnn's sampler is not temporal: edge_label_time is not supported")
        if inputs.input_type is not None and inputs.input_type[0] != inputs.input_type[-1]:
            raise ValueError("tiergnn's graphs have one node type; got edges "
                             f"{inputs.input_type}")
        homogeneous = EdgeSamplerInput(inputs.input_id, inputs.row, inputs.col, inputs.label)

        return edge_sample(homogeneous, lambda seeds, _time: self._output(seeds),
                           self.num_nodes, disjoint=False, neg_sampling=neg_sampling)

    def _output(self, seeds: torch.Tensor, metadata=None) -> SamplerOutput:
        """`sample(seeds)` as PyG's SamplerOutput."""
        sub = self.sample(seeds)
        return SamplerOutput(node=sub.node, row=sub.row, col=sub.col, edge=sub.edge, batch=None,
                             num_sampled_nodes=sub.num_sampled_nodes,
                             num_sampled_edges=sub.num_sampled_edges, metadata=metadata)
