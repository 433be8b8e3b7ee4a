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


def train_and_report(rank: int, world: int, root: str, system: str, out_dir: str) -> None:
    """One epoch of GraphSAGE with DDP through `system`; losses and test accuracy to JSON."""
    from tiergnn.train import TrainConfig, Trainer

    config = TrainConfig(dataset=root, system=system, hidden=32, fanouts=(6, 3), batch_size=128,
                         cache_frac=0.05, victim_frac=0.03, window=4, lr=0.01)
    trainer = Trainer(config, rank, world)
    losses = []
    while (plan := trainer.schedule()) is not None:
        result = trainer.execute(plan)
        trainer.update(plan, result)
        losses.append(result.loss)
    accuracy = trainer.evaluate("test")
    stats = trainer.features.cache.stats
    Path(out_dir, f"{system}-rank{rank}.json").write_text(json.dumps(
        {"losses": losses, "accuracy": accuracy, "storage_rows": stats.storage_rows}))


def lookahead_reaches_owners(rank: int, world: int, root: str, out_dir: str) -> None:
    """After every gather, each owner's policy marks exactly its lines that any worker's next
    batch needs, also after a pass is cut short and a new one starts."""
    import torch.distributed as dist

    cache = _shared_cache(root, rank, world)
    failures = []
    for restart in range(2):
        if restart:
            cache.restart_lookahead()                 # the loader starts a new pass
        gen = torch.Generator().manual_seed(10 * restart + rank)
        batches = [torch.unique(torch.randint(0, 600, (80,), generator=gen)) for _ in range(8)]
        for step, nodes in enumerate(batches[:5]):    # the pass is cut after 5 of 8 batches
            cache.set_future(batches[step + 1:step + 4])
            cache.gather(nodes)
            everyone = [None] * world
            dist.all_gather_object(everyone, batches[step + 1])
            wanted = torch.unique(torch.cat(everyone))
            owned = torch.nonzero(cache.owner_of == rank).flatten()
            expect = torch.zeros(len(cache.owner_of), dtype=torch.bool)
            expect[wanted] = True
            marked = cache.local.policy.next_use == 1
            if not torch.equal(marked[owned], expect[owned]):
                failures.append((restart, step))
    Path(out_dir, f"lookahead{rank}.json").write_text(json.dumps({"failures": failures}))


def all_checks(rank: int, world: int, root: str, out_dir: str) -> None:
    """Every healthy two-worker check in one process group (one spawn: ~4 s instead of four)."""
    gather_and_check(rank, world, root, out_dir)
    lookahead_reaches_owners(rank, world, root, out_dir)
    for system in ("lsm-gnn", "memory"):
        train_and_report(rank, world, root, system, out_dir)
