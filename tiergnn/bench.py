"""`tiergnn bench`: every system at every cache size on the same graph; JSON and plots.

Each (system, cache size) runs in fresh worker processes (one worker: in this process, with
fresh caches): `--warmup-batches` per worker fill the caches, then the counters restart for
the measured `--max-batches`. Per run it records the epoch
time (the slowest worker's), hit ratios by tier, bytes read from storage (counted rows, and what
the kernel read per /proc/self/io), bytes moved between workers, and sampler/fetch/compute times.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from tiergnn.baselines import metis_owner
from tiergnn.data import Dataset
from tiergnn.launch import run_workers
from tiergnn.train import TrainConfig, Trainer


def bench_worker(rank: int, world: int, config: dict, out_dir: str) -> None:
    config = TrainConfig(**config)
    trainer = Trainer(config, rank, world)
    if config.warmup_batches:            # fill the caches first: the figures are steady state
        measured = config.max_batches    # (trainer.config is this same object)
        config.max_batches = config.warmup_batches
        trainer.run_epoch()
        config.max_batches = measured
    report = trainer.run_epoch()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(asdict(report)))


def _merge(reports: list[dict]) -> dict:
    """System-wide figures from the workers' reports."""
    def total(key, part):
        return sum(r[part][key] for r in reports)

    requested = total("requested", "cache")
    merged = {
        "epoch_s": max(r["epoch_s"] for r in reports),
        "batches_per_worker": reports[0]["batches"],
        "seeds": sum(r["seeds"] for r in reports),
        "mean_loss": sum(r["mean_loss"] for r in reports) / len(reports),
        "hit_ratio": {tier: total(key, "cache") / max(1, requested)
                      for tier, key in (("slab", "slab_hits"), ("ring", "ring_hits"),
                                        ("storage", "storage_rows"))},
        "storage_bytes": total("storage_bytes", "cache"),
        "device_read_bytes": sum(r["device_read_bytes"] for r in reports),
        "prefetched_rows": total("prefetched", "cache"),
        "exchange_bytes": sum(r["exchange"].get("bytes_sent", 0) for r in reports),
        "times_s": {key: max(r["times"][key] for r in reports)
                    for key in ("sample", "wait", "fetch", "prefetch", "compute")},
    }
    return merged


def run_bench(base: TrainConfig, systems: list[str], cache_fracs: list[float], workers: int,
              out: Path, victim_ratio: float = 0.5, log=print) -> dict:
    """Run the grid; writes `out` (JSON) and `out` with .png (plots) as it goes."""
    results = {"machine": _machine(),
               "config": asdict(base) | {"workers": workers, "victim_ratio": victim_ratio},
               "runs": []}
    if "distdgl" in systems and workers > 1:
        started = time.perf_counter()
        metis_owner(Dataset.open(base.dataset), workers)     # once, before the workers start
        log(f"METIS partitions ready ({time.perf_counter() - started:.0f} s; cached)")
    for frac in cache_fracs:
        for system in systems:
            config = replace(base, system=system, cache_frac=frac,
                             victim_frac=frac * victim_ratio, evaluate=False)
            run_dir = Path(tempfile.mkdtemp(prefix=f"tiergnn-{system}-{frac}-"))
            started = time.perf_counter()
            if workers == 1:                 # no process group needed: run it here
                bench_worker(0, 1, asdict(config), str(run_dir))
            else:
                run_workers(bench_worker, workers, asdict(config), str(run_dir), timeout_s=600)
            reports = [json.loads((run_dir / f"rank{r}.json").read_text())
                       for r in range(workers)]
            shutil.rmtree(run_dir, ignore_errors=True)
            merged = {"system": system, "cache_frac": frac} | _merge(reports)
            results["runs"].append(merged)
            log(f"{system:>10} cache {frac:>4.0%}: epoch {merged['epoch_s']:6.1f} s, "
                f"storage {merged['storage_bytes'] / 2**20:8.1f} MiB, slab hit "
                f"{merged['hit_ratio']['slab']:.2f}, ring {merged['hit_ratio']['ring']:.2f}, "
                f"between workers {merged['exchange_bytes'] / 2**20:7.1f} MiB "
                f"({time.perf_counter() - started:.0f} s with start-up)")
            out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    return results


def _machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def plot(results: dict, path: Path) -> None:
    """Epoch time, storage bytes and slab hit ratio against cache size, one line per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    systems = list(dict.fromkeys(r["system"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("epoch_s", "epoch time (s)"), ("storage_bytes", "bytes from storage (MiB)"),
              ("slab_hit", "slab hit ratio"))
    for ax, (key, label) in zip(axes, panels):
        for system in systems:
            mine = [r for r in runs if r["system"] == system]
            xs = [100 * r["cache_frac"] for r in mine]
            ys = [r["hit_ratio"]["slab"] if key == "slab_hit" else
                  r[key] / 2**20 if key == "storage_bytes" else r[key] for r in mine]
            ax.plot(xs, ys, marker="o", label=system)
        ax.set_xlabel("cache per worker (% of feature rows)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    config = results["config"]
    fig.suptitle(f"tiergnn bench: {config['dataset']}, {config['workers']} workers, "
                 f"{config['max_batches']} batches of {config['batch_size']} per worker after "
                 f"{config['warmup_batches']} warm-up, window {config['window']}, "
                 f"fanouts {config['fanouts']} ({results['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
