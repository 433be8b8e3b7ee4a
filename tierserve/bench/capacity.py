"""`tierserve bench capacity`: Sarathi-Serve's capacity metric, the highest Poisson request rate
whose P99 time between tokens meets an SLO, found by binary search over online runs.

Each probe is one `tierserve bench online` run (fresh warmed-up engine, seeded workload, Poisson
arrivals for --duration seconds) at one rate. The search assumes P99 TBT grows with the rate;
run-to-run noise can break that near the capacity, so the answer is good to about the last
bisection step, and the probes are reported so a non-monotone pair shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from tierserve.bench.online import OnlineSpec, run_online
from tierserve.config import EngineConfig
from tierserve.sim.capacity import bisect_rate

CAPACITY_COLUMNS = ("rate", "tbt_p99_s", "met_slo", "ttft_p99_s", "throughput_tokens_per_s",
                    "num_finished")


@dataclass(slots=True, frozen=True)
class Probe:
    """One measured rate: its P99 TBT (seconds) and whether that met the SLO."""

    rate: float  # requests/s
    tbt_p99_s: float
    met: bool


def search_capacity(measure: Callable[[float], float], slo: float, lo: float, hi: float,
                    iterations: int) -> tuple[float | None, list[Probe]]:
    """The highest rate in [lo, hi] whose ``measure(rate)`` (P99 TBT, s) is at most ``slo``.

    Probes ``lo`` first (if it misses, the capacity is below ``lo``: returns None, and ``hi``,
    the costly run, is skipped), then ``hi`` (if it meets, returns ``hi``: the capacity is at
    least that), then bisects ``iterations`` times, keeping the highest rate that met; the
    answer is then within ``(hi - lo) / 2**iterations`` below the true capacity. A NaN
    measurement counts as a miss. Returns (capacity, probes in the order run).
    """
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < --min-rate <= --max-rate, got {lo} and {hi}")
    if slo <= 0:
        raise ValueError(f"--tbt-slo must be positive seconds, got {slo}")
    if iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {iterations}")
    probes: list[Probe] = []

    def meets(rate: float) -> bool:
        p99 = measure(rate)
        probes.append(Probe(rate, p99, not math.isnan(p99) and p99 <= slo))
        return probes[-1].met

    return bisect_rate(meets, lo, hi, iterations), probes


def describe_capacity(capacity: float | None, lo: float, hi: float, iterations: int) -> str:
    """How to read the search's answer."""
    if capacity is None:
        return f"below --min-rate {lo:g} req/s (even it misses the SLO)"
    if capacity == hi:
        return f"at least --max-rate {hi:g} req/s (it meets the SLO)"
    step = (hi - lo) / 2**iterations
    return (f"at least {capacity:.4g} req/s and below {capacity + step:.4g} req/s (if P99 TBT "
            "grows with the rate)")


@dataclass(slots=True)
class CapacitySpec:
    """The search and the online runs it measures with (policies are searched one by one)."""

    online: OnlineSpec
    tbt_slo_s: float
    min_rate: float = 0.1
    max_rate: float = 4.0
    iterations: int = 4


def run_capacity(config: EngineConfig, spec: CapacitySpec, progress: bool = True
                 ) -> tuple[dict, dict[str, dict], dict[str, dict], dict[str, list[Probe]]]:
    """Search each policy's capacity; (config, rows per probe, capacity per policy, probes)."""
    rows: dict[str, dict] = {}
    capacities: dict[str, dict] = {}
    all_probes: dict[str, list[Probe]] = {}
    for policy in spec.online.policies:
        def measure(rate: float, policy: str = policy) -> float:
            online = replace(spec.online, request_rate=rate, policies=(policy,))
            row = run_online(config, online, progress).results[policy]
            if not row["num_finished"]:
                raise ValueError(f"no request finished at {rate:g} req/s in --duration "
                                 f"{spec.online.duration} s; lengthen --duration")
            rows[_row_name(policy, rate)] = {"policy": policy, "rate": rate, **row}
            return row["tbt_p99_s"]

        capacity, probes = search_capacity(measure, spec.tbt_slo_s, spec.min_rate,
                                           spec.max_rate, spec.iterations)
        for probe in probes:
            rows[_row_name(policy, probe.rate)]["met_slo"] = probe.met
        all_probes[policy] = probes
        capacities[policy] = {"rate": capacity, "reading": describe_capacity(
            capacity, spec.min_rate, spec.max_rate, spec.iterations)}
    document_config = {"tbt_slo_s": spec.tbt_slo_s, "min_rate": spec.min_rate,
                       "max_rate": spec.max_rate, "iterations": spec.iterations,
                       "duration_s": spec.online.duration, "num_requests": spec.online.num_requests,
                       "seed": spec.online.seed, "policies": list(spec.online.policies),
                       "workload": asdict(spec.online.workload), "engine": asdict(config)}
    return document_config, rows, capacities, all_probes


def _row_name(policy: str, rate: float) -> str:
    return f"{policy} @ {rate:.6g} req/s"


# -- command line ------------------------------------------------------------------------------
def add_capacity_subcommand(sub, add_common) -> None:
    """``tierserve bench capacity``: hooked into the bench CLI's subparsers."""
    capacity = sub.add_parser(
        "capacity", help="highest Poisson request rate whose P99 TBT meets an SLO",
        description="Sarathi-Serve's capacity: binary search for the highest Poisson request "
        "rate at which P99 time between tokens stays within --tbt-slo. Each probe is an online "
        "run (fresh engine, same seeded workload, --duration seconds of arrivals). --min-rate "
        "is probed first, then --max-rate, then --iterations bisections.")
    add_common(capacity, plot_help="P99 TBT against request rate, with the SLO line")
    capacity.add_argument("--policy", default="sarathi",
                          help="scheduling policy, or several comma-separated, each searched "
                          "(default: %(default)s)")
    capacity.add_argument("--tbt-slo", type=float, required=True,
                          help="P99 time-between-tokens SLO in seconds")
    capacity.add_argument("--min-rate", type=float, default=0.1,
                          help="lowest rate probed, requests/s (default: %(default)s)")
    capacity.add_argument("--max-rate", type=float, default=4.0,
                          help="highest rate probed, requests/s (default: %(default)s)")
    capacity.add_argument("--iterations", type=int, default=4,
                          help="bisection steps after the two end probes (default: %(default)s)")
    capacity.add_argument("--duration", type=float, default=60.0,
                          help="seconds of arrivals per probe (default: %(default)s)")
    capacity.set_defaults(func=cmd_capacity)


def cmd_capacity(args) -> int:
    from tierserve.bench import cli
    from tierserve.bench.report import plot_capacity

    online = OnlineSpec(workload=cli._workload_spec(args, args.num_requests or 0),
                        duration=args.duration, num_requests=args.num_requests,
                        policies=cli._names(args.policy), seed=args.seed)
    spec = CapacitySpec(online=online, tbt_slo_s=args.tbt_slo, min_rate=args.min_rate,
                        max_rate=args.max_rate, iterations=args.iterations)
    config, rows, capacities, probes = run_capacity(cli._engine_config(args), spec,
                                                    progress=not args.no_progress)
    cli._finish(args, config, rows, CAPACITY_COLUMNS, extra={"capacity": capacities})
    for policy, found in capacities.items():
        print(f"{policy}: capacity at P99 TBT <= {args.tbt_slo:g} s: {found['reading']}")
    if args.plot:
        plot_capacity(probes, args.tbt_slo, {p: c["rate"] for p, c in capacities.items()},
                      args.plot, f"capacity: {args.workload}, {args.duration:g} s per probe, "
                      f"{args.model}")
        print(f"wrote {args.plot}")
    return 0
