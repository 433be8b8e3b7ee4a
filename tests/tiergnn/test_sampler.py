"""The neighbour sampler against a dense reference, and its uniformity without replacement."""

from __future__ import annotations

import numpy as np
import torch

from tiergnn.sampler import NeighborSampler, sample_hop


def _csc(small_graph):
    return (torch.from_numpy(np.array(small_graph.indptr, dtype=np.int64)),
            torch.from_numpy(np.array(small_graph.indices, dtype=np.int64)))


def _dense_khop(adjacency: np.ndarray, seeds: np.ndarray, hops: int) -> set[tuple[int, int]]:
    """Edges (src, dst) of the full k-hop in-neighbourhood, by dense matrix reasoning."""
    edges, frontier, seen = set(), set(seeds.tolist()), set(seeds.tolist())
    for _ in range(hops):
        nxt = set()
        for dst in frontier:
            for src in np.flatnonzero(adjacency[:, dst]):
                edges.add((int(src), dst))
                if src not in seen:
                    nxt.add(int(src))
        seen |= nxt
        frontier = nxt
    return edges


def test_full_fanout_equals_the_dense_k_hop_neighbourhood(small_graph):
    indptr, indices = _csc(small_graph)
    n = small_graph.meta.num_nodes
    adjacency = np.zeros((n, n), dtype=bool)
    adjacency[indices.numpy(), np.repeat(np.arange(n), np.diff(indptr.numpy()))] = True
    seeds = torch.tensor([0, 17, 2500])
    sub = NeighborSampler((indptr, indices), [-1, -1], seed=0).sample(seeds)
    got = {(int(sub.node[r]), int(sub.node[c])) for r, c in zip(sub.row, sub.col)}
    assert got == _dense_khop(adjacency, seeds.numpy(), 2)
    assert torch.equal(sub.node[:3], seeds)
    assert len(torch.unique(sub.node)) == len(sub.node)
    degree = np.diff(indptr.numpy())
    hop1 = sub.node[3:3 + sub.num_sampled_nodes[1]].numpy()
    assert sub.num_sampled_edges == [int(degree[seeds.numpy()].sum()), int(degree[hop1].sum())]


def test_sampled_edges_are_real_distinct_and_capped(small_graph):
    indptr, indices = _csc(small_graph)
    sampler = NeighborSampler((indptr, indices), [5, 3], seed=1)
    seeds = torch.arange(0, 3000, 7)
    sub = sampler.sample(seeds)
    assert torch.equal(indices[sub.edge], sub.node[sub.row])        # the edge's source
    dst = torch.searchsorted(indptr, sub.edge, right=True) - 1
    assert torch.equal(dst, sub.node[sub.col])                       # ... and its target
    assert len(torch.unique(sub.edge)) == len(sub.edge)              # without replacement
    degree = indptr[1:] - indptr[:-1]
    per_seed = torch.bincount(sub.col[:sub.num_sampled_edges[0]], minlength=len(seeds))
    assert torch.equal(per_seed, degree[seeds].clamp(max=5))


def test_each_neighbour_is_equally_likely_on_both_sampling_paths():
    # Node 0 has 40 in-neighbours (random-key path for fanout 5), node 1 has 400 (draw path).
    indptr = torch.tensor([0, 40, 440])
    indices = torch.cat([torch.arange(2, 42), torch.arange(2, 402)])
    gen = torch.Generator().manual_seed(0)
    trials = 4000
    # One call, each node repeated `trials` times: trial i is frontier entries 2i and 2i + 1.
    owner, position = sample_hop(indptr, indices, torch.tensor([0, 1]).repeat(trials), 5, gen)
    assert torch.equal(torch.bincount(owner, minlength=2 * trials), torch.full((2 * trials,), 5))
    distinct = torch.unique(owner * 1000 + position)
    assert len(distinct) == len(position)                      # no repeats within a trial
    counts = torch.bincount(position, minlength=440).float()
    for node, degree in ((0, 40), (1, 400)):
        freq = counts[indptr[node]:indptr[node + 1]] / trials
        expected = 5 / degree
        # Binomial standard error per neighbour; 5 sigma over every neighbour.
        sigma = (expected * (1 - expected) / trials) ** 0.5
        assert (freq - expected).abs().max() < 5 * sigma


def test_seeded_sampler_repeats_itself(small_graph):
    graph = _csc(small_graph)
    a = NeighborSampler(graph, [4, 4], seed=9).sample(torch.arange(50))
    b = NeighborSampler(graph, [4, 4], seed=9).sample(torch.arange(50))
    assert torch.equal(a.node, b.node) and torch.equal(a.edge, b.edge)


_WORKERS_SCRIPT = """
import json, sys, torch
from torch_geometric.data import Data
from torch_geometric.loader import NodeLoader
from tiergnn import CSCGraphStore, Dataset, NeighborSampler

graph = CSCGraphStore(Dataset.open(sys.argv[1]))
indptr, indices = graph.csc()
hub = int(torch.argmax(indptr[1:] - indptr[:-1]))
target = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr[1:] - indptr[:-1])
data = Data(edge_index=torch.stack([indices.long(), target]), num_nodes=len(indptr) - 1)

def run():
    torch.manual_seed(0)
    loader = NodeLoader(data, node_sampler=NeighborSampler(graph, [3, 3], seed=5),
                        input_nodes=torch.tensor([hub] * 4), batch_size=1, num_workers=2)
    return [sorted(batch.n_id.tolist()) for batch in loader]

print(json.dumps({"first": run(), "again": run(),
                  "hub_degree": int(indptr[hub + 1] - indptr[hub])}))
"""


def test_dataloader_workers_draw_their_own_neighbours_reproducibly(small_graph):
    """Each DataLoader worker gets a copy of the sampler, generator state and all: the same seed
    node sampled in two workers must still get independent neighbours (and, after
    torch.manual_seed, the same ones run to run). Run in a fresh interpreter: forking this
    test process, large by now in a full run, can fail for memory."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WORKERS_SCRIPT, str(small_graph.root)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    first, again = result["first"], result["again"]
    assert first == again                              # reproducible under torch.manual_seed
    assert first[0] != first[1]                        # workers 0 and 1: their own draws
    assert result["hub_degree"] > 3                    # (the hub has more neighbours than 3)
