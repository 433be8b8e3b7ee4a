"""Mixture-of-experts models against transformers on the same weights, per family (Mixtral,
Qwen2-MoE with its shared expert and a dense layer, Qwen3-MoE, OLMoE): the experts each token is
routed to, prefill logits, and greedy tokens alone and batched."""

from __future__ import annotations

import random

import pytest
import torch

from tierserve import LLM, SamplingParams
from tierserve.model.moe import MoEBlock


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def engines(tiny_moe):
    family, path, hf = tiny_moe
    return family, LLM(str(path), num_blocks=64), hf


def _routes(llm: LLM, prompt: list[int]) -> dict[int, torch.Tensor]:
    """layer -> (T, k) expert ids, as the engine routes a prefill of ``prompt``."""
    seen: dict[int, torch.Tensor] = {}
    blocks = [layer.mlp for layer in llm.engine.runner.model.layers
              if isinstance(layer.mlp, MoEBlock)]
    for block in blocks:
        block.on_route = lambda index, ids: seen.setdefault(index, ids.clone())
    try:
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    finally:
        for block in blocks:
            block.on_route = None
    return seen


def test_the_engine_routes_every_token_to_the_experts_transformers_picks(engines):
    family, llm, hf = engines
    prompt = _prompts(1, [24])[0]
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_router_logits=True)
    moe_layers = [i for i, layer in enumerate(llm.engine.runner.model.layers)
                  if isinstance(layer.mlp, MoEBlock)]
    assert len(out.router_logits) == len(moe_layers) > 0
    if family == "qwen2_moe":
        assert moe_layers == [0, 2]  # mlp_only_layers=[1] kept layer 1 dense
    routes = _routes(llm, prompt)
    for layer, logits in zip(moe_layers, out.router_logits):
        expected = logits.reshape(len(prompt), -1).topk(hf.config.num_experts_per_tok).indices
        assert torch.equal(routes[layer], expected), (family, layer)


def test_prefill_logits_match_transformers(engines):
    family, llm, hf = engines
    prompt = _prompts(2, [30])[0]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1].float()
    (output,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=0,
                                                      prompt_logprobs=0), use_tqdm=False)
    # the last position's log-softmax, compared through the sampled token's logprob
    token = output.outputs[0].token_ids[0]
    assert token == int(expected.argmax())
    assert output.outputs[0].logprobs[0][token].logprob == pytest.approx(
        torch.log_softmax(expected, -1)[token].item(), abs=1e-4)
    with torch.no_grad():
        all_logits = hf(torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(all_logits, -1)
    for position in range(1, len(prompt)):
        got = output.prompt_logprobs[position][prompt[position]].logprob
        assert got == pytest.approx(reference[position - 1, prompt[position]].item(), abs=1e-4)


def test_greedy_tokens_equal_transformers_alone_and_batched(engines):
    family, llm, hf = engines
    prompts = _prompts(3, [5, 17, 40])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, tokens in zip(prompts, batched):
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    min_new_tokens=12)[0, len(prompt):].tolist()
        assert tokens == reference, family
        alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert alone == reference
