"""`tierserve bench shared-prefix` on a tiny model with 64-wide heads: both modes timed on the same
engine (tests/model/test_kernels.py checks the model really takes the fused path)."""

from __future__ import annotations

import json

import pytest

from tierserve.bench.cli import main
from tierserve.kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None,
                                reason="native kernels could not be built here")


def test_bench_shared_prefix_times_both_modes_on_one_engine(head64_llama_dir, tmp_path, monkeypatch):

    out = tmp_path / "shared.json"
    code = main(["shared-prefix", "--model", str(head64_llama_dir), "--dtype", "bfloat16",
                 "--batch", "16", "--prefix-len", "320", "--question-len", "8", "--rounds", "2",
                 "--steps", "2", "--num-blocks", "200", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fused", "unfused"}
    for row in results.values():
        assert row["decode_step_ms"] > 0 and row["attention_ms_per_step"] > 0
    assert results["fused"]["speedup_step"] > 0 and results["fused"]["speedup_attention"] > 0


def test_bench_shared_prefix_refuses_float32(head64_llama_dir):
    with pytest.raises(RuntimeError, match="bfloat16"):
        main(["shared-prefix", "--model", str(head64_llama_dir), "--dtype", "float32", "--batch", "4",
              "--prefix-len", "64", "--num-blocks", "64"])


def test_bench_shared_prefix_with_nested_templates_times_three_modes(head64_llama_dir, tmp_path):
    out = tmp_path / "nested.json"
    code = main(["shared-prefix", "--model", str(head64_llama_dir), "--dtype", "bfloat16",
                 "--batch", "16", "--prefix-len", "320", "--templates", "2", "--template-len",
                 "288", "--question-len", "8", "--rounds", "2", "--steps", "2", "--num-blocks",
                 "300", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["templates"] == 2
    results = report["results"]
    assert set(results) == {"fused", "fused-top", "unfused"}
    for mode in ("fused", "fused-top"):
        assert results[mode]["speedup_step"] > 0 and results[mode]["speedup_attention"] > 0
