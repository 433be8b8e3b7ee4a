"""Long-context quality of each KV policy against full KV on the tasks of tasks.py: accuracy,
free-running agreement, and teacher-forced fidelity.

    python -m tierserve.selection.evaluate --tasks passkey,needle --lengths 2048 --samples 8 \\
        --policies streaming,quest,mpcache,snapkv,mpcache-static,mpcache-both --budgets 0.1

Policies, each at a budget B (the share of the context a decode reads):
- ``streaming``, ``quest``, ``mpcache``: dynamic selection (--kv-selection) of B of the blocks;
- ``snapkv``, ``mpcache-static``: static eviction after prefill (--kv-eviction) keeping B;
- ``mpcache-both``: MPCache's two stages: static eviction keeps half the prompt, then dynamic
  selection reads 2B of what is left (B of the whole).

Accuracy: greedy, 12 new tokens, the answer found in the text. Agreement: the share of
positions where the policy's greedy token equals full KV's until the first difference.
Fidelity, teacher-forced on the answer's tokens (each policy is fed the true answer): top-1
agreement with full KV's logits, mean KL(full || policy), and the policy's mean answer NLL, over
the answer tokens after the first (the first is sampled from the prefill, which every policy
attends densely, so it measures nothing).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from tierserve.selection.tasks import correct, make_samples

STATIC_SHARE = 0.5  # mpcache-both: the static stage keeps this much of the prompt


def policy_options(name: str, budget: float) -> dict:
    """Engine options of a policy at a budget (see the module docstring)."""
    if name == "full":
        return {}
    if name in ("streaming", "quest", "mpcache"):
        return dict(kv_selection=name, kv_budget=budget)
    if name in ("snapkv", "mpcache-static"):
        return dict(kv_eviction=name.split("-")[0], kv_eviction_budget=budget)
    if name == "mpcache-both":
        return dict(kv_eviction="mpcache", kv_eviction_budget=STATIC_SHARE,
                    kv_selection="mpcache", kv_budget=min(1.0, budget / STATIC_SHARE))
    raise ValueError(f"unknown policy {name!r}")


def _agreement(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(b), 1)


def _forcing(answer: list[int], rows: list[torch.Tensor]):
    """A logits processor that records each position's log-probabilities, then forces the
    answer's token there (teacher forcing through the normal decode path)."""

    def force(output_ids, logits):
        step = len(output_ids)
        rows.append(torch.log_softmax(logits.float(), -1).clone())
        forced = torch.full_like(logits, float("-inf"))
        forced[answer[step]] = 0.0
        return forced

    return force


def fidelity(policy: list[torch.Tensor], reference: list[torch.Tensor], answer: list[int]
             ) -> dict:
    """top1, kl, nll over answer positions 1.. (see the module docstring)."""
    pairs = list(zip(policy, reference, answer))[1:]
    if not pairs:
        return {"top1": 1.0, "kl": 0.0, "nll": 0.0}
    top1 = sum(int(p.argmax() == r.argmax()) for p, r, _ in pairs) / len(pairs)
    kl = sum(float((r.exp() * (r - p)).sum()) for p, r, _ in pairs) / len(pairs)
    nll = -sum(float(p[t]) for p, _, t in pairs) / len(pairs)
    return {"top1": top1, "kl": kl, "nll": nll}


def evaluate(model: str, tasks: list[str], lengths: list[int], samples: int,
             policies: list[tuple[str, float]], dtype: str = "bfloat16") -> list[dict]:
    """One row per (task, length, policy, budget)."""
    from tierserve.engine.llm import LLM
    from tierserve.request import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    rows, reference = [], {}
    for name, budget in [("full", 1.0), *policies]:
        llm = LLM(model=model, dtype=dtype, max_num_batched_tokens=512,
                  enable_prefix_caching=False, **policy_options(name, budget))
        tokenizer = llm.engine.tokenizer
        for task in tasks:
            for length in lengths:
                cases = make_samples(tokenizer, task, length, samples)
                prompts = [tokenizer.encode(case.prompt) for case in cases]
                outputs = llm.generate(prompts, greedy, use_tqdm=False)
                tokens = [o.outputs[0].token_ids for o in outputs]
                texts = [o.outputs[0].text for o in outputs]
                answers = [tokenizer.encode(" " + case.answer) for case in cases]
                forced = [[] for _ in cases]
                params = [SamplingParams(temperature=0.0, max_tokens=len(answer),
                                         ignore_eos=True,
                                         logits_processors=[_forcing(answer, rows_of)])
                          for answer, rows_of in zip(answers, forced)]
                llm.generate(prompts, params, use_tqdm=False)
                key = (task, length)
                if name == "full":
                    reference[key] = (tokens, forced)
                ref_tokens, ref_forced = reference[key]
                scores = [fidelity(p, r, a) for p, r, a in zip(forced, ref_forced, answers)]
                rows.append({
                    "task": task, "length": length, "policy": name, "budget": budget,
                    "accuracy": sum(correct(c, t) for c, t in zip(cases, texts)) / len(cases),
                    "agreement": sum(_agreement(t, r) for t, r in zip(tokens, ref_tokens))
                    / len(cases),
                    **{metric: sum(s[metric] for s in scores) / len(scores)
                       for metric in ("top1", "kl", "nll")},
                    "answers": texts,
                })
                row = rows[-1]
                tqdm.write(f"{task} {length} {name} {budget}: accuracy {row['accuracy']:.2f} "
                           f"agreement {row['agreement']:.2f} top1 {row['top1']:.2f} "
                           f"kl {row['kl']:.3f} nll {row['nll']:.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierserve.selection.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="passkey,needle",
                        help="comma-separated: passkey, needle, multikey, vartrack")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--policies", default="streaming,quest,mpcache",
                        help="comma-separated: streaming, quest, mpcache, snapkv, "
                        "mpcache-static, mpcache-both")
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
