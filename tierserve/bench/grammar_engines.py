"""`tierserve bench grammar-engines`: llguidance against xgrammar on the same schemas and vocabulary.

For ``--num-schemas`` seeded schemas (the ``bench structured`` generator) and the model's
tokenizer: the time to compile each schema for the vocabulary (cold: caches off or cleared),
and the time to fill the next-token bitmasks of all the schemas' matchers at every token of one
valid instance each (each matcher then takes the token), one thread, as a decode step would.
Prompts, weights and sampling are not involved. xgrammar is optional (``pip install xgrammar``;
its own dependencies are not needed for this CPU measurement); without it only llguidance runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

COLUMNS = ("compile_ms_median", "compile_ms_max", "mask_ms_per_step", "steps")


def add_grammar_engines_subcommand(sub) -> None:
    parser = sub.add_parser("grammar-engines", help="llguidance vs xgrammar: compile and mask "
                            "time on seeded schemas", description=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="whose tokenizer (default: smollm2)")
    parser.add_argument("--num-schemas", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.set_defaults(func=cmd_grammar_engines)


def instance(schema: dict) -> object:
    """The smallest valid value of a ``bench structured`` schema."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema["type"]
    if kind == "object":
        return {name: instance(spec) for name, spec in schema["properties"].items()}
    if kind == "array":
        return [instance(schema["items"])] * schema.get("minItems", 0)
    if kind == "string":
        return "ab"
    if kind == "boolean":
        return True
    return schema.get("minimum", 0)


def _llguidance(tokenizer, vocab_size: int, eos: list[int], schemas, instances_ids):
    import llguidance
    import llguidance.torch as llt

    from tierserve.structured import StructuredOutputs, grammar_text

    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                   eos_token=eos[0])
    compile_s, matchers = [], []
    for schema in schemas:
        grammar_text.cache_clear()
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar_text(*StructuredOutputs(json=schema).key()),
                                       log_level=0)
        compile_s.append(time.perf_counter() - started)
        matchers.append(matcher)
    bitmask = llt.allocate_token_bitmask(1, vocab_size)
    return compile_s, _walk(matchers, instances_ids,
                            lambda m: llt.fill_next_token_bitmask(m, bitmask, 0),
                            lambda m, token: m.consume_token(token))


def _xgrammar(tokenizer, vocab_size: int, eos: list[int], schemas, instances_ids):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos)
    compile_s, matchers = [], []
    for schema in schemas:
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True,
                                                max_whitespace_cnt=32)
        matcher = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - started)
        matchers.append(matcher)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    return compile_s, _walk(matchers, instances_ids,
                            lambda m: m.fill_next_token_bitmask(bitmask, 0),
                            lambda m, token: m.accept_token(token))


def _walk(matchers, instances_ids, fill, accept) -> list[float]:
    """Seconds per step to fill every live matcher's mask; then each takes its next token."""
    step_s = []
    for step in range(max(map(len, instances_ids))):
        started = time.perf_counter()
        for matcher, ids in zip(matchers, instances_ids):
            if step < len(ids):
                fill(matcher)
        step_s.append(time.perf_counter() - started)
        for matcher, ids in zip(matchers, instances_ids):
            if step < len(ids) and not accept(matcher, ids[step]):
                raise RuntimeError(f"the grammar engine refused token {ids[step]}")
    return step_s


def cmd_grammar_engines(args) -> int:
    from tierserve.bench import cli
    from tierserve.bench.structured import random_schema
    from tierserve.model.hub import resolve_model
    from tierserve.model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_path(resolve_model(args.model))
    vocab_size = tokenizer.vocab_size
    eos = sorted(tokenizer.stop_token_ids)
    rng = random.Random(args.seed)
    schemas = [random_schema(rng) for _ in range(args.num_schemas)]
    instances_ids = [tokenizer.encode(json.dumps(instance(s)), add_special_tokens=False)
                     for s in schemas]
    engines = {"llguidance": _llguidance, "xgrammar": _xgrammar}
    results = {}
    for name, run in engines.items():
        try:
            compile_s, step_s = run(tokenizer, vocab_size, eos, schemas, instances_ids)
        except ImportError as exc:
            print(f"{name}: not installed ({exc}); skipped")
            continue
        results[name] = {"compile_ms_median": round(1e3 * statistics.median(compile_s), 3),
                         "compile_ms_max": round(1e3 * max(compile_s), 3),
                         "mask_ms_per_step": round(1e3 * statistics.mean(step_s), 3),
                         "steps": len(step_s)}
    cli._finish(args, {"model": args.model, "num_schemas": args.num_schemas,
                       "seed": args.seed, "vocab_size": vocab_size,
                       "instance_tokens": sum(map(len, instances_ids))}, results, COLUMNS,
                dtype="n/a")
    return 0
