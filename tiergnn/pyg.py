"""PyG's remote-backend interfaces over tiergnn: a FeatureStore, a GraphStore, a look-ahead loader.

`TieredFeatureStore` serves `x` through a feature cache (one worker's `TieredCache`, or the
cross-worker `SharedCache`) and `y` from memory. `CSCGraphStore` holds the topology as CSC.
`LookaheadLoader` is PyG's `NodeLoader` with LSM-GNN's look-ahead: a thread samples batches ahead,
the cache is told the node sets of the next `window` batches before each gather (the hybrid
policy's reuse distances), and after each gather the next batch's lines are prefetched from the
victim ring. Iterating it yields `torch_geometric.data.Data` exactly as `NeighborLoader` does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import EdgeAttr, FeatureStore, GraphStore, TensorAttr
from torch_geometric.loader import NodeLoader
from torch_geometric.sampler import SamplerOutput

from tiergnn.cache import TieredCache
from tiergnn.data import Dataset
from tiergnn.policies import make_policy
from tiergnn.storage import FeatureStorage


def static_scores(dataset: Dataset, kind: str = "degree", iterations: int = 50) -> torch.Tensor:
    """Static node importance, computed once: in-degree, or PageRank (damping 0.85, power
    iteration; dangling nodes' rank spread uniformly, as networkx does)."""
    indptr = torch.from_numpy(np.array(dataset.indptr, dtype=np.int64))
    degree = (indptr[1:] - indptr[:-1]).double()
    if kind == "degree":
        return degree.float()
    if kind != "pagerank":
        raise ValueError(f"static score {kind!r}: choose degree or pagerank")
    n = len(degree)
    indices = torch.from_numpy(np.array(dataset.indices, dtype=np.int64))
    dst = torch.repeat_interleave(torch.arange(n), degree.long())
    out_degree = torch.bincount(indices, minlength=n).double()
    dangling = out_degree == 0
    rank = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(iterations):
        contrib = (rank / out_degree.clamp(min=1))[indices]
        spread = rank[dangling].sum() / n
        rank = (0.15 / n + 0.85 * (torch.zeros_like(rank).index_add_(0, dst, contrib) + spread))
    return rank.float()


class TieredFeatureStore(FeatureStore):
    """Read-only PyG FeatureStore: `x` through the feature cache, `y` (labels) from memory."""

    def __init__(self, dataset: Dataset, cache_rows: int = 0, victim_rows: int = 0,
                 policy: str = "hybrid", static: str = "degree", device: str = "cpu",
                 cache=None, out_dtype: torch.dtype = torch.float32, io_threads: int = 32):
        super().__init__()
        self.dataset = dataset
        self.out_dtype = out_dtype
        if cache is None:
            score = static_scores(dataset, static) if policy in ("static", "hybrid") else None
            storage = FeatureStorage(dataset, io_threads=io_threads)
            cache = TieredCache(storage, cache_rows, victim_rows,
                                make_policy(policy, dataset.meta.num_nodes, score), device)
        self.cache = cache
        self.labels = torch.from_numpy(np.array(dataset.labels, dtype=np.int64))

    def set_future(self, window: list[torch.Tensor]) -> None:
        self.cache.set_future(window)

    def restart_lookahead(self) -> None:
        """A loader pass begins; a shared cache forgets the look-ahead it announced before."""
        self.cache.restart_lookahead()

    def prefetch(self, nodes: torch.Tensor) -> int:
        return self.cache.prefetch(nodes)

    def _get_tensor(self, attr: TensorAttr):
        index = attr.index
        if attr.attr_name == "x":
            nodes = torch.arange(self.dataset.meta.num_nodes) if index is None else index
            return self.cache.gather(torch.as_tensor(nodes)).to(self.out_dtype)
        if attr.attr_name == "y":
            return self.labels if index is None else self.labels[index]
        raise KeyError(f"this store holds 'x' and 'y', not {attr.attr_name!r}")

    def _put_tensor(self, tensor, attr) -> bool:
        raise NotImplementedError("the store is read-only: write features with `tiergnn gen` "
                                  "or `tiergnn import-ogb`")

    def _remove_tensor(self, attr) -> bool:
        return False

    def _get_tensor_size(self, attr):
        meta = self.dataset.meta
        return (meta.num_nodes, meta.feat_dim) if attr.attr_name == "x" else (meta.num_nodes,)

    def get_all_tensor_attrs(self) -> list[TensorAttr]:
        return [TensorAttr(group_name=None, attr_name="x"),
                TensorAttr(group_name=None, attr_name="y")]


class CSCGraphStore(GraphStore):
    """The dataset's topology as one homogeneous CSC edge type (in-edges grouped by target)."""

    def __init__(self, dataset: Dataset):
        super().__init__()
        self.num_nodes = dataset.meta.num_nodes
        self.indptr = torch.from_numpy(np.array(dataset.indptr, dtype=np.int64))
        self.indices = torch.from_numpy(np.array(dataset.indices, dtype=np.int64))
        self._attr = EdgeAttr(edge_type=None, layout="csc", is_sorted=True,
                              size=(self.num_nodes, self.num_nodes))

    def csc(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indptr, self.indices

    def _put_edge_index(self, edge_index, edge_attr) -> bool:
        raise NotImplementedError("the graph store is read-only")

    def _get_edge_index(self, edge_attr):
        if edge_attr.layout.value != "csc":
            return None
        return self.indices, self.indptr          # PyG's CSC tuple is (row, colptr)

    def _remove_edge_index(self, edge_attr) -> bool:
        return False

    def get_all_edge_attrs(self) -> list[EdgeAttr]:
        return [self._attr]


@dataclass(slots=True)
class LoaderTimes:
    """Seconds spent, summed over an epoch."""

    sample: float = 0.0      # on the sampler thread (overlaps the rest)
    wait: float = 0.0        # the main thread waiting for a sampled batch
    fetch: float = 0.0       # features through the cache (gather)
    prefetch: float = 0.0    # ring -> slab moves for the next batch
    batches: int = 0


class LookaheadLoader(NodeLoader):
    """`NodeLoader` with a sampler thread running `window` batches ahead of the consumer."""

    def __init__(self, data, node_sampler, input_nodes=None, window: int = 8,
                 prefetch: bool = True, **kwargs):
        kwargs.setdefault("filter_per_worker", False)
        input_nodes = torch.as_tensor(input_nodes) if input_nodes is not None else None
        super().__init__(data, node_sampler=node_sampler, input_nodes=input_nodes, **kwargs)
        self.window = window
        self.prefetch_victims = prefetch
        self.times = LoaderTimes()

    @property
    def feature_store(self) -> TieredFeatureStore:
        return self.data[0]

    def plans(self):
        """Sampled batches in order, each yielded once the `window` after it is sampled."""
        self.times = LoaderTimes()
        self.feature_store.restart_lookahead()
        sampled: queue.Queue = queue.Queue(maxsize=self.window + 2)
        stop = threading.Event()

        def produce():
            try:
                # DataLoader's own iterator: the same shuffle (and RNG draws) as NodeLoader's, and
                # num_workers > 0 samples in worker processes as it does there.
                batches = torch.utils.data.DataLoader._get_iterator(self)
                while not stop.is_set():
                    started = time.perf_counter()
                    out = next(batches, None)
                    self.times.sample += time.perf_counter() - started
                    if out is None:
                        break
                    sampled.put(out)
            except BaseException as error:             # surfaces in the consumer
                sampled.put(error)
            sampled.put(None)

        thread = threading.Thread(target=produce, name="tiergnn-sampler", daemon=True)
        thread.start()
        ahead: deque[SamplerOutput] = deque()
        finished = False
        try:
            while True:
                started = time.perf_counter()
                while not finished and len(ahead) <= self.window:
                    item = sampled.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        finished = True
                    else:
                        ahead.append(item)
                self.times.wait += time.perf_counter() - started
                if not ahead:
                    return
                current = ahead.popleft()
                self.feature_store.set_future([out.node for out in ahead])
                yield current, (ahead[0].node if ahead else None)
        finally:
            stop.set()
            while thread.is_alive():            # unblock a producer waiting on a full queue
                try:
                    sampled.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def materialize(self, out: SamplerOutput):
        """Features and labels for one sampled batch: a PyG `Data`."""
        started = time.perf_counter()
        data = self.filter_fn(out)
        self.times.fetch += time.perf_counter() - started
        self.times.batches += 1
        return data

    def after(self, next_nodes: torch.Tensor | None) -> None:
        """Prefetch the next batch's victim-ring lines into the slab."""
        if next_nodes is None or not self.prefetch_victims:
            return
        started = time.perf_counter()
        self.feature_store.prefetch(next_nodes)
        self.times.prefetch += time.perf_counter() - started

    def __iter__(self):
        for out, next_nodes in self.plans():
            data = self.materialize(out)
            self.after(next_nodes)
            yield data
