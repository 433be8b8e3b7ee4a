# The "where the time goes" experiment of docs/benchmarks.md (MoE): 16 requests, 24 tokens each, on
# /tmp/smol_moe (tierserve moefy smollm2 /tmp/smol_moe --experts 16 --top-k 4), all experts
# resident vs 120 in slots with LRU loads on the copy worker vs the same loads done inline.
# python docs/results/moe-loads-inline-vs-worker.py resident|lru|sync
import time, sys, torch
from tierserve.engine.llm import LLM
from tierserve.experts.trace import text_requests
from tierserve.request import SamplingParams
torch.set_num_threads(2)
mode = sys.argv[1]
kw = dict(expert_cache="120", expert_policy="lru") if mode != "resident" else {}
llm = LLM("/tmp/smol_moe", swap_space=0, max_num_seqs=16, **kw)
if mode == "sync":
    ex = llm.engine.runner.experts
    from tierserve.model.kv_storage import SwapStats
    w = ex.worker
    def submit(key, ops):
        t = time.perf_counter(); moved = sum(ex.copy(op) for op in ops)
        with w._cond:
            w._finished.append(SwapStats(key, 1, 1, moved, time.perf_counter() - t))
    w.submit = submit
reqs = text_requests(llm.tokenizer, 16, 1, 0.1)
prompts = [{"prompt_token_ids": p} for p, _ in reqs]
params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
t = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t
print(mode, "seconds", round(dt, 2), "tok/s", round(16 * 24 / dt, 1))
