"""`tierserve bench structured`: what structured outputs cost and whether they hold.

- **Validity**: ``--num-schemas`` seeded random JSON schemas (nested objects, enums, arrays,
  integers and numbers with bounds, bounded strings; every property required, no others), one
  chat request each, greedy, all in one batch; each output is checked with ``jsonschema``.
- **Compile time**: per schema, the grammar text (llguidance's ``grammar_from``) and a matcher
  for the model's vocabulary, cold (the first of each schema) and warm (cached).
- **Throughput**: ``--batch`` requests with a schema against the same requests unconstrained,
  each made to write exactly as many tokens as its constrained twin did (``ignore_eos``), so the
  two runs decode the same lengths; prefix caching is off, so both compute every prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

COLUMNS = ("requests", "output_tokens", "wall_s", "output_tokens_per_s", "valid_share")


def add_structured_subcommand(sub, add_common) -> None:
    parser = sub.add_parser(
        "structured", help="structured outputs: validity over seeded schemas, grammar compile "
        "time, throughput against unconstrained",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, plot_help="bars of throughput")
    parser.add_argument("--num-schemas", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="requests in the throughput runs")
    parser.set_defaults(func=cmd_structured, output_len=256)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of 1-4 required properties, nesting at most two objects deep."""
    properties = {}
    for index in range(rng.randint(1, 4)):
        kinds = ["string", "integer", "number", "boolean", "enum", "array"]
        if depth < 2:
            kinds.append("object")
        kind = rng.choice(kinds)
        if kind == "string":
            spec = {"type": "string", "maxLength": rng.randint(3, 16)}
        elif kind == "integer":
            low = rng.randint(-100, 100)
            spec = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
        elif kind == "number":
            spec = {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
        elif kind == "boolean":
            spec = {"type": "boolean"}
        elif kind == "enum":
            spec = {"enum": rng.sample(["red", "green", "blue", "north", "south", "low", "high",
                                        "cat", "dog"], rng.randint(2, 4))}
        elif kind == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9},
                               {"enum": ["a", "b", "c"]}, {"type": "boolean"}])
            spec = {"type": "array", "items": item, "minItems": 1,
                    "maxItems": rng.randint(1, 4)}
        else:
            spec = random_schema(rng, depth + 1)
        properties[f"{kind}_{index}"] = spec
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def run_structured(config, num_schemas: int, batch: int, max_tokens: int, seed: int = 0,
                   progress: bool = True) -> dict:
    import jsonschema

    from tierserve.bench.harness import open_engine
    from tierserve.request import SamplingParams
    from tierserve.structured import StructuredOutputs, grammar_text

    # No prefix caching: the second throughput run would otherwise find the first's prompts
    # cached and skip their prefill (measured: that alone looked like a 25% cost of the masks).
    config = copy.deepcopy(config)
    config.cache.enable_prefix_caching = False
    llm = open_engine(config)
    rng = random.Random(seed)
    schemas = [random_schema(rng) for _ in range(num_schemas)]
    constraints = llm.core.constraints
    constraints.tokenizer  # noqa: B018 - built once, outside the timings

    # Compile time: cold (nothing cached) then warm, per schema.
    cold, warm = [], []
    for schema in schemas:
        spec = StructuredOutputs(json=schema)
        grammar_text.cache_clear()
        constraints._checked.clear()
        started = time.perf_counter()
        constraints.check(spec)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        constraints.check(spec)
        warm.append(time.perf_counter() - started)

    def conversation(schema):
        return [{"role": "user", "content": "Write one example JSON value for this schema, "
                 f"nothing else: {json.dumps(schema)}"}]

    # Validity: every schema once, greedy, in one batch.
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                             structured_outputs=StructuredOutputs(json=s)) for s in schemas]
    outputs = llm.chat([conversation(s) for s in schemas], params, use_tqdm=progress)
    valid = stopped = 0
    failures = []
    for schema, output in zip(schemas, outputs):
        completion = output.outputs[0]
        stopped += completion.finish_reason == "stop"
        try:
            jsonschema.validate(json.loads(completion.text), schema)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            failures.append({"finish_reason": completion.finish_reason,
                             "error": str(exc)[:200], "text": completion.text[:200]})

    # Throughput: constrained, then the same requests free, at the constrained lengths.
    chosen = [schemas[i % num_schemas] for i in range(batch)]
    conversations = [conversation(s) for s in chosen]
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                             structured_outputs=StructuredOutputs(json=s)) for s in chosen]
    started = time.perf_counter()
    constrained = llm.chat(conversations, params, use_tqdm=progress)
    constrained_wall = time.perf_counter() - started
    lengths = [len(o.outputs[0].token_ids) for o in constrained]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    started = time.perf_counter()
    free = llm.chat(conversations, params, use_tqdm=progress)
    free_wall = time.perf_counter() - started
    assert [len(o.outputs[0].token_ids) for o in free] == lengths
    llm.engine.runner.close()
    tokens = sum(lengths)
    results = {
        "json-schema": {"requests": batch, "output_tokens": tokens,
                        "wall_s": round(constrained_wall, 2),
                        "output_tokens_per_s": round(tokens / constrained_wall, 1),
                        "valid_share": round(valid / num_schemas, 4)},
        "unconstrained": {"requests": batch, "output_tokens": tokens,
                          "wall_s": round(free_wall, 2),
                          "output_tokens_per_s": round(tokens / free_wall, 1)},
    }
    extra = {"validity": {"schemas": num_schemas, "valid": valid, "stopped": stopped,
                          "failures": failures},
             "compile_ms": {"cold_median": round(1e3 * statistics.median(cold), 2),
                            "cold_max": round(1e3 * max(cold), 2),
                            "warm_median": round(1e3 * statistics.median(warm), 3)},
             "throughput_ratio": round(free_wall / constrained_wall, 3)}
    return {"results": results, "extra": extra}


def cmd_structured(args) -> int:
    from tierserve.bench import cli
    from tierserve.bench.report import plot_bars

    outcome = run_structured(cli._engine_config(args), args.num_schemas, args.batch,
                             args.output_len, args.seed, progress=not args.no_progress)
    extra = outcome["extra"]
    cli._finish(args, {"num_schemas": args.num_schemas, "batch": args.batch,
                       "max_tokens": args.output_len, "seed": args.seed},
                outcome["results"], COLUMNS, extra=extra)
    validity, compile_ms = extra["validity"], extra["compile_ms"]
    print(f"valid: {validity['valid']} of {validity['schemas']} schemas "
          f"({validity['stopped']} stopped at the end of their JSON)")
    print(f"grammar compile: {compile_ms['cold_median']} ms median cold (max "
          f"{compile_ms['cold_max']} ms), {compile_ms['warm_median']} ms warm")
    print(f"constrained / unconstrained output tok/s: {extra['throughput_ratio']:.3f}")
    if args.plot:
        plot_bars(outcome["results"], [("output_tokens_per_s", "output tok/s")], args.plot,
                  f"JSON-schema outputs vs unconstrained, batch {args.batch}")
        print(f"wrote {args.plot}")
    return 0
