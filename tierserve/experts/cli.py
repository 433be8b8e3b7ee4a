"""``tierserve moe trace | train-predictor | predict | mixtral-like``: record router traces, fit
the routing-path predictor, write its predictions, write a random Mixtral-shaped model to replay
routes on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_moe_parser(subparsers) -> None:
    moe = subparsers.add_parser(
        "moe", help="MoE tools: router traces and the routing-path predictor",
        description="Tools for serving MoE models with offloaded experts (--expert-cache).")
    sub = moe.add_subparsers(dest="moe_command", required=True)
    trace = sub.add_parser(
        "trace", help="run prompts with every expert resident and record each token's experts",
        description="Generate greedily for text prompts (windows of the Python docs, ShareGPT-"
        "like lengths) and write one JSON line per request: prompt, output, and per MoE layer the "
        "top-k experts of every position. Feeds train-predictor, --expert-policy static and "
        "oracle.")
    trace.add_argument("model", help="an MoE model (HF folder or GGUF), e.g. one written by "
                       "tierserve moefy")
    trace.add_argument("out", help="trace file to write (.jsonl)")
    trace.add_argument("--num-requests", type=int, default=64, help="(default: %(default)s)")
    trace.add_argument("--seed", type=int, default=0, help="picks prompt places and lengths "
                       "(default: %(default)s)")
    trace.add_argument("--scale", type=float, default=0.25,
                       help="multiply ShareGPT's mean lengths (161 in, 338 out) by this "
                       "(default: %(default)s)")
    trace.add_argument("--max-num-seqs", type=int, default=32, help="(default: %(default)s)")
    trace.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    trace.set_defaults(func=cmd_trace)

    train = sub.add_parser(
        "train-predictor", help="fit the routing-path predictor on router traces",
        description="Train ExpertFlow's routing-path predictor (hashed prompt n-grams -> each "
        "MoE layer's expert shares) on traces, seeded; report held-out precision, recall and KL "
        "beside the traces' average (what a static hot set knows).")
    train.add_argument("traces", nargs="+", help="trace files from `tierserve moe trace`")
    train.add_argument("--out", required=True, help="folder for predictor.json and predictor.pt")
    train.add_argument("--epochs", type=int, default=300, help="(default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    train.add_argument("--num-experts", type=int, default=None,
                       help="experts per layer (default: the largest id in the traces + 1)")
    train.add_argument("--top-k", type=int, default=None,
                       help="experts per token (default: read from the traces)")
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser(
        "predict", help="predict each traced prompt's route with a trained predictor",
        description="Run the routing-path predictor on every prompt of a router trace and "
        "write one JSON line per prompt (its key and each MoE layer's expert shares): what "
        "`tierserve sim reproduce expertflow` replays without torch.")
    predict.add_argument("predictor", help="folder from `tierserve moe train-predictor`")
    predict.add_argument("trace", help="trace file from `tierserve moe trace`")
    predict.add_argument("out", help="file to write (.jsonl)")
    predict.set_defaults(func=cmd_predict)

    like = sub.add_parser(
        "mixtral-like", help="a random-weight Mixtral-shaped model with another MoE's layout",
        description="Write a random Mixtral folder with the layers, experts, top-k and tokenizer "
        "of LIKE, at expert sizes of a real model, for `tierserve bench moe --replay-routes`.")
    like.add_argument("like", help="an MoE folder, e.g. from tierserve moefy")
    like.add_argument("out", help="folder to write")
    like.add_argument("--hidden", type=int, default=512, help="(default: %(default)s)")
    like.add_argument("--expert-ffn", type=int, default=256,
                      help="each expert's width (default: %(default)s: 1.5 MiB per expert)")
    like.add_argument("--seed", type=int, default=0)
    like.set_defaults(func=cmd_mixtral_like)


def cmd_trace(args: argparse.Namespace) -> int:
    from tierserve.engine.llm import LLM
    from tierserve.experts.routes import write_traces
    from tierserve.experts.trace import RouteRecorder, text_requests
    from tierserve.request import SamplingParams

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, num_threads=args.threads,
              swap_space=0)
    recorder = RouteRecorder(llm.engine.runner)
    requests = text_requests(llm.tokenizer, args.num_requests, args.seed, args.scale)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in requests]
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params)
    traces = [recorder.trace(o.request_id, p, list(o.outputs[0].token_ids))
              for o, (p, _) in zip(outputs, requests)]
    count = write_traces(args.out, traces)
    positions = sum(t.num_positions for t in traces)
    print(f"wrote {args.out}: {count} requests, {positions} positions, "
          f"{len(traces[0].routes) if traces else 0} MoE layers")
    llm.engine.runner.close()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tierserve.experts.predictor import report_json, train_predictor
    from tierserve.experts.routes import read_traces, trace_layout

    traces = [t for path in args.traces for t in read_traces(path)]
    layers, seen_experts, seen_top_k = trace_layout(traces)
    num_experts = args.num_experts or seen_experts
    top_k = args.top_k or seen_top_k
    predictor, report = train_predictor(traces, layers, num_experts, top_k, args.epochs, args.seed)
    predictor.save(args.out)
    summary = report_json(report)
    (Path(args.out) / "report.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}; held out {report.held_out_requests} of {len(traces)} requests:")
    print(f"  predictor: precision {report.precision:.3f} recall {report.recall:.3f} "
          f"KL {report.kl:.3f}")
    print(f"  average:   precision {report.prior_precision:.3f} recall {report.prior_recall:.3f} "
          f"KL {report.prior_kl:.3f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tierserve.experts.predictor import RoutePredictor
    from tierserve.experts.routes import prompt_key, read_traces, write_predictions

    predictor = RoutePredictor.load(args.predictor)
    traces = read_traces(args.trace)
    count = write_predictions(args.out, {prompt_key(t.prompt): predictor.predict(t.prompt)
                                         for t in traces})
    print(f"wrote {args.out}: predicted routes of {count} prompts")
    return 0


def cmd_mixtral_like(args: argparse.Namespace) -> int:
    from tierserve.bench.moe import make_mixtral_like

    out = make_mixtral_like(args.out, args.like, args.hidden, args.expert_ffn, args.seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 2**20:.0f} MiB of weights")
    return 0
