"""The systems LSM-GNN is measured against, and the named system configurations of the benchmark.

- `memmap`: no cache; features read by indexing a `numpy.memmap` of the feature file (the page
  cache is dropped before the run; what the kernel reads is measured from /proc/self/io).
- `pread`: no cache; row-sized direct reads through `FeatureStorage`.
- `static`: each worker caches the highest-degree nodes, fixed (PaGraph-like).
- `lru`: each worker's own LRU cache, not shared (GIDS-like software cache).
- `distdgl`: METIS partitions (`pymetis`); each worker holds its partition's features in memory
  and trains on its partition's seeds; remote rows come over the same all_to_all transport.
- `lsm-gnn`: the shared cache (owner hash) + hybrid eviction + victim-ring prefetch.
- `shared-lru`: the shared cache with LRU, the ablation that isolates hybrid eviction.
- `memory`: every feature in every worker's memory, no storage: the reference that training
  through any cache must match exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from tiergnn.cache import CacheStats, FeatureCache, TieredCache
from tiergnn.data import Dataset
from tiergnn.policies import EvictionPolicy, make_policy, register
from tiergnn.storage import FeatureStorage


@dataclass(slots=True, frozen=True)
class System:
    """How one benchmarked system is put together."""

    name: str
    policy: str
    shared: bool              # one cache across workers (owner hash or partition map)
    victim_ring: bool
    lookahead: bool
    partitioned: bool = False
    memmap: bool = False
    in_memory: bool = False   # every row resident on every worker: the accuracy reference


SYSTEMS = {s.name: s for s in (
    System("memmap", "none", shared=False, victim_ring=False, lookahead=False, memmap=True),
    System("pread", "none", shared=False, victim_ring=False, lookahead=False),
    System("static", "static", shared=False, victim_ring=False, lookahead=False),
    System("lru", "lru", shared=False, victim_ring=False, lookahead=False),
    System("shared-lru", "lru", shared=True, victim_ring=False, lookahead=False),
    System("distdgl", "partition", shared=True, victim_ring=False, lookahead=False,
           partitioned=True),
    System("lsm-gnn", "hybrid", shared=True, victim_ring=True, lookahead=True),
    System("memory", "partition", shared=False, victim_ring=False, lookahead=False,
           in_memory=True),
)}


@register("partition")
class PartitionResident(EvictionPolicy):
    """A worker's whole partition, loaded once and never evicted (DistDGL's in-memory store)."""

    admits = False

    def __init__(self, num_nodes, static_score, static_weight, owned: torch.Tensor | None = None):
        super().__init__(num_nodes, None, static_weight)
        self.owned = owned

    def score(self, nodes, step, incoming):
        return torch.zeros(len(nodes))

    def preload(self, capacity):
        return self.owned


def metis_owner(dataset: Dataset, parts: int) -> torch.Tensor:
    """Node -> partition by METIS (edge-cut, balanced node counts), cached beside the dataset."""
    cache = dataset.root / f"metis-{parts}.npy"
    if cache.exists():
        return torch.from_numpy(np.load(cache)).to(torch.int32)
    if parts == 1:
        owner = np.zeros(dataset.meta.num_nodes, dtype=np.int32)
    else:
        import pymetis

        _, membership = pymetis.part_graph(parts, xadj=np.asarray(dataset.indptr),
                                           adjncy=np.asarray(dataset.indices))
        owner = np.asarray(membership, dtype=np.int32)
    partial = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, owner)
    os.replace(partial, cache)            # atomic: concurrent workers never see half a file
    return torch.from_numpy(owner)


def partitioned_seeds(seeds: np.ndarray, owner: torch.Tensor, rank: int, world: int) -> np.ndarray:
    """DistDGL's seed split: seeds sorted by partition, cut into equal shares (so every worker
    runs the same number of batches); with balanced partitions a share is nearly its own part."""
    order = np.argsort(owner.numpy()[seeds], kind="stable")
    share = len(seeds) // world
    return np.sort(seeds[order][rank * share:(rank + 1) * share])


def hashed_seeds(seeds: np.ndarray, rank: int, world: int, seed: int = 0) -> np.ndarray:
    """Random equal shares of the seeds (DistributedSampler's split)."""
    order = np.random.default_rng(seed).permutation(len(seeds))
    share = len(seeds) // world
    return np.sort(seeds[order[rank * share:(rank + 1) * share]])


class MemmapCache(FeatureCache):
    """No cache: rows by fancy-indexing a numpy.memmap; the kernel pages them in."""

    def __init__(self, dataset: Dataset):
        meta = dataset.meta
        self.array = np.memmap(dataset.feature_path, dtype=meta.np_dtype, mode="r",
                               shape=(meta.num_nodes, meta.feat_dim))
        self.row_bytes = meta.row_bytes
        self.stats = CacheStats()
        fd = os.open(dataset.feature_path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def gather(self, nodes: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(nodes)                       # ascending offsets in the file
        out = torch.empty(len(nodes), self.array.shape[1],
                          dtype=torch.from_numpy(self.array[:0]).dtype)
        out[order] = torch.from_numpy(self.array[nodes[order].numpy()])
        self.stats.requested += len(nodes)
        self.stats.storage_rows += len(nodes)
        self.stats.storage_bytes += len(nodes) * self.row_bytes
        return out


def build_cache(system: System, dataset: Dataset, cache_rows: int, victim_rows: int,
                owner: torch.Tensor | None = None, rank: int = 0, world: int = 1,
                static: torch.Tensor | None = None, direct: bool | None = None,
                device: str = "cpu"):
    """One worker's cache for `system` (a SharedCache when the system shares across workers;
    with one worker, sharing is moot and the local cache serves alone)."""
    if system.memmap:
        return MemmapCache(dataset)
    n = dataset.meta.num_nodes
    storage = FeatureStorage(dataset, direct=direct)
    if system.partitioned or system.in_memory:
        owned = (torch.arange(n) if system.in_memory
                 else torch.nonzero(owner == rank).flatten())
        policy = PartitionResident(n, None, 0.0, owned=owned)
        cache_rows = len(owned)
    else:
        policy = make_policy(system.policy, n, static)
    local = TieredCache(storage, cache_rows, victim_rows if system.victim_ring else 0, policy,
                        device)
    if not system.shared or world == 1:
        return local
    from tiergnn.shared import SharedCache
    return SharedCache(local, owner)
