"""The training step loop of one worker, as tierserve's three-call seam.

```
plan   = trainer.schedule()              # the next sampled batch (the look-ahead window is set)
result = trainer.execute(plan)           # features through the cache, forward, backward, step
trainer.update(plan, result)             # victim-ring prefetch for the next batch, counters
```

With several workers the model is wrapped in DistributedDataParallel and every worker runs the
same number of batches (its equal share of the seeds), which the shared cache's lockstep
exchanges need.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch_geometric.nn import GAT, GraphSAGE

from tiergnn.baselines import SYSTEMS, build_cache, hashed_seeds, metis_owner, partitioned_seeds
from tiergnn.data import Dataset
from tiergnn.pyg import CSCGraphStore, LookaheadLoader, TieredFeatureStore, static_scores
from tiergnn.sampler import NeighborSampler
from tiergnn.shared import hash_owner


@dataclass(slots=True)
class TrainConfig:
    """One training run; `cache_frac` and `victim_frac` are per worker, of all feature rows."""

    dataset: str
    system: str = "lsm-gnn"
    model: str = "sage"
    hidden: int = 128
    fanouts: tuple[int, ...] = (10, 5)
    batch_size: int = 1024
    cache_frac: float = 0.1
    victim_frac: float = 0.05
    window: int = 8
    epochs: int = 1
    max_batches: int | None = None       # per worker per epoch (benchmarks)
    warmup_batches: int = 0              # benchmarks: batches run, then counters reset
    lr: float = 0.003
    seed: int = 0
    static: str = "degree"
    direct: bool | None = None
    evaluate: bool = True
    device: str = "cpu"                  # "cuda": the slab in GPU memory, the model on the GPU

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; choose one of {sorted(SYSTEMS)}")
        if self.model not in ("sage", "gat"):
            raise ValueError(f"model {self.model!r}: choose sage or gat")
        if not 0 <= self.cache_frac <= 1 or not 0 <= self.victim_frac <= 1:
            raise ValueError("cache_frac and victim_frac are fractions of the feature rows")
        self.fanouts = tuple(self.fanouts)


@dataclass(slots=True)
class BatchPlan:
    step: int
    sampled: object                       # torch_geometric.sampler.SamplerOutput
    next_nodes: torch.Tensor | None


@dataclass(slots=True)
class BatchResult:
    loss: float
    seeds: int
    fetch_s: float
    compute_s: float


@dataclass(slots=True)
class EpochReport:
    epoch_s: float
    batches: int
    seeds: int
    mean_loss: float
    times: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    exchange: dict = field(default_factory=dict)
    device_read_bytes: int = 0             # what the kernel read from storage (/proc/self/io)


def _proc_read_bytes() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Trainer:
    """One worker: its share of the seeds, its cache (or its part of the shared one), its model."""

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        self.config, self.rank, self.world = config, rank, world
        self.system = SYSTEMS[config.system]
        dataset = self.dataset = Dataset.open(config.dataset)
        n = dataset.meta.num_nodes
        torch.manual_seed(config.seed)
        self.graph = CSCGraphStore(dataset)
        owner = (metis_owner(dataset, world) if self.system.partitioned
                 else hash_owner(n, world))
        static = static_scores(dataset, config.static) if self.system.policy in (
            "static", "hybrid") else None
        cache = build_cache(self.system, dataset, int(config.cache_frac * n),
                            int(config.victim_frac * n), owner=owner, rank=rank, world=world,
                            static=static, device=config.device,
                            direct=config.direct)
        self.features = TieredFeatureStore(dataset, cache=cache)
        self.sampler = NeighborSampler(self.graph, list(config.fanouts), seed=config.seed + rank)
        split = partitioned_seeds if self.system.partitioned else None
        self.seeds = {
            name: (split(dataset.split(name), owner, rank, world) if split
                   else hashed_seeds(dataset.split(name), rank, world, config.seed))
            for name in ("train", "test")}
        model_cls = GraphSAGE if config.model == "sage" else GAT
        self.model = model_cls(dataset.meta.feat_dim, config.hidden, len(config.fanouts),
                               dataset.meta.num_classes)
        self.model = self.model.to(config.device)
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader = self._loader("train", shuffle=True)
        self._plans = None
        self._step = 0

    def _loader(self, split: str, shuffle: bool) -> LookaheadLoader:
        window = self.config.window if self.system.lookahead else 0
        return LookaheadLoader((self.features, self.graph), self.sampler, window=window,
                               input_nodes=torch.from_numpy(self.seeds[split]),
                               batch_size=self.config.batch_size, shuffle=shuffle,
                               prefetch=self.system.victim_ring)

    # The seam ---------------------------------------------------------------------------------
    def schedule(self) -> BatchPlan | None:
        if self._plans is None:
            self._plans = self.loader.plans()
            self._step = 0
        limit = self.config.max_batches
        item = None if limit is not None and self._step >= limit else next(self._plans, None)
        if item is None:
            self._plans.close()
            self._plans = None
            return None
        self._step += 1
        return BatchPlan(self._step - 1, *item)

    def execute(self, plan: BatchPlan) -> BatchResult:
        started = time.perf_counter()
        batch = self.loader.materialize(plan.sampled).to(self.config.device)
        fetched = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad()
        out = self.model(batch.x, batch.edge_index)[:batch.batch_size]
        loss = torch.nn.functional.cross_entropy(out, batch.y[:batch.batch_size])
        loss.backward()
        self.optimizer.step()
        return BatchResult(loss.item(), batch.batch_size, fetched - started,
                           time.perf_counter() - fetched)

    def update(self, plan: BatchPlan, result: BatchResult) -> None:
        self.loader.after(plan.next_nodes)

    # Loops ------------------------------------------------------------------------------------
    def run_epoch(self, progress=None) -> EpochReport:
        cache = self.features.cache
        cache.reset_stats()
        read_before = _proc_read_bytes()
        started = time.perf_counter()
        losses, seeds, compute = [], 0, 0.0
        while (plan := self.schedule()) is not None:
            result = self.execute(plan)
            self.update(plan, result)
            losses.append(result.loss)
            seeds += result.seeds
            compute += result.compute_s
            if progress is not None:
                progress.update(1)
        times = asdict(self.loader.times) | {"compute": compute}
        return EpochReport(
            epoch_s=time.perf_counter() - started, batches=len(losses), seeds=seeds,
            mean_loss=float(np.mean(losses)) if losses else float("nan"), times=times,
            cache=cache.stats.as_dict(),
            exchange=asdict(cache.exchange) if hasattr(cache, "exchange") else {},
            device_read_bytes=_proc_read_bytes() - read_before)

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> float:
        """Accuracy over every worker's share of `split` (all-reduced)."""
        self.model.eval()
        correct = total = 0
        for batch in self._loader(split, shuffle=False):
            batch = batch.to(self.config.device)
            pred = self.model(batch.x, batch.edge_index)[:batch.batch_size].argmax(-1)
            correct += int((pred == batch.y[:batch.batch_size]).sum())
            total += batch.batch_size
        counts = torch.tensor([correct, total], dtype=torch.long)
        if self.world > 1:
            dist.all_reduce(counts)
        return float(counts[0]) / max(1, int(counts[1]))
