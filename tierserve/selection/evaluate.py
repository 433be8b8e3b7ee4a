"""Long-context quality of each KV-selection policy against full KV on the tasks of tasks.py:
accuracy, and how many of full KV's greedy tokens each policy reproduces.

    python -m tierserve.selection.evaluate --tasks passkey,needle --lengths 2048 --samples 10

Greedy, 12 new tokens. Agreement is the share of positions where the policy's greedy token
equals full KV's until the first difference (free-running, not teacher-forced).
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from tierserve.selection.tasks import correct, make_samples


def _agreement(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(b), 1)


def evaluate(model: str, tasks: list[str], lengths: list[int], samples: int,
             policies: list[tuple[str, float]], dtype: str = "bfloat16") -> list[dict]:
    """One row per (task, length, policy, budget)."""
    from tierserve.engine.llm import LLM
    from tierserve.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12)
    rows, reference = [], {}
    for name, budget in [("full", 1.0), *policies]:
        llm = LLM(model=model, dtype=dtype, kv_selection=name, kv_budget=budget,
                  max_num_batched_tokens=512, enable_prefix_caching=False)
        tokenizer = llm.engine.tokenizer
        for task in tasks:
            for length in lengths:
                cases = make_samples(tokenizer, task, length, samples)
                outputs = llm.generate([tokenizer.encode(case.prompt) for case in cases], params,
                                       use_tqdm=False)
                tokens = [o.outputs[0].token_ids for o in outputs]
                texts = [o.outputs[0].text for o in outputs]
                key = (task, length)
                if name == "full":
                    reference[key] = tokens
                rows.append({
                    "task": task, "length": length, "policy": name, "budget": budget,
                    "accuracy": sum(correct(c, t) for c, t in zip(cases, texts)) / len(cases),
                    "agreement": sum(_agreement(t, r) for t, r in zip(tokens, reference[key]))
                    / len(cases),
                    "answers": texts,
                })
                tqdm.write(f"{task} {length} {name} {budget}: accuracy {rows[-1]['accuracy']:.2f}"
                           f" agreement {rows[-1]['agreement']:.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierserve.selection.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="passkey,needle")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--policies", default="streaming,quest,mpcache")
    parser.add_argument("--budgets", default="0.1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    policies = [(p, float(b)) for p in args.policies.split(",") for b in args.budgets.split(",")]
    rows = evaluate(args.model, args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
                    args.samples, policies)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"config": vars(args), "results": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
