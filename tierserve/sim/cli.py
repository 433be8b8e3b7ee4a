"""`tierserve sim run | capacity | profile | calibrate`: the command line of the simulator."""

from __future__ import annotations

import argparse
import time

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig, parse_size
from tierserve.sim.hardware import HARDWARE
from tierserve.sim.model_shape import KNOWN_MODELS
from tierserve.sim.traces import LENGTH_TRACES, TRACE_NAMES, make_trace, poisson_arrivals


def add_sim_parser(sub) -> None:
    sim = sub.add_parser(
        "sim", help="simulate the engine at GPU scale under a cost model",
        description="Drive tierserve's own scheduler, KV manager, policies and planner with a "
        "cost model instead of a model, on a virtual clock: replay traces on simulated GPUs "
        "(run), search Sarathi-Serve's capacity (capacity), measure this machine's engine by "
        "operator (profile) and check the simulator against it (calibrate).")
    commands = sim.add_subparsers(dest="sim_command", required=True)
    run = commands.add_parser("run", help="replay a trace on a simulated deployment",
                              description="Replay a trace at a Poisson rate on a simulated "
                              "deployment and print TTFT/TBT percentiles and throughput.")
    _add_deployment_args(run)
    _add_trace_args(run)
    run.add_argument("--rate", type=float, default=1.0,
                     help="Poisson arrivals, requests/s (0: all at once) (default: %(default)s)")
    run.add_argument("--policies", default=None,
                     help="comma-separated scheduling policies, each replayed (default: "
                     "--scheduling-policy)")
    run.set_defaults(func=cmd_run)

    capacity = commands.add_parser(
        "capacity", help="Sarathi-Serve's capacity: highest rate meeting the TBT SLO",
        description="Binary search for the highest Poisson rate whose P99 TBT is within "
        "--tbt-slo and whose median scheduling delay is within --max-queue-delay; each probe "
        "replays the same trace (same lengths) at that rate on a fresh simulated engine.")
    _add_deployment_args(capacity)
    _add_trace_args(capacity, default_requests=2048)
    capacity.add_argument("--tbt-slo", type=float, required=True, help="P99 TBT SLO, seconds")
    capacity.add_argument("--max-queue-delay", type=float, default=2.0,
                          help="median scheduling delay bound, seconds (default: %(default)s)")
    capacity.add_argument("--min-rate", type=float, default=0.05,
                          help="lowest rate probed (default: %(default)s)")
    capacity.add_argument("--max-rate", type=float, default=20.0,
                          help="highest rate probed (default: %(default)s)")
    capacity.add_argument("--iterations", type=int, default=8,
                          help="bisection steps (default: %(default)s)")
    capacity.add_argument("--policies", default=None,
                          help="comma-separated policies, each searched (default: "
                          "--scheduling-policy); fcfs-prefill-first gets a budget of the "
                          "trace's longest request unless --prefill-first-budget says otherwise")
    capacity.add_argument("--prefill-first-budget", type=int, default=None,
                          help="token budget of fcfs-prefill-first (vLLM-like: whole prompts)")
    capacity.set_defaults(func=cmd_capacity)

    reproduce = commands.add_parser(
        "reproduce", help="re-run a paper's experiment in simulation",
        description="Re-run a seed paper's headline experiment on the simulator and print our "
        "numbers beside the paper's (docs/paper-results.md). sarathi: capacity of chunked "
        "prefills vs a vLLM-like prefill-first scheduler, Mistral-7B and Yi-34B on A100s. "
        "fastswitch: tail TTFT/TBT and throughput of fair scheduling with block groups, async "
        "swap and multi-turn reuse vs priority FCFS with recompute, under changing priorities. "
        "batchllm: the batch planner vs an LRU prefix cache on shared-prefix batches. "
        "expertflow: expert policies on a Mixtral-8x7B-sized MoE with offloaded experts, "
        "replaying recorded routes (needs --trace, --train-trace, --predictions). mpcache: "
        "private decode latency under 3PC from tierserve mpc-cost's counts, and serving "
        "long prompts with KV selection and static eviction.")
    reproduce.add_argument("paper", choices=tuple(REPRODUCTIONS))
    reproduce.add_argument("--num-requests", type=int, default=None,
                           help="sarathi: requests per trial (default: 2048); mpcache: "
                           "requests per serving run (default: 256)")
    reproduce.add_argument("--rate", type=float, default=0.25,
                           help="mpcache: online arrival rate, req/s (default: %(default)s)")
    reproduce.add_argument("--conversations", type=int, default=200,
                           help="fastswitch: conversations per run (default: %(default)s)")
    reproduce.add_argument("--iterations", type=int, default=9,
                           help="bisection steps per search (default: %(default)s)")
    reproduce.add_argument("--trace", default=None,
                           help="expertflow: router trace to replay (`tierserve moe trace`)")
    reproduce.add_argument("--train-trace", default=None,
                           help="expertflow: the trace static pins its hot set from (the "
                           "predictor's training trace)")
    reproduce.add_argument("--predictions", default=None,
                           help="expertflow: predicted routes of --trace's prompts "
                           "(`tierserve moe predict`)")
    reproduce.add_argument("--workers", type=int, default=2, help="processes (default: 2)")
    reproduce.add_argument("--seed", type=int, default=0)
    reproduce.add_argument("--json", default=None)
    reproduce.add_argument("--plot", default=None)
    reproduce.set_defaults(func=cmd_reproduce)

    from tierserve.cli import add_engine_args

    profile = commands.add_parser(
        "profile", help="measure this machine's real engine by operator",
        description="Run the real engine over a grid of step shapes (one prefill chunk of T "
        "tokens; chunks after growing contexts; batches of decodes at several contexts) and "
        "write OUT/profile.csv and OUT/meta.json for --cost profile:OUT.")
    add_engine_args(profile)
    profile.add_argument("out", help="folder to write")
    profile.add_argument("--repeats", type=int, default=5,
                         help="steps measured per point; the median is kept (default: %(default)s)")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")
    profile.set_defaults(func=cmd_profile)

    calibrate = commands.add_parser(
        "calibrate", help="simulated vs measured on this machine's real engine",
        description="Profile this machine's engine (unless --profile names one), then replay an "
        "online (Poisson) and a batch (all at once) workload on the real engine and on the "
        "simulator with the profiled cost model; report step-time errors and TTFT/TBT P50/P99 "
        "predicted vs measured. One command regenerates the calibration table.")
    add_engine_args(calibrate)
    calibrate.add_argument("--profile", default=None,
                           help="folder written by `sim profile` (default: profile first, right "
                           "before measuring: this machine drifts, so a stale profile misses)")
    calibrate.add_argument("--save-profile", default=None, metavar="FOLDER",
                           help="without --profile: keep the fresh profile in FOLDER")
    calibrate.add_argument("--repeats", type=int, default=5,
                           help="steps measured per profile point (default: %(default)s; "
                           "unused with --profile)")
    calibrate.add_argument("--json", default=None, help="write the report here")
    calibrate.add_argument("--no-repeat", action="store_true",
                           help="measure each workload once (default: twice, to report how far "
                           "two real runs differ: the machine's noise floor)")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.set_defaults(func=cmd_calibrate)


def _add_deployment_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deployment")
    group.add_argument("--model", default="mistral-7b",
                       help=f"known shape ({', '.join(KNOWN_MODELS)}) or an HF config.json / "
                       "folder (default: %(default)s)")
    group.add_argument("--hardware", default="a100-80gb-sxm", choices=sorted(HARDWARE),
                       help="accelerator profile (default: %(default)s)")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel degree")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel degree (stages run "
                       "one after another within a step)")
    group.add_argument("--interconnect", choices=("nvlink", "pcie", "ethernet"), default=None,
                       help="link between GPUs (default: the profile's)")
    group.add_argument("--cost", default="roofline",
                       help="roofline | profile:FOLDER (tierserve sim profile) | vidur:FOLDER "
                       "(Vidur's mlp.csv and attention.csv) (default: %(default)s)")
    group.add_argument("--cpu-overhead", type=float, default=None,
                       help="host seconds per step (default: 2.5 ms, or the profile's)")
    group.add_argument("--kv-capacity-tokens", type=int, default=None,
                       help="device KV tokens (default: what fits beside the weights at 90%% "
                       "memory utilisation)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context limit (default: the trace's bound)")
    engine = parser.add_argument_group("engine (as tierserve serve)")
    engine.add_argument("--scheduling-policy", default="sarathi",
                        help="sarathi | fcfs | fcfs-prefill-first | fair (default: %(default)s)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="token budget per step (default: %(default)s)")
    engine.add_argument("--max-num-seqs", type=int, default=128,
                        help="most requests running at once (default: %(default)s)")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--swap-space", default="0",
                        help="host KV tier, bytes (e.g. 60GB; default: none)")
    engine.add_argument("--preemption-mode", default="recompute",
                        choices=("swap", "recompute", "auto"))
    engine.add_argument("--block-group-size", type=int, default=8,
                        help="FastSwitch block groups (0: plain LRU blocks)")
    engine.add_argument("--priority-update-interval", type=int, default=1)
    parser.add_argument("--json", default=None, help="write rows and config here")
    parser.add_argument("--plot", default=None, help="write a figure here (.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_trace_args(parser: argparse.ArgumentParser, default_requests: int = 512) -> None:
    group = parser.add_argument_group("trace")
    group.add_argument("--trace", "--dataset", default="sharegpt4", dest="trace",
                       help=f"{' | '.join(TRACE_NAMES)} | FILE.csv (Vidur or Azure/Splitwise "
                       "columns) | FILE.jsonl (prompt_token_ids, max_tokens per line, as "
                       "tierserve bench --dataset) (default: %(default)s)")
    group.add_argument("--num-requests", type=int, default=default_requests,
                       help="requests (conversations for the conversations trace) "
                       "(default: %(default)s)")
    group.add_argument("--think-time", type=float, default=5.0,
                       help="conversations: mean seconds between an answer and the next turn")
    group.add_argument("--seed", type=int, default=0)


# -- building ------------------------------------------------------------------------------------
def _engine_config(args, policy: str, budget: int | None = None) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                          swap_space=parse_size(args.swap_space),
                          block_group_size=args.block_group_size),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget or args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, policy=policy,
                                  preemption_mode=args.preemption_mode,
                                  priority_update_interval=args.priority_update_interval))


def _setup(args, policy: str, max_model_len: int, budget: int | None = None):
    from tierserve.sim.run import make_setup

    return make_setup(_engine_config(args, policy, budget), max_model_len, args.model,
                      args.hardware, args.tp, args.pp, args.interconnect, args.cost,
                      args.cpu_overhead, args.kv_capacity_tokens)


def _trace(args, rate: float):
    trace = make_trace(args.trace, args.num_requests, args.seed,
                       **({"think_s": args.think_time} if args.trace == "conversations" else {}))
    poisson_arrivals(trace, rate, args.seed)
    return trace


def _max_len(args) -> int:
    if args.max_model_len:
        return args.max_model_len
    if args.trace in LENGTH_TRACES:
        return LENGTH_TRACES[args.trace].max_total
    return 8192 if args.trace == "conversations" else 32768


def _policies(args) -> list[str]:
    return [p.strip() for p in (args.policies or args.scheduling_policy).split(",") if p.strip()]


def _budget(args, policy: str, trace) -> int | None:
    if policy != "fcfs-prefill-first":
        return None
    if args.__dict__.get("prefill_first_budget"):
        return args.prefill_first_budget
    return max(r.prompt_len for r in trace)  # whole prompts, as vLLM's default scheduler


def _config_block(args) -> dict:
    return {key: value for key, value in vars(args).items() if key not in ("func",)}


# -- commands ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from tqdm import tqdm

    from tierserve.bench.report import write_json
    from tierserve.sim.run import simulate

    rows = {}
    for policy in _policies(args):
        trace = _trace(args, args.rate)
        setup = _setup(args, policy, _max_len(args), _budget(args, policy, trace))
        with tqdm(total=len(trace), desc=f"simulating {policy}", unit="req",
                  disable=args.no_progress) as bar:
            run = simulate(setup, trace, args.seed, progress=bar.update)
        rows[policy] = run.row()
        row = rows[policy]
        print(f"{policy}: {row['num_finished']} finished in {row['simulated_s']:.1f} simulated s "
              f"({row['wall_s']:.1f} s wall); TTFT p50 {row['ttft_p50_s']:.3f} p99 "
              f"{row['ttft_p99_s']:.3f} s; TBT p50 {row['tbt_p50_s'] * 1000:.1f} p99 "
              f"{row['tbt_p99_s'] * 1000:.1f} ms; {row['throughput_tokens_per_s']:.0f} output tok/s")
    if args.json:
        write_json(args.json, {"config": _config_block(args), "results": rows})
        print(f"wrote {args.json}")
    return 0


def cmd_capacity(args) -> int:
    from tierserve.bench.report import write_json
    from tierserve.sim.capacity import CapacitySLO, search_capacity
    from tierserve.sim.run import simulate

    slo = CapacitySLO(args.tbt_slo, args.max_queue_delay)
    results, all_probes = {}, {}
    for policy in _policies(args):
        lengths = _trace(args, 1.0)
        budget = _budget(args, policy, lengths)
        setup = _setup(args, policy, _max_len(args), budget)
        started = time.perf_counter()

        def run_at(rate: float, setup=setup, policy=policy) -> dict:
            row = simulate(setup, _trace(args, rate), args.seed).row()
            if not args.no_progress:
                print(f"  {policy} @ {rate:.4g} req/s: P99 TBT {row['tbt_p99_s']:.3f} s, "
                      f"median delay {row['queue_p50_s']:.2f} s ({row['wall_s']:.1f} s wall)",
                      flush=True)
            return row

        capacity, probes = search_capacity(run_at, slo, args.min_rate, args.max_rate,
                                           args.iterations)
        results[policy] = {"capacity_rps": capacity, "token_budget": budget
                           or args.max_num_batched_tokens,
                           "search_wall_s": time.perf_counter() - started,
                           "probes": [{"rate": p.rate, "met": p.met, **p.row} for p in probes]}
        all_probes[policy] = probes
        print(f"{policy}: capacity {_rate_text(capacity, args)} at P99 TBT <= {args.tbt_slo:g} s "
              f"and median scheduling delay <= {args.max_queue_delay:g} s")
    if args.json:
        write_json(args.json, {"config": _config_block(args), "results": results})
        print(f"wrote {args.json}")
    if args.plot:
        from tierserve.sim.plots import plot_capacity_probes

        plot_capacity_probes(all_probes, slo, {p: r["capacity_rps"] for p, r in results.items()},
                             args.plot, f"{args.model} on {args.tp}x {args.hardware}, "
                             f"{args.trace}")
        print(f"wrote {args.plot}")
    return 0


def _rate_text(capacity: float | None, args) -> str:
    if capacity is None:
        return f"below --min-rate {args.min_rate:g} req/s"
    if capacity == args.max_rate:
        return f"at least --max-rate {args.max_rate:g} req/s"
    return f"{capacity:.3g} req/s"


def _expertflow(module, args) -> dict:
    if not (args.trace and args.train_trace and args.predictions):
        raise SystemExit("reproduce expertflow replays recorded routes: give --trace, "
                         "--train-trace and --predictions (docs/paper-results.md shows how to "
                         "make them)")
    return module.reproduce_expertflow(
        module.ExpertInputs(args.trace, args.train_trace, args.predictions), args.workers)


# paper -> how its module's reproduce_<paper> is called (module tierserve.sim.repro_<paper>,
# which also has markdown_table and plot_<paper>)
REPRODUCTIONS = {
    "sarathi": lambda m, a: m.reproduce_sarathi(a.num_requests or 2048, a.seed, a.iterations,
                                                a.workers),
    "fastswitch": lambda m, a: m.reproduce_fastswitch(a.conversations, a.seed, a.workers),
    "batchllm": lambda m, a: m.reproduce_batchllm(a.workers),
    "expertflow": _expertflow,
    "mpcache": lambda m, a: m.reproduce_mpcache(a.num_requests or 256, a.rate, a.seed,
                                                a.workers),
}


def cmd_reproduce(args) -> int:
    import importlib

    from tierserve.bench.report import write_json

    started = time.perf_counter()
    module = importlib.import_module(f"tierserve.sim.repro_{args.paper}")
    report = REPRODUCTIONS[args.paper](module, args)
    markdown_table, plot = module.markdown_table, getattr(module, f"plot_{args.paper}")
    report["wall_s"] = time.perf_counter() - started
    print(markdown_table(report))
    print(f"paper: {report['paper']}")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_profile(args) -> int:
    from tierserve.cli import engine_config_from_args
    from tierserve.sim.profile import run_profile

    table = run_profile(engine_config_from_args(args), args.repeats, not args.no_progress)
    path = table.write(args.out)
    print(f"wrote {path} ({len(table.points)} points)")
    return 0


def cmd_calibrate(args) -> int:
    from tierserve.bench.report import write_json
    from tierserve.cli import engine_config_from_args
    from tierserve.sim.calibrate import calibrate
    from tierserve.sim.profiled import ProfiledCostModel, ProfileTable

    config = engine_config_from_args(args)
    if args.profile and args.save_profile:
        raise SystemExit("--save-profile keeps a fresh profile; with --profile none is taken")
    if args.profile:
        table = ProfileTable.read(args.profile)
    else:
        from tierserve.sim.profile import run_profile

        table = run_profile(config, args.repeats, not args.no_progress)
        if args.save_profile:
            print(f"wrote {table.write(args.save_profile)} ({len(table.points)} points)")
    report = calibrate(config, ProfiledCostModel(table),
                       progress=not args.no_progress, repeat_real=not args.no_repeat)
    report["profile_meta"] = table.meta
    for name, part in report["workloads"].items():
        steps = part["steps"]
        print(f"{name}: {steps['count']} steps, step time median abs error "
              f"{steps['median_abs_error_pct']:.1f}% (p90 {steps['p90_abs_error_pct']:.1f}%)")
        for kind, values in steps["by_kind"].items():
            print(f"  {kind:14s} {values['count']:5d} steps  |error| "
                  f"{values['median_abs_error_pct']:5.1f}%  bias "
                  f"{values['median_signed_error_pct']:+5.1f}%")
        for metric, values in part["e2e"].items():
            again = (f"  again {values['measured_again']:.4g} ({values['repeat_diff_pct']:.1f}%)"
                     if "measured_again" in values else "")
            print(f"  {metric:24s} measured {values['measured']:.4g}  simulated "
                  f"{values['simulated']:.4g}  ({values['error_pct']:.1f}%){again}")
    print(f"median abs error: steps {report['median_abs_step_error_pct']:.1f}%, end to end "
          f"{report['median_abs_e2e_error_pct']:.1f}%")
    if "median_abs_real_repeat_diff_pct" in report:
        print(f"two real runs differ by {report['median_abs_real_repeat_diff_pct']:.1f}% "
              "(median over the same metrics): the machine's noise floor")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0
