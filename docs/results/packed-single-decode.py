"""Single-request packed decode speed of the tierserve on the import path (issue 19's A/B of two
commits: run it with PYTHONPATH set to each checkout, alternately).

SmolLM2-135M-Instruct Q4_1 kept packed, float32, 2 threads; one 64-token prompt, 128 greedy
tokens, after a warm-up; prints decode tokens/s (the first token excluded) for two runs.
Usage: PYTHONPATH=/path/to/checkout .venv/bin/python docs/results/packed-single-decode.py
"""

import torch

from tierserve import LLM
from tierserve.request import SamplingParams

torch.set_num_threads(2)
llm = LLM("smollm2", dtype="float32", quantization="gguf")
prompt = list(range(100, 164))
llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
             use_tqdm=False)
params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
for _ in range(2):
    llm.generate([prompt], params, use_tqdm=False)
    times = llm.core.metrics.finished_timelines()[-1].token_times
    print(f"decode tok/s {(len(times) - 1) / (times[-1] - times[0]):.1f}")
