"""EleutherAI's lm-evaluation-harness scores through the server as users run it: `lm_eval --model
local-completions` against `tierserve serve` (echo + logprobs, its remote tokenizer found on our
/tokenizer_info and /tokenize) and `lm_eval --model hf` on the same GGUF weights in float32 must
agree: the same accuracy, and every choice's log-likelihood within 0.05. The hf side loads
transformers' own float32 dequantization of that GGUF, saved once as a safetensors folder
(loading the GGUF in the subprocess again would add ~50 s).

The task (30 general-knowledge questions, 4 choices each, shipped in tests/server/data) is local:
nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess

DATA = Path(__file__).parent / "data" / "general_knowledge_mc.jsonl"
TASK = """task: tierserve_general_knowledge
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _lm_eval(tmp_path: Path, name: str, *model: str) -> tuple[float, dict[int, list]]:
    """Run the lm_eval CLI; (accuracy, doc id -> [(loglikelihood, is_greedy) per choice])."""
    out = tmp_path / name
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [str(Path(sys.executable).with_name("lm_eval")), *model,
               "--tasks", "tierserve_general_knowledge", "--include_path", str(tmp_path),
               "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    (results,) = out.glob("*/results_*.json")
    accuracy = json.loads(results.read_text())["results"]["tierserve_general_knowledge"]["acc,none"]
    (samples,) = out.glob("*/samples_*.jsonl")
    scores = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        scores[sample["doc_id"]] = [(float(ll), greedy == "True")
                                    for ll, greedy in sample["filtered_resps"]]
    return accuracy, scores


@pytest.fixture(scope="module")
def hf_smollm2_dir(hf_smollm2, smollm2_path, tmp_path_factory):
    """The reference model and tokenizer, as transformers read them from the GGUF, saved."""
    import copy

    from transformers import AutoTokenizer

    from tierserve.bench.baselines import save_dense

    path = tmp_path_factory.mktemp("hf_smollm2")
    save_dense(copy.deepcopy(hf_smollm2), path)  # the session's model stays as loaded
    AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name
                                  ).save_pretrained(path)
    return path


@pytest.mark.slow
def test_lm_eval_through_the_server_matches_lm_eval_on_transformers(smollm2_path, hf_smollm2_dir,
                                                                     tmp_path):
    (tmp_path / "task.yaml").write_text(TASK.format(data=DATA))
    server = ServerProcess(smollm2_path, "--dtype", "float32", "--kv-cache-memory", "64MiB")
    try:
        served_acc, served = _lm_eval(
            tmp_path, "served", "--model", "local-completions", "--model_args",
            f"model=tiny,base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1")
    finally:
        server.stop()
    hf_acc, reference = _lm_eval(
        tmp_path, "hf", "--model", "hf", "--device", "cpu", "--batch_size", "16",
        "--model_args", f"pretrained={hf_smollm2_dir},dtype=float32")
    assert len(served) == len(reference) == 30
    assert served_acc == hf_acc and served_acc > 0.5  # far above chance (0.25)
    for doc_id, choices in reference.items():
        for (served_ll, served_greedy), (hf_ll, hf_greedy) in zip(served[doc_id], choices):
            assert abs(served_ll - hf_ll) < 0.05, (doc_id, served_ll, hf_ll)
            assert served_greedy == hf_greedy
