"""Shared fixtures: the real SmolLM2 GGUF and a tiny random Llama saved as safetensors."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched once into the cache."""
    from tierserve.model.hub import fetch_model

    return fetch_model("smollm2")


def save_tiny_llama(path, seed: int = 0, scale: float = 8.0, **overrides):
    """A random Llama written by transformers as safetensors, with the tiny tokenizer; 2-D
    weights scaled up by ``scale`` (random init is near-uniform over the vocabulary; scaled,
    greedy choices are clear)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{**fields, **overrides})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama (GQA, tied embeddings off) saved by transformers as safetensors."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def head64_llama_dir(tmp_path_factory):
    """The same with 64-wide heads (hidden 256, 4 heads, 2 kv heads): what the native kernels'
    register-resident and fused shared-prefix paths take."""
    return save_tiny_llama(tmp_path_factory.mktemp("head64_llama"), seed=1, scale=4.0,
                           hidden_size=256, intermediate_size=256)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained here on a little text, so the tiny model is a complete folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paged attention stores KV in blocks.",
              "def main():\n    return 42", "Bonjour, ça va? 東京 🙂"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' SmolLM2, dequantized from the same GGUF to float32 (the reference, ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_tiny_moe(family: str, path, seed: int = 0):
    """A 3-layer random MoE of ``family`` saved by transformers (per-expert tensors, as
    save_pretrained writes them), with the tiny tokenizer. Qwen-MoE gets a dense layer (via
    mlp_only_layers) and a shared expert; OLMoE clips qkv."""
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  num_experts_per_tok=2)
    specific = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(intermediate_size=96, num_local_experts=6)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(intermediate_size=128, moe_intermediate_size=48, num_experts=6,
                           shared_expert_intermediate_size=80, norm_topk_prob=False,
                           decoder_sparse_step=1, mlp_only_layers=[1])),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(intermediate_size=128, moe_intermediate_size=48, num_experts=6,
                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                           head_dim=16)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
                  dict(intermediate_size=48, num_experts=6, norm_topk_prob=False,
                       clip_qkv=8.0)),
    }
    config_name, model_name, extra = specific[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**common, **extra)
    model = getattr(transformers, model_name)(config)
    # Random init is near-uniform; scale up so greedy choices and expert choices are clear.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(40.0 if name.endswith("mlp.gate.weight") else 6.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)  # zero at init: make them matter
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # one at init: make q/k and layer norms matter
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer(common["vocab_size"]).save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="session", params=MOE_FAMILIES)
def tiny_moe(request, tmp_path_factory):
    """(family, folder, transformers model) for each MoE family."""
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    return request.param, path, make_tiny_moe(request.param, path)
