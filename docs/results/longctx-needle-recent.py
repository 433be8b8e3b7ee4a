"""Needle at 2k, 10% budget, 16 samples, float32 (docs/benchmarks.md, "Reference check"): full KV,
Quest and MPCache with 1, 2 or 4 recent blocks always kept, and MPCache without layer-pair
sharing. Run: .venv/bin/python docs/results/longctx-needle-recent.py"""

import time

from tierserve.engine.llm import LLM
from tierserve.request import SamplingParams
from tierserve.selection import policies
from tierserve.selection.tasks import correct, make_samples

PARAMS = SamplingParams(temperature=0.0, max_tokens=12)
SAMPLES = 16


def run(label, **options):
    started = time.time()
    llm = LLM(model="smollm2", dtype="float32", max_num_batched_tokens=512,
              enable_prefix_caching=False, **options)
    tok = llm.engine.tokenizer
    cases = make_samples(tok, "needle", 2048, SAMPLES)
    outs = llm.generate([tok.encode(c.prompt) for c in cases], PARAMS, use_tqdm=False)
    accuracy = sum(correct(c, o.outputs[0].text) for c, o in zip(cases, outs)) / SAMPLES
    print(f"{label}: {accuracy:.4f} ({time.time() - started:.0f} s)", flush=True)
    llm.engine.runner.close()


run("full KV")
run("quest 0.1", kv_selection="quest", kv_budget=0.1)
run("quest 0.1, 4 recent blocks", kv_selection="quest", kv_budget=0.1, kv_recent_blocks=4)
for recent in (1, 2, 4):
    run(f"mpcache 0.1, {recent} recent blocks", kv_selection="mpcache", kv_budget=0.1,
        kv_recent_blocks=recent)
policies.MPCache.shares_layer_pairs = False
run("mpcache 0.1, no layer-pair sharing", kv_selection="mpcache", kv_budget=0.1)
