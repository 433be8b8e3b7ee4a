"""``tierserve bench online | fairness | swap | batch | batch-api | shared-prefix | structured |
offline | capacity | roofline | faults | moe | longctx``: run a benchmark, print a table, write JSON and a
plot.

``add_bench_parser(subparsers)`` hooks the command into the main CLI; ``python -m
tierserve.bench.cli ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

ONLINE_DEFAULT_POLICIES = "sarathi,fcfs-prefill-first"


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with its online, fairness, swap, batch, offline and capacity subcommands)
    to ``subparsers``."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks: online latency, fairness, swap, batch, offline vs baselines, "
        "capacity",
        description="Benchmarks on the in-process engine. Each prints a table; --json writes "
        "{machine, config, results}, --plot a figure.")
    _add_subcommands(bench)
    return bench


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    online = sub.add_parser(
        "online", help="Poisson arrivals; TTFT/TBT percentiles and throughput per policy",
        description="Poisson arrivals at --request-rate into the engine, once per policy "
        "(same seeded workload), reporting TTFT/TBT P50/P99, P99 e2e latency, output tokens/s.")
    _add_common(online, plot_help="CDFs of TTFT and TBT per policy")
    online.add_argument("--request-rate", type=float, default=1.0,
                        help="mean arrivals per second (inf: all at once) (default: %(default)s)")
    online.add_argument("--duration", type=float, default=None,
                        help="seconds of arrivals (default: 60 unless --num-requests is given)")
    online.add_argument("--policies", default=None,
                        help="comma-separated scheduling policies, each run on a fresh "
                        f"in-process engine (default: {ONLINE_DEFAULT_POLICIES})")
    remote = online.add_argument_group(
        "a running server instead of the in-process engine",
        "Streamed /v1/completions with token-id prompts and ignore_eos (tierserve serve; vLLM, "
        "SGLang and llama-server document both); timing is the client's. --model then only "
        "names the tokenizer that builds the prompts (the model the server runs); the engine "
        "flags do not apply.")
    remote.add_argument("--url", default=None,
                        help="server base URL, e.g. http://127.0.0.1:8000; NAME=URL,NAME=URL "
                        "runs several servers one after the other (e.g. one per policy)")
    remote.add_argument("--api-key", default=os.environ.get("TIERSERVE_API_KEY"),
                        help="bearer token for the server (default: $TIERSERVE_API_KEY, as "
                        "tierserve serve reads it; else none)")
    online.set_defaults(func=cmd_online)
    _add_moe(sub)
    _add_longctx(sub)

    fairness = sub.add_parser(
        "fairness", help="one heavy client floods, light clients send now and then",
        description="A heavy client floods the engine; light clients send Poisson requests. "
        "Reports light/heavy P99 TTFT, Jain's index and throughput per policy.")
    _add_common(fairness, plot_help="each client's cumulative service over time")
    fairness.add_argument("--heavy-requests", type=int, default=32,
                          help="requests of the heavy client (default: %(default)s)")
    fairness.add_argument("--heavy-rate", type=float, default=None,
                          help="heavy client's requests/s (default: all at t=0)")
    fairness.add_argument("--light-clients", type=int, default=3,
                          help="number of light clients (default: %(default)s)")
    fairness.add_argument("--light-rate", type=float, default=0.1,
                          help="requests/s of each light client (default: %(default)s)")
    fairness.add_argument("--duration", type=float, default=30.0,
                          help="seconds over which light clients send (default: %(default)s)")
    fairness.add_argument("--policies", default="fair,sarathi",
                          help="comma-separated scheduling policies (default: %(default)s)")
    fairness.set_defaults(func=cmd_fairness, max_num_seqs=8)

    swap = sub.add_parser(
        "swap", help="swap preemption with and without block groups (FastSwitch)",
        description="One preemption-heavy workload with a small KV pool and swap preemption, "
        "per block group size: copies per swap, bytes per copy, swap time, tokens/s, and a "
        "check that greedy outputs are identical.")
    _add_common(swap, plot_help="bars of copies per swap, swap seconds and tokens/s")
    swap.add_argument("--group-sizes", default="8,0",
                      help="comma-separated block group sizes; 0 is off (default: %(default)s)")
    swap.set_defaults(func=cmd_swap, num_blocks=48, workload="random", num_requests=24,
                      input_len=96, output_len=160)

    from tierserve.bench.batch import add_batch_subcommand
    from tierserve.bench.batch_api import add_batch_api_subcommand
    from tierserve.bench.capacity import add_capacity_subcommand
    from tierserve.bench.faults import add_faults_subcommand
    from tierserve.bench.grammar_engines import add_grammar_engines_subcommand
    from tierserve.bench.offline import add_offline_subcommand
    from tierserve.bench.quant import add_quant_subcommand
    from tierserve.bench.roofline import add_roofline_subcommand
    from tierserve.bench.shared_prefix import add_shared_prefix_subcommand
    from tierserve.bench.structured import add_structured_subcommand

    add_batch_subcommand(sub, _add_common)
    add_batch_api_subcommand(sub)
    add_offline_subcommand(sub, _add_common)
    add_capacity_subcommand(sub, _add_common)
    add_roofline_subcommand(sub, _add_common)
    add_faults_subcommand(sub, _add_common)
    add_shared_prefix_subcommand(sub, _add_common)
    add_structured_subcommand(sub, _add_common)
    add_grammar_engines_subcommand(sub)
    add_quant_subcommand(sub, _add_common)


def _add_longctx(sub) -> None:
    from tierserve.bench import longctx

    parser = sub.add_parser("longctx", help="long-context KV selection: decode step, attention "
                            "and selection time, KV bytes read, per policy and budget",
                            description=longctx.DESCRIPTION)
    longctx.add_arguments(parser)
    parser.set_defaults(func=longctx.run)


def _add_moe(sub) -> None:
    moe = sub.add_parser(
        "moe", help="MoE expert offloading: every expert policy against all-resident",
        description="One seeded text workload (windows of the Python docs, ShareGPT-like "
        "lengths) all at once at --concurrency: first with every expert resident (reference "
        "tokens and true routes), then per policy with --expert-cache slots and the disk tier "
        "(page cache dropped). Reports hit ratio, prefetch and predictor precision/recall, "
        "distinct experts per step, stall time, MiB read per token, tok/s, resident bytes.")
    moe.add_argument("--model", required=True, help="an MoE folder (e.g. from tierserve moefy)")
    moe.add_argument("--policies", default="lru,static,lookahead,expertflow,oracle,"
                     "expertflow+regroup",
                     help="expert policies; +regroup adds the expert-grouped scheduling policy, "
                     "+pin pins half the slots from --train-trace (expertflow), +victim puts a "
                     "victim buffer of --victim-buffer experts in front of the slow tier, "
                     "+window0 lifts the prefetch window (any number of loads in flight), "
                     "+cpu runs misses of at most --host-compute rows on the host tier's weights "
                     "instead of loading them (Fiddler; needs --expert-host-format) "
                     "(default: %(default)s)")
    moe.add_argument("--host-compute", type=int, default=4, metavar="ROWS",
                     help="the +cpu runs' --expert-host-compute (default: %(default)s)")
    moe.add_argument("--victim-buffer", default="25%",
                     help="experts in the +victim runs' buffer: a count or a percentage of all "
                     "experts (default: %(default)s)")
    moe.add_argument("--expert-cache", default="25%",
                     help="fast slots: a count or a percentage of all experts (default: %(default)s)")
    moe.add_argument("--train-trace", default=None,
                     help="trace of other prompts (tierserve moe trace) for static")
    moe.add_argument("--predictor", default=None,
                     help="predictor folder (tierserve moe train-predictor) for expertflow")
    moe.add_argument("--expert-host-format", default="none", choices=["none", "float", "q8", "q4"])
    moe.add_argument("--num-requests", type=int, default=32, help="(default: %(default)s)")
    moe.add_argument("--concurrency", type=int, default=32, help="max running requests "
                     "(default: %(default)s)")
    moe.add_argument("--scale", type=float, default=0.25, help="ShareGPT length multiplier "
                     "(default: %(default)s)")
    moe.add_argument("--seed", type=int, default=1, help="workload seed; use another than the "
                     "training trace's (default: %(default)s)")
    moe.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    moe.add_argument("--replay-routes", default=None,
                     help="force every MoE layer's choices to this trace's (by prompt and "
                     "position): a random-weight model (tierserve moe mixtral-like) on a real "
                     "model's routes; record the trace with tierserve moe trace on the same "
                     "--num-requests, --seed and --scale")
    moe.add_argument("--dtype", default="float32")
    moe.add_argument("--json", default=None, help="write {machine, config, results} here")
    moe.add_argument("--plot", default=None, help="write a PNG: hit ratio, distinct experts, tok/s")
    moe.add_argument("--no-progress", action="store_true", help="no progress bar")
    moe.set_defaults(func=cmd_moe)


def cmd_moe(args: argparse.Namespace) -> int:
    from tierserve.bench.moe import MOE_COLUMNS, MoeSpec, run_moe
    from tierserve.bench.report import plot_bars

    spec = MoeSpec(model=args.model, policies=_names(args.policies),
                   expert_cache=args.expert_cache, num_requests=args.num_requests,
                   concurrency=args.concurrency, seed=args.seed, scale=args.scale,
                   train_trace=args.train_trace, predictor=args.predictor,
                   host_format=args.expert_host_format, threads=args.threads,
                   replay_routes=args.replay_routes, victim_buffer=args.victim_buffer,
                   host_compute=args.host_compute)
    result = run_moe(spec, progress=not args.no_progress)
    _finish(args, result.config, result.results, MOE_COLUMNS,
            extra={"per_layer_hit_ratio": result.per_layer_hits})
    if args.plot:
        plot_bars(result.results, [("hit_ratio", "expert hit ratio"),
                                   ("distinct_experts_per_step", "distinct experts per step"),
                                   ("output_tokens_per_s", "output tokens/s")],
                  args.plot, f"MoE offloading, {result.config['expert_cache_slots']} of "
                  f"{result.config['total_experts']} experts resident")
        print(f"wrote {args.plot}")
    same = all(row.get("same_tokens") for row in result.results.values())
    print(f"every policy's tokens equal {result.config['tokens_checked_against']}: {same}")
    return 0 if same else 1


def _add_common(parser: argparse.ArgumentParser, plot_help: str) -> None:
    from tierserve.bench.workloads import WORKLOADS
    from tierserve.cli import add_engine_args

    add_engine_args(parser)
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="device KV blocks (overrides --kv-cache-memory)")
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", default="sharegpt-like", choices=list(WORKLOADS),
                       help="synthetic workload (default: %(default)s)")
    group.add_argument("--dataset", default=None,
                       help='JSONL file, one {"prompt": ...} or {"prompt_token_ids": [...]} per '
                       'line, optional "max_tokens" (replaces --workload)')
    group.add_argument("--num-requests", type=int, default=None,
                       help="number of requests (online: stop arrivals after this many)")
    group.add_argument("--scale", type=float, default=1.0,
                       help="multiply synthetic lengths by this, for small machines "
                       "(default: %(default)s)")
    group.add_argument("--max-prompt-len", type=int, default=4096)
    group.add_argument("--max-output-len", type=int, default=2048)
    group.add_argument("--long-prompt-fraction", "--mix-long", type=float, default=0.0,
                       help="fraction of requests given a long prompt (default: %(default)s)")
    group.add_argument("--long-prompt-len", default="1000,2000",
                       help="LOW,HIGH tokens of a long prompt, not scaled (default: %(default)s)")
    group.add_argument("--input-len", type=int, default=128, help="random: prompt tokens")
    group.add_argument("--output-len", type=int, default=128,
                       help="random, shared-prefix, multi-turn: output tokens")
    group.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix, many-groups: prefixes")
    group.add_argument("--prefix-len", type=int, default=512, help="shared-prefix, nested, snippet-like: prefix (document) tokens; many-groups: "
                       "the shortest prefix (the longest is twice that)")
    group.add_argument("--question-len", type=int, default=32,
                       help="shared-prefix question / multi-turn user message tokens")
    group.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, help="write {machine, config, results} here")
    out.add_argument("--plot", default=None, help=f"write a PNG: {plot_help}")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _workload_spec(args: argparse.Namespace, num_requests: int):
    from tierserve.bench.workloads import WorkloadSpec

    return WorkloadSpec(
        name=args.workload, num_requests=num_requests, seed=args.seed, scale=args.scale,
        max_prompt_len=args.max_prompt_len, max_output_len=args.max_output_len,
        long_prompt_fraction=args.long_prompt_fraction,
        long_prompt_len=_int_pair(args.long_prompt_len, "--long-prompt-len"),
        input_len=args.input_len, output_len=args.output_len, num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len, question_len=args.question_len, turns=args.turns,
        dataset=args.dataset, dataset_max_tokens=args.output_len)


def _engine_config(args: argparse.Namespace):
    from tierserve.cli import engine_config_from_args

    config = engine_config_from_args(args)
    if args.num_blocks is not None:
        config.cache.num_blocks = args.num_blocks
    return config


def _int_pair(text: str, flag: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{flag} takes LOW,HIGH token counts, e.g. 1000,2000; got {text!r}")
    return int(parts[0]), int(parts[1])


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _finish(args: argparse.Namespace, config: dict, results: dict, columns, extra=None,
            dtype: str | None = None, machine_notes: dict | None = None) -> None:
    from tierserve.bench.report import format_table, machine_info, machine_line, write_json

    machine = {**machine_info(dtype or args.dtype), **(machine_notes or {})}
    print(machine_line(machine))
    print(format_table(results, columns))
    if args.json:
        config = {"argv": shlex.join(sys.argv), **config}
        write_json(args.json, {"machine": machine, "config": config, "results": results,
                               **(extra or {})})
        print(f"wrote {args.json}")


def cmd_online(args: argparse.Namespace) -> int:
    from tierserve.bench.online import ONLINE_COLUMNS, OnlineSpec, run_online, run_online_remote
    from tierserve.bench.report import plot_latency_cdfs

    if args.url and args.policies:
        raise ValueError("--policies picks in-process engines; with --url, start one server per "
                         "policy and name them: --url sarathi=http://127.0.0.1:8000,"
                         "fcfs=http://127.0.0.1:8001")
    duration = args.duration if args.duration is not None or args.num_requests else 60.0
    spec = OnlineSpec(workload=_workload_spec(args, args.num_requests or 0),
                      request_rate=args.request_rate, duration=duration,
                      num_requests=args.num_requests,
                      policies=_names(args.policies or ONLINE_DEFAULT_POLICIES), seed=args.seed)
    if args.url:
        from tierserve.bench.remote import parse_targets
        from tierserve.model.hub import resolve_model

        result = run_online_remote(parse_targets(args.url), spec, resolve_model(args.model),
                                   api_key=args.api_key, progress=not args.no_progress)
    else:
        result = run_online(_engine_config(args), spec, progress=not args.no_progress)
    # Over HTTP the machine line is the client's; the servers' dtype is not known here.
    _finish(args, result.config, result.results, ONLINE_COLUMNS,
            machine_notes={"dtype": "the servers'", "measured_from": "client"} if args.url
            else None)
    if args.plot and not any(sample["ttft"] for sample in result.samples.values()):
        print(f"no request finished: {args.plot} not written")
    elif args.plot:
        plot_latency_cdfs(result.samples, args.plot,
                          f"{args.workload}, {args.request_rate} req/s, {args.model}"
                          + (" (over HTTP)" if args.url else ""))
        print(f"wrote {args.plot}")
    failed = {name: row["failed_requests"] for name, row in result.results.items()
              if row["failed_requests"]}
    for name, count in failed.items():
        print(f"{name}: {count} requests failed; first: {result.errors[name][0]}")
    return 1 if failed else 0


def cmd_fairness(args: argparse.Namespace) -> int:
    from tierserve.bench.fairness import FAIRNESS_COLUMNS, FairnessSpec, run_fairness
    from tierserve.bench.report import plot_service

    spec = FairnessSpec(workload=_workload_spec(args, 0), heavy_requests=args.heavy_requests,
                        heavy_rate=args.heavy_rate, light_clients=args.light_clients,
                        light_rate=args.light_rate, duration=args.duration,
                        policies=_names(args.policies), seed=args.seed)
    result = run_fairness(_engine_config(args), spec, progress=not args.no_progress)
    _finish(args, result.config, result.results, FAIRNESS_COLUMNS)
    if args.plot:
        plot_service(result.service, args.plot,
                     f"cumulative service per client ({args.heavy_requests} heavy requests, "
                     f"{args.light_clients} light clients)")
        print(f"wrote {args.plot}")
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from tierserve.bench.report import plot_bars
    from tierserve.bench.swap import SWAP_COLUMNS, SwapSpec, run_swap

    spec = SwapSpec(workload=_workload_spec(args, args.num_requests or 24),
                    group_sizes=tuple(int(g) for g in _names(args.group_sizes)))
    result = run_swap(_engine_config(args), spec, progress=not args.no_progress)
    _finish(args, result.config, result.results, SWAP_COLUMNS,
            extra={"outputs_identical": result.outputs_identical})
    print(f"greedy outputs identical across block group sizes: {result.outputs_identical}")
    if args.plot:
        plot_bars(result.results, [("copies_per_swap_mean", "copies per swap (mean)"),
                                   ("swap_seconds_total", "swap copy seconds (total)"),
                                   ("output_tokens_per_s", "output tokens/s")],
                  args.plot, f"swap preemption, {args.num_blocks} device blocks")
        print(f"wrote {args.plot}")
    return 0 if result.outputs_identical else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tierserve.bench.cli online|fairness|swap|batch|offline|capacity ...``"""
    parser = argparse.ArgumentParser(prog="tierserve bench", description="tierserve benchmarks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    _add_subcommands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # a clean message for bad flags and unreachable servers
        from tierserve.bench.remote import RemoteError

        if isinstance(exc, (ValueError, RemoteError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
