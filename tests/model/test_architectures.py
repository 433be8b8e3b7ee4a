"""Greedy parity with transformers for each supported architecture's features, at toy size:
Qwen2 attention biases, Qwen3 per-head q/k norms, Llama 3 rope scaling, Mistral, tied
embeddings, bfloat16. (Mixture-of-experts families: test_moe.py.)"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import _tiny_tokenizer
from tests.model.reference import hf_greedy, hf_logits, tierserve_logits
from tierserve import LLM, SamplingParams

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              bos_token_id=1, eos_token_id=2)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "qwen2-bias": lambda: Qwen2Config(**COMMON, rope_theta=1_000_000.0,
                                          tie_word_embeddings=False, use_sliding_window=False),
        "llama3-rope-scaling": lambda: LlamaConfig(
            **COMMON, rope_theta=500_000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        "llama-linear-rope": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False,
                                                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False),
        "qwen3-qk-norm": lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False,
                                             use_sliding_window=False),
        "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    }


def _save(config, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(8.0)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)  # HF initializes biases to zero: make them matter
            elif "norm" in name:
                param.uniform_(0.5, 1.5)  # and norm weights to one
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("name", list(_configs()))
def test_greedy_and_logits_match_transformers(name, tmp_path):
    hf = _save(_configs()[name](), tmp_path)
    llm = LLM(str(tmp_path), num_blocks=64)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 40, 300)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 16)[0]
    diff = (tierserve_logits(llm, prompts[2]) - hf_logits(hf, prompts[2])).abs().max().item()
    assert diff < 1e-4


def test_bfloat16_runs_close_to_float32(tiny_llama_dir):
    rng = random.Random(2)
    prompt = [rng.randrange(3, 512) for _ in range(50)]
    f32 = tierserve_logits(LLM(str(tiny_llama_dir), num_blocks=16), prompt)
    bf16_llm = LLM(str(tiny_llama_dir), num_blocks=16, dtype="bfloat16")
    assert bf16_llm.engine.runner.kv_cache.dtype == torch.bfloat16
    bf16 = tierserve_logits(bf16_llm, prompt)
    scale = f32.abs().max().item()
    assert (bf16 - f32).abs().max().item() < 0.05 * scale
    top_agree = (bf16.argmax(-1) == f32.argmax(-1)).float().mean().item()
    assert top_agree > 0.9
