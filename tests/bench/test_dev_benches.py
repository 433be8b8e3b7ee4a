"""Smoke runs of the developer micro-benchmarks (python -m tierserve.bench.<name>): they run and
print their table. Timings are not asserted."""

from __future__ import annotations

from tierserve.bench import decode_buckets, step_inputs


def test_step_inputs_bench_prints_every_plan(capsys):
    assert step_inputs.main(["--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for name in step_inputs.SHAPES:
        assert name in out


def test_decode_buckets_bench_compares_padded_and_bucketed(tiny_llama_dir, capsys):
    assert decode_buckets.main(["--model", str(tiny_llama_dir), "--short", "4x20",
                                "--long", "200"]) == 0
    assert "one padded batch" in capsys.readouterr().out
