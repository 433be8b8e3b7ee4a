"""tiergnn: storage-based GNN training (LSM-GNN) with a tiered, system-wide shared feature cache.

It owns the on-disk graph format and its generator (`data`), feature storage read with
row-sized `pread` (`storage`), a pure-torch neighbour sampler (`sampler`), the per-worker cache
hierarchy and its eviction policies (`cache`), the cross-worker shared cache (`shared`), PyG's
remote-backend stores and a look-ahead loader (`pyg`), the training step loop (`train`), the
baselines and the benchmark (`bench`). It shares tierserve's conventions, not its code: nothing here
imports `tierserve`.

A PyG user adopts it with a few lines::

    from tiergnn import Dataset, TieredFeatureStore, CSCGraphStore, NeighborSampler, LookaheadLoader
    ds = Dataset.open("graphs/rmat-2m")
    features = TieredFeatureStore(ds, cache_rows=200_000, policy="hybrid")
    graph = CSCGraphStore(ds)
    loader = LookaheadLoader((features, graph), NeighborSampler(graph, [10, 5]),
                             input_nodes=ds.split("train"), batch_size=1024, window=8)
    for batch in loader:          # a torch_geometric.data.Data, as from NeighborLoader
        out = model(batch.x, batch.edge_index)
"""

# Exports load lazily: `tiergnn gen` should not pay for importing torch_geometric.
_EXPORTS = {"Dataset": "tiergnn.data", "generate": "tiergnn.data", "CSCGraphStore": "tiergnn.pyg",
            "LookaheadLoader": "tiergnn.pyg", "TieredFeatureStore": "tiergnn.pyg",
            "NeighborSampler": "tiergnn.sampler"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tiergnn' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["CSCGraphStore", "Dataset", "LookaheadLoader", "NeighborSampler", "TieredFeatureStore",
           "generate"]
