"""Benchmark output: the machine line, text tables, JSON files and matplotlib figures."""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tierserve.bench.stats import cdf_points


def machine_info(dtype: str) -> dict:
    """What the numbers were measured on: CPU model, cores, torch version and threads."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_family": _cpu_field("cpu family"),
        "cpu_features": " ".join(f for f in _cpu_field("flags").split()
                                 if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                          "amx_bf16", "amx_int8")),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def machine_line(machine: dict) -> str:
    """One line for docs: ``AMD EPYC, 2 cores, torch 2.5.1 (2 threads), float32``."""
    return (f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
            f"({machine['torch_threads']} threads), {machine['dtype']}")


def _cpu_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows: dict[str, dict], columns: Sequence[str]) -> str:
    """A plain text table: one row per key of ``rows``, one column per name in ``columns``."""
    header = ["", *columns]
    body = [[name, *(_cell(values.get(column)) for column in columns)]
            for name, values in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | Path, document: dict) -> None:
    """Write ``document`` as indented JSON (NaN becomes null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # replaced whole: a kill leaves the old one
    partial.write_text(json.dumps(_finite(document), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'tierserve[dev]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suptitle(figure, title: str) -> None:
    """The figure's title, wrapped to its width (about 9 characters an inch at the default size)
    so a long model name or configuration is not cut at the edges."""
    width_inches = figure.get_size_inches()[0]
    figure.suptitle(textwrap.fill(title, width=max(int(width_inches * 9), 20)))


def _save(figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_latency_cdfs(samples: dict[str, dict[str, list[float]]], path: str | Path,
                      title: str) -> None:
    """CDFs of TTFT and TBT per policy, and the TBT tail (fraction of gaps longer than x, log
    scale) where P99 differences show. ``samples[policy] = {"ttft": [...], "tbt": [...]}``."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((axes[0], "ttft", "time to first token (s)", False),
              (axes[1], "tbt", "time between tokens (s)", False),
              (axes[2], "tbt", "time between tokens (s), tail", True))
    for axis, metric, label, tail in panels:
        for policy, values in samples.items():
            xs, ys = cdf_points(values[metric])
            if tail:  # 1 - CDF; the last point (0) cannot be drawn on a log axis
                xs, ys = xs[:-1], [1.0 - y for y in ys[:-1]]
            if xs:
                axis.step(xs, ys, where="post", label=policy)
        axis.set_xscale("log")
        if tail:
            axis.set_yscale("log")
            axis.axhline(0.01, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
        axis.set_ylabel("fraction of samples > x" if tail else "fraction of samples <= x")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)


def plot_service(series: dict[str, dict[str, tuple[list[float], list[int]]]],
                 path: str | Path, title: str) -> None:
    """Each client's cumulative tokens served over time, one panel per policy."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False,
                                sharey=True)
    for axis, (policy, clients) in zip(axes[0], series.items()):
        for client, (times, totals) in clients.items():
            axis.step(times, totals, where="post", label=client)
        axis.set_title(policy)
        axis.set_xlabel("seconds since start")
        axis.set_yscale("symlog", linthresh=100)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    axes[0][0].set_ylabel("cumulative tokens served (prompt + output)")
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)


def plot_bars(results: dict[str, dict], metrics: Sequence[tuple[str, str]], path: str | Path,
              title: str) -> None:
    """One bar panel per ``(key, label)`` in ``metrics``, one bar per configuration."""
    plt = _pyplot()
    width = max(3.6 * len(metrics), 1.2 * len(results) + 2.0, 5.0)
    figure, axes = plt.subplots(1, len(metrics), figsize=(width, 3.6), squeeze=False)
    names = list(results)
    for axis, (key, label) in zip(axes[0], metrics):
        values = [results[name].get(key) or 0.0 for name in names]
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        axis.bar_label(bars, labels=[_cell(value) for value in values])
        axis.set_title(label, fontsize="medium")
        axis.tick_params(axis="x", labelsize="small")
        if len(names) > 4 or max(map(len, names)) > 10:  # long names would run together
            axis.tick_params(axis="x", labelrotation=30)
            for tick in axis.get_xticklabels():
                tick.set_horizontalalignment("right")
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)


def plot_capacity(probes: dict[str, Sequence], slo: float, capacities: dict[str, float | None],
                  path: str | Path, title: str) -> None:
    """P99 TBT against request rate per policy (filled: met the SLO, hollow: missed), the SLO
    as a horizontal line and each found capacity as a dotted vertical line.
    ``probes[policy]`` holds objects with ``rate``, ``tbt_p99_s`` and ``met``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, (policy, runs) in enumerate(probes.items()):
        color = f"C{index}"
        ordered = sorted(runs, key=lambda probe: probe.rate)
        axis.plot([p.rate for p in ordered], [p.tbt_p99_s for p in ordered], color=color,
                  label=policy)
        for probe in ordered:
            axis.scatter([probe.rate], [probe.tbt_p99_s], edgecolors=color, zorder=3,
                         facecolors=color if probe.met else "none")
        if capacities.get(policy) is not None:
            axis.axvline(capacities[policy], color=color, linestyle=":", linewidth=1)
    axis.axhline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g} s")
    axis.set_xlabel("request rate (requests/s)")
    axis.set_ylabel("P99 time between tokens (s)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)
