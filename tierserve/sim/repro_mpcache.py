"""`tierserve sim reproduce mpcache`: MPCache's KV reduction, in its own setting and in serving.

MPCache (Zeng et al., NeurIPS'25, arXiv 2501.06807) evicts most of a long prompt's KV once after
prefill (static stage) and lets each decode step attend to a query-selected tenth of what is
left (dynamic stage). Under secure multi-party computation it reports 1.8-2.01x lower decode
latency and 3.39-8.37x less communication over its sequence lengths.

Two parts:

- **private decoding** (the paper's setting): latency of one LLaMA-2-7B decode step under 3PC
  (ABY3, what SecretFlow SPU runs) from ``tierserve mpc-cost``'s operation-by-operation count of
  bits and rounds, over a network: each party sends its share of the bits over its own link and
  every round waits one one-way latency. Compute is not priced (MPC decoding is communication-
  bound); the networks are our assumptions, stated in ``NETWORKS``.
- **serving** (what tierserve adds): the engine's scheduler and KV manager with the selection
  and static eviction priced by ``SimKVSelection`` on the roofline, LLaMA-2-7B on one
  A100-80GB: long prompts from arxiv_summarization's statistics, all submitted at once (an
  offline batch) and at a Poisson rate (online), full KV against dynamic selection alone and
  against both stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig, SelectionConfig
from tierserve.selection.mpc_cost import SHAPES, MPCacheSetting, Protocol, full_step, mpcache_step
from tierserve.sim.run import make_setup, run_pool, simulate
from tierserve.sim.selection import SimKVSelection
from tierserve.sim.traces import LENGTH_TRACES, length_trace, poisson_arrivals

PAPER = ("1.8-2.01x lower decode latency, 3.39-8.37x less communication under MPC over its "
         "sequence lengths (abstract)")
MODEL, HARDWARE, TRACE = "llama-2-7b", "a100-80gb-sxm", "arxiv"
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass(slots=True, frozen=True)
class Network:
    name: str
    bandwidth: float  # bytes/s a party sends
    latency_s: float  # one way
    note: str

    def seconds(self, cost, parties: int) -> float:
        """Each party sends its share of the bits on its own link; a round waits one latency."""
        return cost.bits / 8 / parties / self.bandwidth + cost.rounds * self.latency_s


NETWORKS = (
    Network("lan", 1.25e9, 0.5e-3, "10 Gb/s per party, 0.5 ms one way: our assumption of a "
            "data-centre LAN (the paper's network setting could not be read here)"),
    Network("wan", 50e6, 20e-3, "400 Mb/s per party, 20 ms one way: our assumption of a WAN"),
)


def private_decode(budget: float = 0.1, static_keep: float = 0.5) -> list[dict]:
    """Per context and network: full vs MPCache decode-step latency under 3PC."""
    protocol = Protocol("aby3", parties=3)
    shape = SHAPES["llama2-7b"]
    setting = MPCacheSetting(static_keep=static_keep, budget=budget)
    rows = []
    for context in CONTEXTS:
        full = full_step(protocol, shape, context).total
        ours = mpcache_step(protocol, shape, context, setting).total
        row = {"context": context, "full_gb": full.bits / 8e9, "mpcache_gb": ours.bits / 8e9,
               "communication_ratio": full.bits / ours.bits,
               "full_rounds": full.rounds, "mpcache_rounds": ours.rounds}
        for net in NETWORKS:
            full_s, ours_s = net.seconds(full, protocol.parties), net.seconds(ours, protocol.parties)
            row[f"{net.name}_full_s"], row[f"{net.name}_mpcache_s"] = full_s, ours_s
            row[f"{net.name}_latency_ratio"] = full_s / ours_s
        # The one-way latency at which both take as long (MPCache sends fewer bits in more
        # rounds): below it MPCache is faster on a 10 Gb/s link.
        saved = (full.bits - ours.bits) / 8 / protocol.parties / NETWORKS[0].bandwidth
        extra_rounds = ours.rounds - full.rounds
        row["break_even_latency_ms"] = (saved / extra_rounds * 1e3 if extra_rounds > 0
                                        else float("inf"))
        rows.append(row)
    return rows


@dataclass(slots=True, frozen=True)
class ServingMode:
    name: str
    selection: SelectionConfig


SERVING_MODES = (
    ServingMode("full KV", SelectionConfig()),
    ServingMode("mpcache dynamic 10%", SelectionConfig(kv_selection="mpcache", kv_budget=0.1)),
    ServingMode("mpcache static 50% + dynamic 10%",
                SelectionConfig(kv_selection="mpcache", kv_budget=0.1, kv_eviction="mpcache",
                                kv_eviction_budget=0.5)),
    ServingMode("quest 10%", SelectionConfig(kv_selection="quest", kv_budget=0.1)),
)


def _engine(selection: SelectionConfig) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=16, enable_prefix_caching=False, swap_space=0),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=256,
                                  policy="sarathi", preemption_mode="recompute"),
        selection=selection)


def run_serving(job: tuple[ServingMode, str, int, float | None, int]) -> dict:
    """One mode on one load: ``rate`` None submits every request at once."""
    mode, load, num_requests, rate, seed = job
    setup = make_setup(_engine(mode.selection), LENGTH_TRACES[TRACE].max_total, MODEL, HARDWARE)
    trace = length_trace(TRACE, num_requests, seed)
    poisson_arrivals(trace, rate or 0.0, seed)  # rate None: every request at time 0
    selection = SimKVSelection(mode.selection, setup.model.num_layers,
                               setup.engine.cache.block_size, setup.cost)
    run = simulate(setup, trace, seed, prepare=selection.install)
    return {"mode": mode.name, "load": load, **run.row(),
            "tbt_p50_s": run.percentile("tbt", 50), "tbt_p99_s": run.percentile("tbt", 99),
            "kv_capacity_tokens": setup.kv_capacity_tokens}


def reproduce_mpcache(num_requests: int = 256, rate: float = 0.25, seed: int = 0,
                      workers: int = 2, progress: bool = True) -> dict:
    loads = (("offline batch", None), (f"online {rate:g} req/s", rate))
    jobs = [(mode, load, num_requests, r, seed) for load, r in loads for mode in SERVING_MODES]
    serving: dict[str, dict] = {}
    for row in run_pool(run_serving, jobs, workers, progress and (
            lambda r: f"{r['load']}: {r['mode']} {r['throughput_tokens_per_s']:.0f} tok/s, "
            f"TBT p50 {r['tbt_p50_s'] * 1e3:.1f} ms")):
        serving.setdefault(row["load"], {})[row["mode"]] = row
    for by_mode in serving.values():
        base = by_mode["full KV"]
        for row in by_mode.values():
            row["throughput_ratio"] = (row["throughput_tokens_per_s"]
                                       / base["throughput_tokens_per_s"])
            row["tbt_p50_ratio"] = base["tbt_p50_s"] / row["tbt_p50_s"]
    return {"private": private_decode(), "networks": [asdict(n) for n in NETWORKS],
            "serving": serving, "paper": PAPER, "model": MODEL, "hardware": HARDWARE,
            "trace": TRACE}


def markdown_table(report: dict) -> str:
    lines = ["| context | communication full / MPCache (GB) | ratio | rounds full / MPCache | "
             "LAN latency full / MPCache (s) | ratio | WAN ratio | break-even one-way latency "
             "(ms) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["private"]:
        lines.append(f"| {r['context']} | {r['full_gb']:.2f} / {r['mpcache_gb']:.2f} | "
                     f"{r['communication_ratio']:.2f}x | {r['full_rounds']:,} / "
                     f"{r['mpcache_rounds']:,} | {r['lan_full_s']:.2f} / "
                     f"{r['lan_mpcache_s']:.2f} | {r['lan_latency_ratio']:.2f}x | "
                     f"{r['wan_latency_ratio']:.2f}x | {r['break_even_latency_ms']:.3f} |")
    lines += ["", "| load | mode | output tok/s | vs full | TBT P50 (ms) | TBT P99 (ms) | "
              "preemptions |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for load, by_mode in report["serving"].items():
        for mode, r in by_mode.items():
            lines.append(f"| {load} | {mode} | {r['throughput_tokens_per_s']:.0f} | "
                         f"{r['throughput_ratio']:.2f}x | {r['tbt_p50_s'] * 1e3:.1f} | "
                         f"{r['tbt_p99_s'] * 1e3:.1f} | {r['preemptions']} |")
    return "\n".join(lines)


def plot_mpcache(report: dict, path: str) -> None:
    """Left: private decode latency ratio by context (LAN, WAN) and communication ratio, with
    the paper's ranges; then serving: offline throughput and online TBT P50 per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (private, offline, online) = plt.subplots(1, 3, figsize=(16, 4.5))
    contexts = [r["context"] for r in report["private"]]
    for key, label in (("communication_ratio", "communication"),
                       ("lan_latency_ratio", "latency, LAN"), ("wan_latency_ratio", "latency, WAN")):
        private.plot(contexts, [r[key] for r in report["private"]], "o-", label=label)
    private.axhspan(3.39, 8.37, alpha=0.12, color="C0", label="paper: communication")
    private.axhspan(1.8, 2.01, alpha=0.2, color="C1", label="paper: latency")
    private.set_xscale("log", base=2)
    private.set_xlabel("context (tokens)")
    private.set_ylabel("full / MPCache")
    private.set_title("private decode step, 3PC (ABY3)", fontsize=9)
    private.legend(fontsize=7)
    loads = list(report["serving"])
    for axis, load, key, scale, label in (
            (offline, loads[0], "throughput_tokens_per_s", 1.0, "output tokens / s"),
            (online, loads[-1], "tbt_p50_s", 1e3, "TBT P50 (ms)")):
        modes = list(report["serving"][load])
        axis.bar(range(len(modes)), [report["serving"][load][m][key] * scale for m in modes],
                 color=[f"C{i}" for i in range(len(modes))])
        axis.set_xticks(range(len(modes)), [m.replace(" + ", "\n+ ") for m in modes], fontsize=7)
        axis.set_ylabel(label)
        axis.set_title(f"{load}: {report['model']} on {report['hardware']}, {report['trace']} "
                       "prompts", fontsize=9)
    fig.suptitle("MPCache, simulated", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
