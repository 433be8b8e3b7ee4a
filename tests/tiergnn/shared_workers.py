"""Worker functions for the two-process tests (spawned processes import them by name)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tiergnn.cache import TieredCache
from tiergnn.data import Dataset
from tiergnn.policies import make_policy
from tiergnn.shared import SharedCache, WorkerLost, hash_owner
from tiergnn.storage import FeatureStorage


def _shared_cache(root: str, rank: int, world: int, policy: str = "hybrid") -> SharedCache:
    dataset = Dataset.open(root)
    n = dataset.meta.num_nodes
    local = TieredCache(FeatureStorage(dataset), 100, 50,
                        make_policy(policy, n, torch.from_numpy(dataset.degrees()).float()))
    return SharedCache(local, hash_owner(n, world))


def gather_and_check(rank: int, world: int, root: str, out_dir: str) -> None:
    cache = _shared_cache(root, rank, world)
    full = torch.from_numpy(Dataset.open(root).load_features())
    gen = torch.Generator().manual_seed(rank)            # each worker its own batches
    batches = [torch.unique(torch.randint(0, 800, (150,), generator=gen)) for _ in range(12)]
    mismatches = 0
    for step, nodes in enumerate(batches):
        cache.set_future(batches[step + 1:step + 4])
        mismatches += int((cache.gather(nodes) != full[nodes]).any(dim=1).sum())
        cache.prefetch(None)
    resident = cache.local.node_of_slot[cache.local.node_of_slot >= 0]
    in_ring = cache.local.ring_node[cache.local.ring_node >= 0]
    result = {
        "mismatches": mismatches,
        "foreign_lines": int((cache.owner_of[torch.cat([resident, in_ring])] != rank).sum()),
        "resident": len(resident),
        "slab_hits": cache.stats.slab_hits,
        "rows_fetched_remote": cache.exchange.rows_fetched_remote,
        "bytes_sent": cache.exchange.bytes_sent,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def one_worker_dies(rank: int, world: int, root: str, out_dir: str) -> None:
    cache = _shared_cache(root, rank, world, policy="lru")
    full = torch.from_numpy(Dataset.open(root).load_features())
    for step in range(6):
        if rank == 1 and step == 3:
            os._exit(0)                                  # dies without a word to its peer
        nodes = torch.arange(step * 50, step * 50 + 100)
        try:
            rows = cache.gather(nodes)
        except WorkerLost as error:
            Path(out_dir, "error.txt").write_text(str(error))
            return
        assert torch.equal(rows, full[nodes])
    Path(out_dir, "error.txt").write_text("no error")
