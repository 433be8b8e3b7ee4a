"""tierserve bench moe on a tiny Mixtral: every row measured, every policy's tokens checked."""

import pytest

from tests.conftest import make_tiny_moe
from tierserve.bench.moe import MoeSpec, run_moe


def test_bench_moe_reports_every_policy_against_all_resident(tmp_path):
    folder = tmp_path / "mixtral"
    make_tiny_moe("mixtral", folder)
    spec = MoeSpec(model=str(folder), policies=("lru", "lookahead", "oracle", "lru+victim",
                                                "oracle+window0"),
                   expert_cache="50%", num_requests=6, concurrency=6, scale=0.05,
                   victim_buffer="9")
    result = run_moe(spec, progress=False)
    assert list(result.results) == ["all-resident", "lru", "lookahead", "oracle", "lru+victim",
                                    "oracle+window0"]
    assert result.config["expert_cache_slots"] == 9 and result.config["total_experts"] == 18
    for name, row in result.results.items():
        assert row["same_tokens"], name
        assert row["output_tokens_per_s"] > 0
        assert 0 < row["distinct_experts_per_step"] <= 6
    assert result.results["lru"]["disk_mib_per_token"] > 0
    assert result.results["oracle"]["hit_ratio"] >= result.results["lru"]["hit_ratio"]
    assert len(result.per_layer_hits["lru"]) == 3
    # 9 fast slots and 9 in the buffer hold all 18 experts: each is read from disk once.
    victim = result.results["lru+victim"]
    assert victim["victim_hit_ratio"] > 0 and victim["victim_mib_per_token"] > 0
    assert victim["disk_mib_per_token"] < result.results["lru"]["disk_mib_per_token"]
    assert result.results["lru"]["victim_hit_ratio"] is None
    with pytest.raises(ValueError, match="unknown variant"):
        run_moe(MoeSpec(model=str(folder), policies=("lru+turbo",)), progress=False)
    with pytest.raises(ValueError, match="--expert-host-format"):
        run_moe(MoeSpec(model=str(folder), policies=("static+cpu",)), progress=False)


def test_a_quantized_host_tier_is_checked_against_every_expert_resident_from_it(tmp_path):
    folder = tmp_path / "mixtral"
    make_tiny_moe("mixtral", folder)
    spec = MoeSpec(model=str(folder), policies=("lru", "lru+cpu"), expert_cache="50%",
                   num_requests=4, concurrency=4, scale=0.05, host_format="q8", host_compute=2)
    result = run_moe(spec, progress=False)
    assert list(result.results) == ["all-resident", "all-resident-q8", "lru", "lru+cpu"]
    assert result.config["tokens_checked_against"] == "every expert resident from the q8 host tier"
    assert result.results["lru"]["same_tokens"] and result.results["lru+cpu"]["same_tokens"]
    assert result.results["lru+cpu"]["host_runs"] > 0 and result.results["lru"]["host_runs"] == 0
