"""MPCache ablation on needle at 2k, 20% budget, 8 samples (docs/benchmarks.md): without level 1, without layer-pair sharing, without both. Run: .venv/bin/python docs/results/longctx-mpcache-ablation.py"""

from tierserve.engine.llm import LLM
from tierserve.request import SamplingParams
from tierserve.selection import policies
from tierserve.selection.tasks import correct, make_samples

params = SamplingParams(temperature=0.0, max_tokens=12)


def run(label, **kw):
    llm = LLM(
        model="smollm2",
        dtype="bfloat16",
        kv_selection="mpcache",
        kv_budget=0.2,
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
        **kw,
    )
    tok = llm.engine.tokenizer
    cases = make_samples(tok, "needle", 2048, 8)
    outs = llm.generate([tok.encode(c.prompt) for c in cases], params, use_tqdm=False)
    print(label, sum(correct(c, o.outputs[0].text) for c, o in zip(cases, outs)) / 8, flush=True)


run("mpcache 0.2 no level 1", mpcache_level1_keep=1.0)
policies.MPCache.shares_layer_pairs = False
run("mpcache 0.2 no layer-pair sharing")
run("mpcache 0.2 no sharing, no level 1", mpcache_level1_keep=1.0)
