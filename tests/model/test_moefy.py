"""tierserve moefy on the tiny Llama: balanced experts that partition each FFN, a folder the engine
loads like any MoE, tokens equal to the dense model's when every expert runs (top-k = E), routers
that rank experts better than chance, and the same folder from the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.model.reference import tierserve_logits
from tierserve import LLM, SamplingParams
from tierserve.model.moe import MoEBlock
from tierserve.model.moefy import MoefySpec, balanced_kmeans, moefy

SPEC = dict(num_experts=4, top_k=2, calibration_tokens=2048, sequence_len=128,
            kmeans_iterations=8)


@pytest.fixture(scope="module")
def moefied(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moefied")
    report = moefy(str(tiny_llama_dir), out, MoefySpec(**SPEC), progress=False)
    return out, report


def test_balanced_kmeans_gives_equal_groups_that_cover_every_neuron_once():
    features = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))
    groups = balanced_kmeans(features, 4, iterations=10, seed=1)
    assert [len(g) for g in groups] == [12] * 4
    assert sorted(np.concatenate(groups).tolist()) == list(range(48))
    again = balanced_kmeans(features, 4, iterations=10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    with pytest.raises(ValueError, match="equal experts"):
        balanced_kmeans(features, 5, iterations=2, seed=0)


def test_the_folder_is_an_moe_with_all_experts_equal_to_the_dense_model(tiny_llama_dir, moefied):
    out, report = moefied
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tierserve_moefied" and config["num_local_experts"] == 4
    assert report.expert_size == 128 // 4 and report.calibration_tokens > 0
    dense = LLM(str(tiny_llama_dir), num_blocks=64)
    moe = LLM(str(out), num_blocks=64)
    blocks = [layer.mlp for layer in moe.engine.runner.model.layers]
    assert all(isinstance(b, MoEBlock) and b.top_k == 2 and b.unit_weights for b in blocks)
    for block in blocks:
        block.top_k = 4  # every expert: the dense FFN, split
    prompts = [[5, 9, 100, 42] * k for k in (1, 6)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in moe.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in dense.generate(prompts, params, use_tqdm=False)])
    diff = (tierserve_logits(moe, prompts[1]) - tierserve_logits(dense, prompts[1])).abs().max()
    assert diff.item() < 1e-4


def test_routers_rank_experts_better_than_chance(moefied):
    _, report = moefied
    # Chance recall of a random top-2 of 4 is 0.5.
    assert min(report.router_recall) > 0.55, report.router_recall


def test_weight_clustering_is_the_other_choice_and_also_exact_with_every_expert(
        tiny_llama_dir, tmp_path):
    report = moefy(str(tiny_llama_dir), tmp_path, MoefySpec(**SPEC, clustering="weights"),
                   progress=False)
    assert report.spec["clustering"] == "weights"
    moe, dense = LLM(str(tmp_path), num_blocks=32), LLM(str(tiny_llama_dir), num_blocks=32)
    for layer in moe.engine.runner.model.layers:
        layer.mlp.top_k = 4
    prompt = [7, 8, 9, 10] * 5
    assert (tierserve_logits(moe, prompt) - tierserve_logits(dense, prompt)).abs().max() < 1e-4


def test_the_same_seed_writes_the_same_folder(tiny_llama_dir, moefied, tmp_path):
    from safetensors.torch import load_file

    out, _ = moefied
    moefy(str(tiny_llama_dir), tmp_path, MoefySpec(**SPEC), progress=False)
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_command_writes_the_folder_and_reports_perplexity(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "tierserve.cli", "moefy", str(tiny_llama_dir), str(out),
         "--experts", "4", "--top-k", "2", "--calibration-tokens", "1024", "--eval", "1,4",
         "--eval-tokens", "768"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 experts of 32 neurons" in proc.stdout and "recall" in proc.stdout
    report = json.loads((out / "moefy.json").read_text())
    ppl = report["perplexity"]
    assert set(ppl) == {"dense", "top-1", "top-4", "oracle-top-1", "oracle-top-4"}
    for all_experts in ("top-4", "oracle-top-4"):  # all experts: the dense model
        assert ppl[all_experts] == pytest.approx(ppl["dense"], rel=1e-4)
    assert ppl["top-1"] > ppl["top-4"]  # one expert of four loses something
    with pytest.raises(ValueError, match="dense"):
        moefy(str(out), tmp_path / "again", MoefySpec(**SPEC), progress=False)
