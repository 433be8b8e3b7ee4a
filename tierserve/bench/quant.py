"""`tierserve bench quant`: what packed weights (--quantization) cost in quality and buy in speed.

Every format in ``--formats`` is loaded into one process beside the others. Against the first
(the reference, normally ``none``: the GGUF dequantized to float32), each reports:
- greedy agreement: ``--prompts`` chat prompts x ``--max-tokens`` tokens, the share of tokens
  equal to the reference before the first divergence, and at each divergence the reference's
  margin between its top two tokens (a near-tie is a margin under ``--near-tie``);
- perplexity on held text (Python's own documentation, pydoc_data; ``--ppl-tokens`` tokens);
- decode tokens/s of one request alone and prefill tokens/s of one ``--prefill-len`` prompt,
  timed in alternating rounds so every format sees the same machine state (medians);
- resident weight bytes (linears, embedding and head; a tied head counted once).
``--quantization`` is ignored here (``--formats`` sets it per engine). With float32's batch
invariance (the default) packed linears use the integer kernel at every row count, perplexity
and prefill included; ``--no-batch-invariant`` lets prefill-sized calls take the float GEMM.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

COLUMNS = ("weight_mb", "weight_ratio", "agreement", "near_tie_divergences", "perplexity",
           "ppl_ratio", "decode_tokens_per_s", "decode_ratio", "prefill_tokens_per_s",
           "prefill_ratio")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does a CPU cache do?",
]


def add_quant_subcommand(sub, add_common) -> None:
    parser = sub.add_parser("quant", help="packed weights against the float model: tokens, "
                            "perplexity, decode and prefill speed, memory",
                            description=__doc__.split("\n\n", 1)[1])
    add_common(parser, plot_help="bars of each format's ratios to the reference")
    parser.add_argument("--formats", default="none,gguf",
                        help="--quantization values, the first is the reference "
                        "(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=6, help="chat prompts (at most 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--near-tie", type=float, default=0.5,
                        help="top-2 logprob margin under which a divergence is a near-tie")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.set_defaults(func=cmd_quant)


def cmd_quant(args) -> int:
    from tierserve.bench.cli import _engine_config, _finish
    from tierserve.config import QUANTIZATIONS

    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = [name for name in formats if name not in QUANTIZATIONS]
    if unknown or not formats:
        raise ValueError(f"--formats takes --quantization values ({', '.join(QUANTIZATIONS)}); "
                         f"got {', '.join(unknown) or 'none'}")
    config = _engine_config(args)
    results = run_quant(config, formats, args.prompts, args.max_tokens, args.near_tie,
                        args.ppl_tokens, args.decode_tokens, args.prefill_len, args.rounds)
    settings = {"formats": formats, "prompts": args.prompts, "max_tokens": args.max_tokens,
                "near_tie": args.near_tie, "ppl_tokens": args.ppl_tokens,
                "decode_tokens": args.decode_tokens, "prefill_len": args.prefill_len,
                "rounds": args.rounds}
    _finish(args, settings, results, COLUMNS)
    if args.plot:
        from tierserve.bench.report import plot_bars

        plot_bars(results, [("weight_ratio", "weights / reference"),
                            ("decode_ratio", "decode tok/s / reference"),
                            ("prefill_ratio", "prefill tok/s / reference"),
                            ("ppl_ratio", "perplexity / reference")], args.plot,
                  title=f"packed weights against {formats[0]}")
    return 0


def run_quant(config, formats: list[str], prompts: int, max_tokens: int, near_tie: float,
              ppl_tokens: int, decode_tokens: int, prefill_len: int, rounds: int) -> dict:
    import copy

    from tierserve.bench.harness import open_engine

    engines = {}
    for name in formats:
        variant = copy.deepcopy(config)
        variant.model.quantization = name
        engines[name] = open_engine(variant)
    reference = formats[0]
    chats = [[{"role": "user", "content": text}] for text in PROMPTS[:prompts]]
    tokens = {name: _greedy(llm, chats, max_tokens) for name, llm in engines.items()}
    margins = _top2_margins(engines[reference], chats, max_tokens)
    results = {}
    for name, llm in engines.items():
        results[name] = {"weight_mb": round(weight_bytes(llm.engine.runner.model) / 2**20, 1),
                         "perplexity": round(_perplexity(llm, ppl_tokens), 4),
                         **_agreement(tokens[reference], tokens[name], margins, near_tie)}
    timings = _timed_rounds(engines, decode_tokens, prefill_len, rounds)
    base = results[reference]
    for name, row in results.items():
        row.update(timings[name])
        row["weight_ratio"] = round(row["weight_mb"] / base["weight_mb"], 3)
        row["ppl_ratio"] = round(row["perplexity"] / base["perplexity"], 4)
        for metric in ("decode", "prefill"):
            row[f"{metric}_ratio"] = round(row[f"{metric}_tokens_per_s"]
                                           / timings[reference][f"{metric}_tokens_per_s"], 3)
    return results


def weight_bytes(model) -> int:
    """Bytes of the model's weights as they sit in memory (each tensor once: a tied head is
    the embedding)."""
    weights = {id(w): w for w in [model.embed, *(lin.weight for lin in model.linears())]}
    return sum(w.nbytes for w in weights.values())  # a tensor's, or a PackedWeight's blocks


def _greedy(llm, chats, max_tokens: int) -> list[list[int]]:
    from tierserve.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(out.outputs[0].token_ids) for out in llm.chat(chats, params, use_tqdm=False)]


def _top2_margins(llm, chats, max_tokens: int) -> list[list[float]]:
    from tierserve.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    margins = []
    for out in llm.chat(chats, params, use_tqdm=False):
        steps = out.outputs[0].logprobs
        margins.append([_margin(step) for step in steps])
    return margins


def _margin(step: dict) -> float:
    values = sorted((entry.logprob for entry in step.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def _agreement(reference: list[list[int]], tokens: list[list[int]], margins, near_tie: float
               ) -> dict:
    """Tokens equal before each prompt's first divergence, over all tokens; and the divergences
    whose reference margin is under ``near_tie``."""
    equal, total, gaps = 0, 0, []
    for ref, got, margin in zip(reference, tokens, margins):
        total += len(ref)
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
        equal += first
        if first < len(ref):
            gaps.append(round(margin[first], 4))
    ties = sum(gap < near_tie for gap in gaps)
    return {"agreement": round(equal / total, 4), "divergence_margins": gaps,
            "near_tie_divergences": f"{ties}/{len(gaps)}"}


def _perplexity(llm, total: int) -> float:
    from tierserve.model.moefy import calibration_text, engine_perplexity, token_chunks

    # Held text: skip the part moefy fits its routers on (its first 64k tokens at most).
    chunks = token_chunks(llm.engine.tokenizer, calibration_text(), total, 256, skip=65536)
    return engine_perplexity(llm, chunks)


def _timed_rounds(engines: dict, decode_tokens: int, prefill_len: int, rounds: int) -> dict:
    from tierserve.bench.harness import token_space
    from tierserve.request import SamplingParams

    first = next(iter(engines.values()))
    rng = np.random.default_rng(0)
    space = token_space(first)
    decode = {name: [] for name in engines}
    prefill = {name: [] for name in engines}
    for _ in range(rounds):
        prompt = space.draw(rng, 32)
        long_prompt = space.draw(rng, prefill_len)  # fresh tokens: no prefix-cache hit
        for name, llm in engines.items():
            params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
            llm.generate([prompt], params, use_tqdm=False)
            times = llm.core.metrics.finished_timelines()[-1].token_times
            decode[name].append((len(times) - 1) / (times[-1] - times[0]))
            start = time.perf_counter()
            llm.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)
            prefill[name].append(prefill_len / (time.perf_counter() - start))
    return {name: {"decode_tokens_per_s": round(statistics.median(decode[name]), 2),
                   "prefill_tokens_per_s": round(statistics.median(prefill[name]), 1)}
            for name in engines}
