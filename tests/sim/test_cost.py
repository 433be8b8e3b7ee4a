"""Cost models: monotone in tokens and context, parallelism and copies priced as stated."""

import pytest

from tierserve.sim.cost import (
    BatchShape,
    Efficiency,
    LinearCostModel,
    Parallelism,
    RooflineCostModel,
)
from tierserve.sim.hardware import HARDWARE, LinkSpec, get_hardware
from tierserve.sim.model_shape import KNOWN_MODELS, ModelShape, load_model_shape

MODELS = ["mistral-7b", "yi-34b", "llama-3-8b", "mixtral-8x7b", "smollm2-135m"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("hardware", ["a100-80gb-sxm", "h100-sxm", "a10"])
def test_roofline_is_monotone_in_tokens_and_context(model, hardware):
    cost = RooflineCostModel(KNOWN_MODELS[model], HARDWARE[hardware])
    prefill = [cost.step_seconds(BatchShape.of((n, 0))) for n in (1, 16, 64, 256, 1024, 4096)]
    assert prefill == sorted(prefill) and prefill[0] < prefill[-1]
    decode = [cost.step_seconds(BatchShape.of((1, c))) for c in (1, 512, 4096, 32768)]
    assert decode == sorted(decode) and decode[0] < decode[-1]
    batch = [cost.step_seconds(BatchShape.of(*[(1, 1024)] * b)) for b in (1, 8, 64, 256)]
    assert batch == sorted(batch)
    chunked = [cost.step_seconds(BatchShape.of((256, c))) for c in (0, 1024, 8192)]
    assert chunked == sorted(chunked) and chunked[0] < chunked[-1]


def test_decode_at_batch_one_is_bound_by_weight_bandwidth():
    model, hardware = KNOWN_MODELS["mistral-7b"], HARDWARE["a100-80gb-sxm"]
    efficiency = Efficiency(step_overhead_s=0.0, per_chunk_overhead_s=0.0)
    cost = RooflineCostModel(model, hardware, efficiency)
    seconds = cost.step_seconds(BatchShape.of((1, 1)))
    bound = model.weight_bytes / hardware.memory_bandwidth
    # Weights stream once at 80% of HBM bandwidth (embedding rows are not read, so a bit less).
    assert bound < seconds < bound / efficiency.weight_bandwidth_fraction * 1.05


def test_prefill_is_bound_by_compute():
    model, hardware = KNOWN_MODELS["mistral-7b"], HARDWARE["a100-80gb-sxm"]
    cost = RooflineCostModel(model, hardware, Efficiency(step_overhead_s=0.0))
    tokens = 4096
    layer_params = model.attention_params + model.mlp_params
    flops = 2 * tokens * layer_params * model.num_layers
    assert cost.step_seconds(BatchShape.of((tokens, 0))) > flops / hardware.bf16_flops


def test_tensor_parallel_splits_compute_and_adds_all_reduce():
    model, hardware = KNOWN_MODELS["yi-34b"], HARDWARE["a100-80gb-sxm"]
    one = RooflineCostModel(model, hardware)
    two = RooflineCostModel(model, hardware, parallel=Parallelism(tensor=2))
    shape = BatchShape.of((512, 0))
    assert two.step_seconds(shape) < one.step_seconds(shape)
    assert two.breakdown(shape)["tp_all_reduce"] > 0 == one.breakdown(shape)["tp_all_reduce"]
    slow = RooflineCostModel(model, get_hardware("a100-80gb-sxm", "ethernet"),
                             parallel=Parallelism(tensor=2))
    assert slow.breakdown(shape)["tp_all_reduce"] > 10 * two.breakdown(shape)["tp_all_reduce"]
    # Two GPUs hold the weights once: more than twice the KV of one.
    assert two.kv_capacity_tokens() > 2 * one.kv_capacity_tokens()


def test_a_model_that_does_not_fit_names_the_fix():
    with pytest.raises(ValueError, match="--tp"):
        RooflineCostModel(KNOWN_MODELS["yi-34b"], HARDWARE["a10"]).kv_capacity_tokens()


def test_moe_touches_fewer_experts_at_small_batch():
    model = KNOWN_MODELS["mixtral-8x7b"]
    cost = RooflineCostModel(model, HARDWARE["a100-80gb-sxm"], parallel=Parallelism(tensor=2))
    one = cost.breakdown(BatchShape.of((1, 100)))["mlp"]
    many = cost.breakdown(BatchShape.of(*[(1, 100)] * 64))["mlp"]
    assert many > 2.5 * one  # 2 of 8 experts at one token, all 8 at 64


def test_copy_cost_counts_runs_and_bytes():
    link = LinkSpec(bandwidth=32e9, overhead_s=10e-6, efficiency=0.8)
    grouped, scattered = link.seconds(1, 64 << 20), link.seconds(64, 64 << 20)
    assert scattered - grouped == pytest.approx(63 * 10e-6)
    assert link.seconds(1, 2 << 30) == pytest.approx(10e-6 + (2 << 30) / 25.6e9)


def test_linear_cost_model():
    cost = LinearCostModel(0.01, 0.001, 0.0)
    assert cost.step_seconds(BatchShape.of((10, 0), (1, 50))) == pytest.approx(0.021)
    assert cost.step_seconds(BatchShape()) == 0


def test_model_shape_from_hf_config(tmp_path):
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    shape = load_model_shape(str(tmp_path))
    assert shape.head_dim == 64 and shape.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    known = KNOWN_MODELS["smollm2-135m"]
    assert (shape.weight_bytes, shape.kv_bytes_per_token) == (known.weight_bytes,
                                                               known.kv_bytes_per_token)
    # SmolLM2-135M: ~135M parameters in bf16.
    assert 130e6 < shape.weight_bytes / 2 < 140e6
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelShape.from_hf_config({"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 9})
    with pytest.raises(ValueError, match="known name"):
        load_model_shape(str(tmp_path / "missing"))


def test_every_hardware_profile_has_a_source():
    for profile in HARDWARE.values():
        assert "datasheet" in profile.source and profile.bf16_flops > 1e13
    with pytest.raises(ValueError, match="choose one of"):
        get_hardware("tpu")
