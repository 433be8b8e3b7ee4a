"""Figures of simulated runs (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tierserve.sim.capacity import CapacitySLO, RateProbe


def plot_capacity_probes(probes: dict[str, Sequence[RateProbe]], slo: CapacitySLO,
                         capacities: dict[str, float | None], path: str | Path, title: str
                         ) -> None:
    """P99 TBT and median scheduling delay against rate per policy (filled: met both), the
    bounds as horizontal lines and each capacity as a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tbt_axis, delay_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (policy, points) in enumerate(probes.items()):
        color = f"C{index}"
        ordered = sorted(points, key=lambda p: p.rate)
        rates = [p.rate for p in ordered]
        for axis, values in ((tbt_axis, [p.tbt_p99_s for p in ordered]),
                             (delay_axis, [p.queue_p50_s for p in ordered])):
            axis.plot(rates, values, "-", color=color, alpha=0.5)
            for probe, value in zip(ordered, values):
                axis.plot(probe.rate, value, "o", color=color,
                          markerfacecolor=color if probe.met else "none")
            capacity = capacities.get(policy)
            if capacity is not None:
                axis.axvline(capacity, color=color, linestyle=":")
        tbt_axis.plot([], [], "o-", color=color, label=f"{policy}: {capacities.get(policy) or 0:.3g} req/s")
    tbt_axis.axhline(slo.tbt_p99_s, color="black", linewidth=0.8, label="P99 TBT SLO")
    delay_axis.axhline(slo.max_queue_p50_s, color="black", linewidth=0.8, label="delay bound")
    tbt_axis.set(xlabel="request rate (req/s)", ylabel="P99 TBT (s)", yscale="log")
    delay_axis.set(xlabel="request rate (req/s)", ylabel="median scheduling delay (s)",
                   yscale="symlog")
    tbt_axis.legend(fontsize=8)
    delay_axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
