"""Prompt log-probabilities (vLLM's SamplingParams.prompt_logprobs) against transformers on the same
weights: whole, chunked, beside other requests, after a prefix-cache hit would have been possible,
and with max_tokens=0 (score only)."""

from __future__ import annotations

import random

import pytest
import torch

from tierserve import LLM, SamplingParams


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _reference(hf, prompt: list[int]) -> torch.Tensor:
    """(len(prompt) - 1, vocab) log-probabilities of positions 1.. of the prompt."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def _check(output, hf, top: int) -> None:
    prompt = output.prompt_token_ids
    reference = _reference(hf, prompt)
    scored = output.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    for position in range(1, len(prompt)):
        entry, row = scored[position], reference[position - 1]
        actual = entry[prompt[position]]
        assert actual.logprob == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        assert actual.rank == int((row > row[prompt[position]]).sum()) + 1
        top_ids = {t for t, lp in entry.items() if lp.rank <= top}
        assert top_ids == set(row.topk(top).indices.tolist())
        assert set(entry) == top_ids | {prompt[position]}  # the actual token, plus the top k


@pytest.mark.parametrize("budget", [256, 16])  # whole prompts in a step, or chunked in 16s
def test_prompt_logprobs_match_transformers_whole_and_chunked(tiny_llama_dir, hf_tiny, budget):
    llm = LLM(str(tiny_llama_dir), num_blocks=64, max_num_batched_tokens=budget)
    prompts = _prompts(1, [40, 7, 130])
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        _check(output, hf_tiny, top=2)
        assert len(output.outputs[0].token_ids) == 3


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(tiny_llama_dir, hf_tiny):
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    (output,) = llm.generate(_prompts(2, [25]), SamplingParams(max_tokens=0, prompt_logprobs=0),
                             use_tqdm=False)
    assert output.outputs[0].token_ids == [] and output.outputs[0].finish_reason == "length"
    _check(output, hf_tiny, top=0)
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_and_sent_once(tiny_llama_dir, hf_tiny):
    """The second request shares 32 tokens with the first (cached): it still gets logprobs for
    every prompt token (it skips the cache hit); n=2 completions score the prompt once."""
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    first = _prompts(3, [40])[0]
    second = first[:32] + _prompts(4, [9])[0]
    llm.generate([first], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=4, n=2, prompt_logprobs=1)
    (output,) = llm.generate([second], params, use_tqdm=False)
    _check(output, hf_tiny, top=1)
    assert output.num_cached_tokens == 0
    assert len(output.outputs) == 2
    # without prompt logprobs the same prompt does hit the cache
    (plain,) = llm.generate([second], SamplingParams(max_tokens=1), use_tqdm=False)
    assert plain.num_cached_tokens == 32


def test_preempted_and_recomputed_requests_send_each_prompt_logprob_once(tiny_llama_dir, hf_tiny):
    # 12 blocks of 16 tokens for three 60-token prompts growing by 40 tokens: preemption by
    # recompute is certain (no host tier).
    llm = LLM(str(tiny_llama_dir), num_blocks=12, max_num_batched_tokens=32, swap_space=0)
    params = SamplingParams(temperature=0.0, max_tokens=40, prompt_logprobs=1, ignore_eos=True)
    outputs = llm.generate(_prompts(6, [60, 60, 60]), params, use_tqdm=False)
    assert llm.core.scheduler.num_preemptions > 0
    for output in outputs:
        _check(output, hf_tiny, top=1)
