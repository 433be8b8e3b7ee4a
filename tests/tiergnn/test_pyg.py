"""PyG adoption: GraphSAGE and GAT train unchanged through the stores and the look-ahead loader,
and the tiered store trains exactly as in-memory PyG data does."""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.loader import NodeLoader
from torch_geometric.nn import GAT, GraphSAGE

from tiergnn import CSCGraphStore, LookaheadLoader, NeighborSampler, TieredFeatureStore


def _train_and_test(loader_for, model, epochs=3):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(epochs):
        for batch in loader_for("train", shuffle=True):
            opt.zero_grad()
            out = model(batch.x, batch.edge_index)[:batch.batch_size]
            loss = torch.nn.functional.cross_entropy(out, batch.y[:batch.batch_size])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    correct = total = 0
    with torch.no_grad():
        for batch in loader_for("test", shuffle=False):
            pred = model(batch.x, batch.edge_index)[:batch.batch_size].argmax(-1)
            correct += int((pred == batch.y[:batch.batch_size]).sum())
            total += batch.batch_size
    return losses, correct / total


def test_tiered_store_trains_exactly_like_in_memory_data(small_graph):
    graph = CSCGraphStore(small_graph)
    features = TieredFeatureStore(small_graph, cache_rows=300, victim_rows=150, policy="hybrid")
    indptr, indices = graph.csc()
    target = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr[1:] - indptr[:-1])
    memory = Data(x=torch.from_numpy(small_graph.load_features()).float(),
                  y=torch.from_numpy(np.array(small_graph.labels, dtype=np.int64)),
                  edge_index=torch.stack([indices, target]))

    def tiered(split, shuffle):
        return LookaheadLoader((features, graph), sampler, window=4, batch_size=128,
                               input_nodes=torch.from_numpy(small_graph.split(split)),
                               shuffle=shuffle)

    def in_memory(split, shuffle):
        return NodeLoader(memory, node_sampler=sampler, batch_size=128, shuffle=shuffle,
                          input_nodes=torch.from_numpy(small_graph.split(split)))

    results = []
    for loader_for in (tiered, in_memory):
        torch.manual_seed(0)
        sampler = NeighborSampler(graph, [8, 4], seed=0)
        model = GraphSAGE(32, 32, 2, small_graph.meta.num_classes)
        results.append(_train_and_test(loader_for, model))
    (tiered_losses, tiered_acc), (memory_losses, memory_acc) = results
    assert tiered_losses == memory_losses             # same batches, same rows, same steps
    assert tiered_acc == memory_acc
    assert memory_acc > 0.6                           # it learned (4 classes: 0.25 by chance)
    stats = features.cache.stats
    assert stats.slab_hits > 0 and stats.storage_rows > 0


def test_gat_trains_through_the_loader(small_graph):
    graph = CSCGraphStore(small_graph)
    features = TieredFeatureStore(small_graph, cache_rows=200, policy="lru")
    torch.manual_seed(0)
    sampler = NeighborSampler(graph, [5, 5], seed=0)
    model = GAT(32, 16, 2, small_graph.meta.num_classes, heads=2)
    losses, accuracy = _train_and_test(
        lambda split, shuffle: LookaheadLoader(
            (features, graph), sampler, batch_size=256, shuffle=shuffle,
            input_nodes=torch.from_numpy(small_graph.split(split))), model, epochs=2)
    assert losses[-1] < losses[0] and accuracy > 0.5


def test_sampler_errors_reach_the_consumer(small_graph):
    graph = CSCGraphStore(small_graph)
    features = TieredFeatureStore(small_graph, cache_rows=10)
    sampler = NeighborSampler(graph, [2])
    loader = LookaheadLoader((features, graph), sampler, batch_size=4,
                             input_nodes=torch.tensor([1, 2, 3, 3]))
    try:
        next(iter(loader))
    except ValueError as error:
        assert "distinct" in str(error)
    else:
        raise AssertionError("a batch with a repeated seed was sampled")


def test_pagerank_static_score_matches_networkx(small_graph):
    import networkx as nx

    from tiergnn.pyg import static_scores

    n = small_graph.meta.num_nodes
    dst = np.repeat(np.arange(n), small_graph.degrees())
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(zip(np.asarray(small_graph.indices).tolist(), dst.tolist()))
    expected = nx.pagerank(graph, alpha=0.85, tol=1e-10)
    ours = static_scores(small_graph, "pagerank")
    reference = torch.tensor([expected[v] for v in range(n)], dtype=torch.float32)
    assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-7)


def test_link_prediction_loader_maps_edges_and_negatives_and_trains(small_graph):
    """LinkLoader over the tiered stores (PyG's link-prediction path): each batch's edge labels
    point at the right global nodes, binary negatives are labelled 0, triplet indices match,
    and a GraphSAGE link predictor's loss falls."""
    from torch_geometric.loader import LinkLoader

    graph = CSCGraphStore(small_graph)
    features = TieredFeatureStore(small_graph, cache_rows=300, policy="lru")
    indptr, indices = graph.csc()
    target = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr[1:] - indptr[:-1])
    edges = torch.stack([indices.long(), target])[:, torch.randperm(len(target))[:2048]]
    sampler = NeighborSampler(graph, [8, 4], seed=0)
    binary = LinkLoader((features, graph), link_sampler=sampler, edge_label_index=(None, edges),
                        batch_size=128, neg_sampling="binary")
    batch = next(iter(binary))
    positives = batch.edge_label == 1
    assert positives.sum() == 128 and (batch.edge_label[~positives] == 0).all()
    assert torch.equal(batch.n_id[batch.edge_label_index[:, positives]], edges[:, batch.input_id])
    assert torch.equal(batch.x, torch.from_numpy(small_graph.load_features()).float()[batch.n_id])
    triplet = next(iter(LinkLoader((features, graph), link_sampler=sampler,
                                   edge_label_index=(None, edges), batch_size=64,
                                   neg_sampling="triplet")))
    assert torch.equal(triplet.n_id[triplet.src_index], edges[0, triplet.input_id])
    assert torch.equal(triplet.n_id[triplet.dst_pos_index], edges[1, triplet.input_id])

    torch.manual_seed(0)
    model = GraphSAGE(32, 32, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        total = 0.0
        for batch in binary:
            optimizer.zero_grad()
            h = model(batch.x, batch.edge_index)
            src, dst = batch.edge_label_index
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                (h[src] * h[dst]).sum(-1), batch.edge_label)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(binary))
    assert losses[-1] < 0.9 * losses[0], losses
