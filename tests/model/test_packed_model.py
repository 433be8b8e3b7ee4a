"""Models with packed weights (--quantization): loading packed, the kernel-free path bitwise equal
to the dequantized model, SmolLM2's greedy tokens against the float32 model, memory, and the
errors that name the fix. (The kernel's rows not depending on the batch: test_packed.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.model.test_loader import gguf_tensors_like_llama_cpp, tiny_llama_gguf_tensors, write_gguf
from tierserve.config import ModelConfig
from tierserve.engine.llm import LLM
from tierserve.model.loader import CheckpointError, load_checkpoint
from tierserve.model.packed import PACKABLE, PackedWeight, QuantType, quantize
from tierserve.request import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a hash table is in two sentences.", "List three uses of copper.",
           "How do I reverse a list in Python?", "Why is the sky blue?"]
# Largest top-2 logprob gap of the float32 model at which the packed model may choose the other
# token. bench quant measured every divergence of these 6 prompts x 64 tokens at a gap of
# 0.05-0.22 (AMD Zen 3, torch path); the bound leaves room for the other CPUs' kernels.
PACKED_TIE = 0.5


def test_a_gguf_loads_its_packed_tensors_packed_with_the_dequantized_values(tmp_path):
    tensors = tiny_llama_gguf_tensors()  # matrices cycle through Q8_0, Q4_0, Q4_1 and F16
    write_gguf(tmp_path / "tiny.gguf", "llama", tensors)
    dense = load_checkpoint(tmp_path / "tiny.gguf").tensors
    packed = load_checkpoint(tmp_path / "tiny.gguf", quantization="gguf").tensors
    kinds = set()
    for name, weight in packed.items():
        if isinstance(weight, PackedWeight):
            kinds.add(weight.qtype)
            assert PACKABLE.match(name)
            # q/k rows un-permuted as whole blocks: the same values as the float loader's.
            assert torch.equal(weight.dequantize(), dense[name]), name
        else:
            assert torch.equal(weight, dense[name]), name
    assert kinds == {qtype for qtype in QuantType if not qtype.is_k}
    assert isinstance(packed["model.layers.0.input_layernorm.weight"], torch.Tensor)
    # F16, a type the kernel lacks, stays float even under a packable name.
    assert any(isinstance(w, torch.Tensor) and PACKABLE.match(n) for n, w in packed.items())


def test_a_k_quant_gguf_loads_packed_with_the_gguf_packages_values(tmp_path, head64_llama_dir):
    # head64 (hidden 256, ffn 256): every matrix is whole super-blocks. Its matrices are written
    # as Q4_K, Q5_K and Q6_K in turn, q/k rows permuted as llama.cpp's converter does.
    import gguf

    hf = {name: weight.numpy() for name, weight in load_checkpoint(head64_llama_dir).tensors.items()}
    written = gguf_tensors_like_llama_cpp(hf, gguf.MODEL_ARCH.LLAMA, permute=True)
    k_quants = [qtype for qtype in QuantType if qtype.is_k]
    for index, (name, (values, _)) in enumerate(list(written.items())):
        if values.ndim == 2:
            qtype = k_quants[index % 3]
            raw = quantize(torch.from_numpy(values), qtype).quants.numpy()
            written[name] = (raw.reshape(values.shape[0], -1), gguf.GGMLQuantizationType[qtype.name])
    write_gguf(tmp_path / "k.gguf", "llama", written, embedding_length=256, feed_forward_length=256)
    dense = load_checkpoint(tmp_path / "k.gguf").tensors  # dequantized by the gguf package
    packed = load_checkpoint(tmp_path / "k.gguf", quantization="gguf").tensors
    kinds = set()
    for name, weight in packed.items():
        if PACKABLE.match(name):
            assert isinstance(weight, PackedWeight), name
            kinds.add(weight.qtype)
            assert torch.equal(weight.dequantize(), dense[name]), name  # rows un-permuted raw
    assert kinds == set(k_quants)


def test_k_quantization_falls_back_where_columns_are_not_whole_super_blocks(tiny_llama_dir,
                                                                           caplog):
    checkpoint = load_checkpoint(tiny_llama_dir, quantization="q4_k")  # hidden 64, ffn 128
    packed = {n: w.qtype for n, w in checkpoint.tensors.items() if PACKABLE.match(n)}
    # The head would take Q6_K, as llama-quantize's K mixes give it, and falls back to Q8_0.
    assert packed.pop("lm_head.weight") is QuantType.Q8_0
    assert set(packed.values()) == {QuantType.Q4_1}
    assert "not whole super-blocks of 256" in caplog.text
    assert {w.qtype for n, w in load_checkpoint(tiny_llama_dir, quantization="q6_k").tensors.items()
            if PACKABLE.match(n)} == {QuantType.Q8_0}


def test_k_quantized_models_score_tokens_near_their_dequantized_selves(head64_llama_dir,
                                                                       monkeypatch):
    import tierserve.model.llama as llama

    prompt = {"prompt_token_ids": [5, 17, 42, 99, 300, 301, 7, 12, 480, 3, 77, 200]}
    floats = _prompt_logprobs(LLM(str(head64_llama_dir), num_blocks=16), prompt)
    kernel, moved = {}, {}
    for quantization in ("q4_1", "q4_k", "q5_k", "q6_k"):
        llm = LLM(str(head64_llama_dir), quantization=quantization, num_blocks=16)
        linears = llm.engine.runner.model.linears()
        head = QuantType.Q6_K if quantization.endswith("_k") else QuantType(quantization)
        assert linears[-1] is llm.engine.runner.model.lm_head and linears[-1].weight.qtype is head
        assert {lin.weight.qtype for lin in linears[:-1]} == {QuantType(quantization)}
        kernel[quantization] = (_prompt_logprobs(llm, prompt), linears[0].quant is not None)
        moved[quantization] = (kernel[quantization][0] - floats).abs().mean()
    monkeypatch.setattr(llama, "quant_ops", lambda: None)  # the same weights, dequantized per call
    for quantization in ("q4_k", "q5_k", "q6_k"):
        dequantized = _prompt_logprobs(LLM(str(head64_llama_dir), quantization=quantization,
                                           num_blocks=16), prompt)
        ours, native = kernel[quantization]
        if native:  # the kernel's int8 activations move each logprob a little, no more
            assert (ours - dequantized).abs().max() < 0.1
            assert not torch.equal(ours, dequantized)
    # What the weights' rounding costs follows their bits (this random model's logprobs move by
    # 0.31 for Q4_1 and Q4_K, 0.06 for Q5_K, 0.07 for Q6_K, on average, on AMD Zen 3; the head
    # is Q6_K under all three K-quants).
    assert moved["q4_k"] < 1.5 * moved["q4_1"]
    assert max(moved["q5_k"], moved["q6_k"]) < 0.5 * moved["q4_k"]


def test_a_weight_that_is_not_whole_blocks_is_refused_by_name(tmp_path):
    from tests.conftest import save_tiny_llama

    odd = save_tiny_llama(tmp_path / "odd", hidden_size=48, intermediate_size=96)
    with pytest.raises(CheckpointError, match="48 columns, not a multiple of 32"):
        load_checkpoint(odd, quantization="q4_0")


def test_quantizing_at_load_packs_every_linear_and_the_embedding(tiny_llama_dir):
    checkpoint = load_checkpoint(tiny_llama_dir, quantization="q8_0")
    packed = {n for n, w in checkpoint.tensors.items() if isinstance(w, PackedWeight)}
    assert packed == {n for n in checkpoint.tensors if PACKABLE.match(n)}
    assert "model.embed_tokens.weight" in packed and "lm_head.weight" in packed
    assert all(checkpoint.tensors[n].qtype is QuantType.Q8_0 for n in packed)


def test_quantization_errors_name_the_fix(tiny_llama_dir):
    with pytest.raises(CheckpointError, match="q8_0, q4_0, q4_1, q4_k, q5_k or q6_k"):
        load_checkpoint(tiny_llama_dir, quantization="gguf")
    with pytest.raises(ValueError, match="quantization must be one of"):
        ModelConfig(quantization="q5_0")


def test_quantization_refuses_moe_models(tmp_path):
    from tests.conftest import make_tiny_moe

    make_tiny_moe("mixtral", tmp_path / "moe")
    with pytest.raises(CheckpointError, match="--expert-host-format"):
        load_checkpoint(tmp_path / "moe", quantization="q4_0")


def test_a_tiny_llama_packed_at_load_scores_tokens_as_the_float_model_does(tiny_llama_dir):
    # Q8_0 weights and int8 activations: each token's logprob moves by a few hundredths (this
    # model's logprobs are near-uniform, ~-3.2 over 512 tokens, so greedy ties are common).
    prompt = {"prompt_token_ids": [5, 17, 42, 99, 300, 301, 7, 12, 480, 3]}
    ours = _prompt_logprobs(LLM(str(tiny_llama_dir), quantization="q8_0"), prompt)
    theirs = _prompt_logprobs(LLM(str(tiny_llama_dir)), prompt)
    assert (ours - theirs).abs().max() < 0.15
    assert not torch.equal(ours, theirs)


def _chats(llm, count):
    tokenizer = llm.get_tokenizer()
    return [{"prompt_token_ids": tokenizer.encode_chat([{"role": "user", "content": text}])}
            for text in PROMPTS[:count]]


def _prompt_logprobs(llm, prompt):
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    steps = out[0].prompt_logprobs[1:]
    return torch.tensor([step[token].logprob
                         for token, step in zip(out[0].prompt_token_ids[1:], steps)])


@pytest.fixture(scope="module")
def smol_float(smollm2_path):
    return LLM(str(smollm2_path), kv_cache_memory="256MiB")


@pytest.fixture(scope="module")
def smol_packed(smollm2_path):
    return LLM(str(smollm2_path), quantization="gguf", kv_cache_memory="256MiB")


def test_without_the_kernel_a_packed_smollm2_equals_the_dequantized_model(
        smollm2_path, smol_float, monkeypatch):
    import tierserve.model.llama as llama

    monkeypatch.setattr(llama, "quant_ops", lambda: None)  # dequantize for each matmul
    fallback = LLM(str(smollm2_path), quantization="gguf", kv_cache_memory="64MiB")
    assert fallback.engine.runner.model.layers[0].qkv.quant is None
    # The reference on the same non-linear path (without the AVX2 module, an AVX2-only CPU's
    # float32 model leaves its fused norm/rotary kernels too, which round sums differently).
    dense = (smol_float if fallback.engine.runner.model.fused_ops is not None
             else LLM(str(smollm2_path), kv_cache_memory="64MiB"))
    prompt = _chats(smol_float, 1)[0]
    assert torch.equal(_prompt_logprobs(fallback, prompt), _prompt_logprobs(dense, prompt))


needs_kernel = pytest.mark.skipif(
    __import__("tierserve.kernels", fromlist=["quant_ops"]).quant_ops() is None,
    reason="packed kernel not built here (no AVX2)")


@needs_kernel
def test_packed_smollm2_greedy_parts_from_float32_only_at_near_ties(smol_float, smol_packed):
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=2)
    prompts = _chats(smol_float, 6)
    reference = smol_float.generate(prompts, params, use_tqdm=False)
    packed = smol_packed.generate(prompts, params, use_tqdm=False)
    for ref, ours in zip(reference, packed):
        ref_tokens, our_tokens = ref.outputs[0].token_ids, ours.outputs[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(ref_tokens, our_tokens)) if a != b), None)
        if first is None:
            assert ref_tokens == our_tokens
            continue
        top2 = ref.outputs[0].logprobs[first]
        assert our_tokens[first] in top2, f"packed chose a token outside float32's top 2 at {first}"
        gap = abs(top2[ref_tokens[first]].logprob - top2[our_tokens[first]].logprob)
        assert gap < PACKED_TIE, f"diverged at step {first} with a logprob gap of {gap:.3f}"


@needs_kernel
def test_prefill_sized_batches_take_the_dequantized_gemm(smol_packed, monkeypatch):
    import tierserve.model.llama as llama

    linear = smol_packed.engine.runner.model.layers[0].mlp.gate_up
    x = torch.randn(llama.PACKED_GEMM_ROWS, 576, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(linear, "gemm_rows", llama.PACKED_GEMM_ROWS)  # not batch-invariant
    gemm = linear(x)
    monkeypatch.setattr(linear, "gemm_rows", None)  # the integer kernel for every size
    integer = linear(x)
    dense = x @ linear.weight.dequantize().T
    torch.testing.assert_close(gemm, dense, rtol=1e-5, atol=1e-4)  # float: no int8 rounding
    assert (integer - dense).abs().max() > 1e-3  # the integer path rounds x to int8


def test_batch_invariant_float32_keeps_packed_linears_on_one_path(smollm2_path, smol_packed):
    import tierserve.model.llama as llama

    model = smol_packed.engine.runner.model  # float32, batch-invariant (the default)
    assert all(linear.gemm_rows is None for linear in model.linears())  # the head included
    # Every linear packed: no padding to 16 rows (the kernel's rows are invariant as they are).
    assert model.packed_throughout() == (llama.quant_ops() is not None)
    assert smol_packed.engine.runner.pad_rows == (1 if model.packed_throughout() else 16)
    loose = LLM(str(smollm2_path), quantization="gguf", batch_invariant=False,
                kv_cache_memory="32MiB")
    assert loose.engine.runner.model.lm_head.gemm_rows == llama.PACKED_GEMM_ROWS


def test_roofline_counts_packed_bytes(smol_packed):
    from tierserve.bench.roofline import model_costs

    model = smol_packed.engine.runner.model
    costs = model_costs(model, context=128)
    params = sum(lin.weight.numel() for lin in model.linears())
    assert params > 130e6  # SmolLM2-135M's linears and (tied) head
    assert costs["weight_bytes"] < 0.2 * params * 4  # Q4_1 + Q8_0 head, not float32
    assert costs["flops_per_token"] > 2 * params


@needs_kernel
def test_packed_smollm2_prompt_logprobs_are_close_to_float32(smol_float, smol_packed):
    prompt = _chats(smol_float, 3)[2]
    ours, theirs = _prompt_logprobs(smol_packed, prompt), _prompt_logprobs(smol_float, prompt)
    # The mean per-token log-likelihood (the perplexity) moves by under 1%.
    assert abs(ours.mean() - theirs.mean()) < 0.01 * abs(theirs.mean())
    assert (ours - theirs).abs().max() < 1.0
    assert not torch.equal(ours, theirs)  # the kernel, not a float path, computed them


def test_packed_smollm2_holds_under_40_percent_of_the_bfloat16_weights(smol_packed):
    from tierserve.bench.quant import weight_bytes

    model = smol_packed.engine.runner.model
    packed_bytes = weight_bytes(model)
    weights = {id(w): w for w in [model.embed, *(lin.weight for lin in model.linears())]}
    params = sum(w.numel() for w in weights.values())
    assert packed_bytes <= 0.40 * params * 2  # bfloat16: 2 bytes a weight
