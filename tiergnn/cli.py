"""tiergnn's command line: gen | import-ogb | train | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("tiergnn")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="a dataset directory (from `tiergnn gen` or `import-ogb`)")
    p.add_argument("--model", choices=["sage", "gat"], default="sage")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--fanouts", type=_ints, default=[10, 5],
                   help="neighbours sampled per hop, comma-separated (default 10,5)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--window", type=int, default=8,
                   help="look-ahead: batches sampled ahead for the hybrid policy (default 8)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (gloo on CPU, NCCL on GPU)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop each epoch after this many batches per worker")
    p.add_argument("--direct", choices=["auto", "on", "off"], default="auto",
                   help="O_DIRECT feature reads (auto: where rows are 512-byte multiples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cuda: slabs in GPU memory and the model on the GPU (unmeasured so far)")


def _config(args, **extra):
    from tiergnn.train import TrainConfig
    direct = {"auto": None, "on": True, "off": False}[args.direct]
    return TrainConfig(dataset=args.dataset, system=getattr(args, "system", "lsm-gnn"),
                       model=args.model, hidden=args.hidden, fanouts=tuple(args.fanouts),
                       batch_size=args.batch_size, window=args.window,
                       max_batches=args.max_batches, seed=args.seed, direct=direct,
                       device=args.device, **extra)


def train_worker(rank: int, world: int, config: dict, out: str | None) -> None:
    from tqdm import tqdm

    from tiergnn.train import TrainConfig, Trainer
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = TrainConfig(**config)
    trainer = Trainer(config, rank, world)
    reports = []
    for epoch in range(config.epochs):
        total = len(trainer.loader) if config.max_batches is None else min(
            len(trainer.loader), config.max_batches)
        with tqdm(total=total, desc=f"epoch {epoch}", disable=rank != 0) as bar:
            report = trainer.run_epoch(bar)
        reports.append(asdict(report))
        if rank == 0:
            hits = report.cache["hit_ratio"]
            log.info("epoch %d: %.1f s, loss %.3f, slab hit %.2f, ring %.2f, storage %.1f MiB",
                     epoch, report.epoch_s, report.mean_loss, hits["slab"], hits["ring"],
                     report.cache["storage_bytes"] / 2**20)
    accuracy = trainer.evaluate("test") if config.evaluate else None
    if rank == 0:
        if accuracy is not None:
            log.info("test accuracy %.4f", accuracy)
        if out:
            Path(out).write_text(json.dumps({"config": asdict(config), "epochs": reports,
                                             "test_accuracy": accuracy}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from tiergnn.baselines import SYSTEMS
    parser = argparse.ArgumentParser(
        prog="tiergnn", description="Storage-based GNN training (LSM-GNN) on PyG: graphs on disk, "
        "a tiered feature cache shared across workers, and the baselines to compare it with.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("gen", help="write a seeded power-law graph with learnable labels")
    gen.add_argument("out", help="dataset directory to write")
    gen.add_argument("--nodes", type=int, default=2_000_000)
    gen.add_argument("--avg-degree", type=float, default=20.0,
                     help="mean undirected degree; stored edges are about nodes x this")
    gen.add_argument("--feat-dim", type=int, default=256)
    gen.add_argument("--feat-dtype", choices=["float16", "float32"], default="float16")
    gen.add_argument("--classes", type=int, default=16)
    gen.add_argument("--homophily", type=float, default=0.8)
    gen.add_argument("--train-frac", type=float, default=0.1)
    gen.add_argument("--seed", type=int, default=0)

    ogb = sub.add_parser("import-ogb", help="convert an OGB node-property dataset directory "
                         "(e.g. ogbn_papers100M/ as OGB downloads it) into tiergnn's format")
    ogb.add_argument("source", help="the OGB dataset directory (holding raw/ and split/)")
    ogb.add_argument("out")
    ogb.add_argument("--feat-dtype", choices=["float16", "float32"], default="float32")
    ogb.add_argument("--directed", action="store_true",
                     help="keep edges one-way (default: add reverse edges, as PyG users do)")

    train = sub.add_parser("train", help="train a GNN through the tiered cache")
    _add_train_args(train)
    train.add_argument("--system", choices=sorted(SYSTEMS), default="lsm-gnn",
                       help="cache design (see tiergnn.baselines; default lsm-gnn; memory: "
                       "every feature in memory, the accuracy reference)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--cache-frac", type=float, default=0.1,
                       help="slab per worker as a fraction of the feature rows (default 0.1)")
    train.add_argument("--victim-frac", type=float, default=0.05)
    train.add_argument("--out", help="write the per-epoch report as JSON here")

    bench = sub.add_parser("bench", help="every system at every cache size; JSON and a plot")
    _add_train_args(bench)
    bench.add_argument("--systems", default="memmap,pread,static,lru,shared-lru,distdgl,lsm-gnn",
                       help="comma-separated, from: " + ", ".join(sorted(SYSTEMS)))
    bench.add_argument("--cache-fracs", type=_floats, default=[0.05, 0.1, 0.2],
                       help="slab per worker, fractions of the feature rows (default 5,10,20%%)")
    bench.add_argument("--warmup-batches", type=int, default=20,
                       help="batches per worker run before measuring (default 20)")
    bench.add_argument("--victim-ratio", type=float, default=0.5,
                       help="victim ring rows per slab row, for systems with a ring (default 0.5)")
    bench.add_argument("--out", default="docs/results/tiergnn-bench.json")

    args = parser.parse_args(argv)
    if args.command == "bench":
        unknown = set(args.systems.split(",")) - set(SYSTEMS)
        if unknown:
            parser.error(f"unknown systems {sorted(unknown)}; choose from {sorted(SYSTEMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "gen":
        from tiergnn.data import generate
        ds = generate(args.out, num_nodes=args.nodes, avg_degree=args.avg_degree,
                      feat_dim=args.feat_dim, feat_dtype=args.feat_dtype,
                      num_classes=args.classes, homophily=args.homophily,
                      train_frac=args.train_frac, seed=args.seed)
        log.info("wrote %s: %s", args.out, ds.meta)
    elif args.command == "import-ogb":
        from tiergnn.ogb import import_ogb
        ds = import_ogb(args.source, args.out, feat_dtype=args.feat_dtype,
                        undirected=not args.directed)
        log.info("wrote %s: %s", args.out, ds.meta)
    elif args.command == "train":
        config = _config(args, epochs=args.epochs, cache_frac=args.cache_frac,
                         victim_frac=args.victim_frac)
        if args.workers > 1:
            from tiergnn.launch import run_workers
            run_workers(train_worker, args.workers, asdict(config), args.out)
        else:
            train_worker(0, 1, asdict(config), args.out)
    elif args.command == "bench":
        from tiergnn.bench import run_bench
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        run_bench(_config(args, warmup_batches=args.warmup_batches), args.systems.split(","), args.cache_fracs, args.workers, out,
                  victim_ratio=args.victim_ratio, log=log.info)
        log.info("wrote %s and %s", out, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
