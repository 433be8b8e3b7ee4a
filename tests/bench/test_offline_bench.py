"""`tierserve bench offline`: ratios, HF batch-size choice, contender planning, each scenario's
numbers on the tiny model, and the CLI with a process per contender."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tierserve.bench.batch_sizes import batch_groups, best_batch_size, probe_size, probe_then_run
from tierserve.bench.cli import main
from tierserve.bench.contenders import WorkerJob, run_job
from tierserve.bench.offline import (
    LLAMA_CPP_MISSING,
    SCENARIO_METRIC,
    OfflineSpec,
    compute_ratios,
    plan_contenders,
    run_offline,
    worker_failure,
)
from tierserve.bench.workloads import WorkloadSpec


# -- pure parts --------------------------------------------------------------------------------
def _row(contender: str, dtype: str, tps: float) -> dict:
    return {"contender": contender, "dtype": dtype, "output_tokens_per_s": tps}


def test_ratios_are_tierserve_over_each_baseline_and_ignore_skipped_ones():
    results = {"tierserve": _row("tierserve", "float32", 30.0), "hf": _row("hf", "float32", 10.0),
               "llama.cpp": {"contender": "llama.cpp", "skipped": "not installed"}}
    assert compute_ratios(results, "output_tokens_per_s") == {"hf": pytest.approx(3.0)}


def test_ratios_pair_same_dtypes_and_add_best_over_best():
    results = {"tierserve-float32": _row("tierserve", "float32", 30.0),
               "hf-float32": _row("hf", "float32", 10.0),
               "tierserve-bfloat16": _row("tierserve", "bfloat16", 40.0),
               "hf-bfloat16": _row("hf", "bfloat16", 20.0),
               "llama.cpp": _row("llama.cpp", "gguf tensor types as stored", 80.0)}
    ratios = compute_ratios(results, "output_tokens_per_s")
    assert ratios == pytest.approx({"hf-float32": 3.0, "hf-bfloat16": 2.0, "llama.cpp": 0.5,
                                    "best/hf": 2.0, "best/llama.cpp": 0.5})


def test_no_ratios_without_a_tierserve_result():
    assert compute_ratios({"hf": _row("hf", "float32", 10.0)}, "output_tokens_per_s") == {}


def test_best_batch_size_has_the_most_output_tokens_per_s_and_the_smaller_on_a_tie():
    probed = {16: {"output_tokens_per_s": 50.0}, 32: {"output_tokens_per_s": 70.0},
              64: {"output_tokens_per_s": 70.0}}
    assert best_batch_size(probed) == 32
    with pytest.raises(ValueError, match="--hf-batch-sizes"):
        best_batch_size({})


def test_a_batch_size_is_probed_on_two_batches_at_most_all_prompts():
    assert probe_size(100, 16) == 32 and probe_size(20, 16) == 20


def test_batch_groups_put_the_longest_outputs_first_in_groups_of_size():
    prompts = [[1], [1, 2], [1, 2, 3], [1], [1, 2]]
    max_tokens = [4, 8, 8, 2, 4]
    assert batch_groups(prompts, max_tokens, 2) == [[2, 1], [4, 0], [3]]
    assert batch_groups(prompts, max_tokens, 8) == [[2, 1, 4, 0, 3]]


def _fake_run(speed: dict[int, float], calls: list[tuple[int, int]]):
    def run(prompts, max_tokens, size):
        calls.append((len(prompts), size))
        return {"num_prompts": len(prompts), "wall_s": 1.0, "output_tokens": sum(max_tokens),
                "output_tokens_per_s": speed[size]}
    return run


def test_probe_then_run_probes_each_size_and_runs_the_fastest_on_all_prompts():
    calls: list[tuple[int, int]] = []
    full = probe_then_run((1, 16, 64), [[1]] * 40, [2] * 40, _fake_run({1: 5.0, 16: 9.0, 64: 7.0},
                                                                       calls))
    assert calls == [(2, 1), (32, 16), (40, 64), (40, 16)]
    assert full["batch_size"] == 16 and full["num_prompts"] == 40
    assert list(full["per_batch_size"]) == ["1", "16", "64"]


def test_probe_then_run_reuses_a_probe_that_ran_every_prompt_and_skips_probing_one_size():
    calls: list[tuple[int, int]] = []
    full = probe_then_run((1, 64), [[1]] * 40, [2] * 40, _fake_run({1: 5.0, 64: 7.0}, calls))
    assert calls == [(2, 1), (40, 64)] and full["batch_size"] == 64
    calls.clear()
    full = probe_then_run((1,), [[1]] * 40, [2] * 40, _fake_run({1: 5.0}, calls))
    assert calls == [(40, 1)] and full["per_batch_size"] == {}


def test_llama_cpp_batch_sizes_must_be_positive():
    with pytest.raises(ValueError, match="--llama-cpp-batch-sizes"):
        OfflineSpec(llama_cpp_batch_sizes=(0, 16))


def test_plan_names_results_by_dtype_only_when_there_are_several():
    assert plan_contenders(OfflineSpec()) == {"tierserve": ("tierserve", "float32"),
                                              "hf": ("hf", "float32"),
                                              "llama.cpp": ("llama.cpp", "gguf")}
    plan = plan_contenders(OfflineSpec(dtypes=("float32", "bfloat16"), baselines=("hf",)))
    assert list(plan) == ["tierserve-float32", "hf-float32", "tierserve-bfloat16",
                          "hf-bfloat16"]


def test_unknown_baselines_and_scenarios_name_the_choices():
    with pytest.raises(ValueError, match="hf,llama.cpp"):
        OfflineSpec(baselines=("vllm",))
    with pytest.raises(ValueError, match="single-decode"):
        OfflineSpec(scenario="decode")


def test_scenarios_default_their_prompt_length():
    assert OfflineSpec(scenario="prefill").prompt_len == 512
    assert OfflineSpec(scenario="single-decode").prompt_len == 64


# -- contenders on the tiny model (in this process) --------------------------------------------
@pytest.fixture
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scenario", list(SCENARIO_METRIC))
def test_tierserve_and_hf_give_each_prompt_its_exact_output_count(tiny_llama_dir, scenario,
                                                                   one_torch_thread):
    from tierserve.config import EngineConfig

    engine = EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_threads=1, num_blocks=64,
                                      swap_space=0)
    prompts = [[5 + i, 9, 40, 77, 100 + i, 3] for i in range(3)]
    max_tokens = [1] * 3 if scenario == "prefill" else [6, 3, 5]
    rows = {contender: run_job(WorkerJob(
        contender=contender, scenario=scenario, model_path=str(tiny_llama_dir), dtype="float32",
        threads=1, prompts=prompts, max_tokens=max_tokens, engine=engine, hf_batch_sizes=(1, 2)))
        for contender in ("tierserve", "hf")}
    for row in rows.values():
        assert row["output_tokens"] == sum(max_tokens)
        assert row[SCENARIO_METRIC[scenario]] > 0 and row["peak_rss_mb"] > 0
        assert row["prompt_tokens"] == 18 and row["load_s"] >= 0
    if scenario == "throughput":
        hf = rows["hf"]
        assert hf["batch_size"] in (1, 2) and set(hf["per_batch_size"]) == {"1", "2"}
        # A batch generates its longest output; shorter rows' extra tokens are not counted.
        assert all(probe["computed_output_tokens"] >= probe["output_tokens"]
                   for probe in hf["per_batch_size"].values())


# -- the command, a process per contender ------------------------------------------------------
def test_offline_command_runs_each_contender_and_skips_a_missing_llama_cpp(
        tiny_llama_dir, tmp_path, monkeypatch, capsys, one_torch_thread):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    out = tmp_path / "offline.json"
    code = main(["offline", "--model", str(tiny_llama_dir), "--num-prompts", "4", "--scale",
                 "0.05", "--max-output-len", "8", "--hf-batch-sizes", "2,4", "--threads", "1",
                 "--num-blocks", "64", "--swap-space", "0", "--no-progress", "--json", str(out),
                 "--plot", str(tmp_path / "offline.png")])
    assert code == 0
    document = json.loads(out.read_text())
    assert set(document) >= {"machine", "config", "results", "ratios", "equal_output_tokens"}
    results = document["results"]
    assert results["llama.cpp"] == {"contender": "llama.cpp", "skipped": LLAMA_CPP_MISSING}
    assert LLAMA_CPP_MISSING in capsys.readouterr().err
    for name in ("tierserve", "hf"):
        assert set(results[name]) >= {"output_tokens_per_s", "total_tokens_per_s", "wall_s",
                                      "load_s", "peak_rss_mb", "dtype", "threads"}
    assert results["tierserve"]["output_tokens"] == results["hf"]["output_tokens"]
    assert document["equal_output_tokens"] is True
    assert set(document["ratios"]) == {"hf"}
    assert document["complete"] is True
    assert results["hf"]["weights"] == "dense float32"
    assert (tmp_path / "offline.png").stat().st_size > 0


def test_a_baseline_past_its_time_limit_does_not_finish_and_the_others_results_stand(
        tiny_llama_dir, one_torch_thread):
    from tierserve.config import EngineConfig

    spec = OfflineSpec(workload=WorkloadSpec(num_requests=2, scale=0.05, max_output_len=4),
                       baselines=("hf",), threads=1, hf_batch_sizes=(2,),
                       baseline_timeout_s=0.5)  # transformers alone takes longer to import
    engine = EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_blocks=64, swap_space=0)
    seen = []
    started = time.monotonic()
    outcome = run_offline(engine, spec, progress=False,
                          on_result=lambda partial: seen.append(dict(partial.results)))
    assert time.monotonic() - started < 120
    assert [list(partial) for partial in seen] == [["tierserve"], ["tierserve", "hf"]]
    assert seen[0]["tierserve"]["output_tokens_per_s"] > 0  # reported before hf ran
    assert outcome.results["hf"]["did_not_finish"].startswith("stopped after 0.5 s")
    assert outcome.results["tierserve"] == seen[0]["tierserve"]
    assert outcome.ratios == {}  # nothing to compare with


def test_a_gguf_becomes_a_dense_folder_once_for_hf(hf_smollm2, smollm2_path, tmp_path,
                                                    monkeypatch):
    """The HF baseline on a GGUF loads dense weights (no GGUF quantizer), written once."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tierserve.bench import baselines

    loads = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(kwargs.get("gguf_file"))
        return copy.deepcopy(hf_smollm2) if kwargs.get("gguf_file") else real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    folder = baselines.hf_dense_folder(smollm2_path, home=tmp_path)
    assert baselines.hf_dense_folder(smollm2_path, home=tmp_path) == folder
    assert loads == [smollm2_path.name]  # converted once, then reused
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, ".lock"])
    dense = real(folder, dtype=torch.bfloat16)
    assert getattr(dense, "hf_quantizer", None) is None
    gate = dense.model.layers[0].mlp.gate_proj.weight
    assert gate.dtype == torch.bfloat16
    reference = hf_smollm2.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(gate, reference.to(torch.bfloat16))


def test_a_crashed_worker_is_named_by_its_signal_and_llama_cpp_sigill_says_how_to_rebuild():
    job = WorkerJob("llama.cpp", "throughput", "m.gguf", "bfloat16", 1, [[1]], [1])
    message = worker_failure(job, -4)
    assert message.startswith("worker killed by SIGILL") and "GGML_NATIVE=OFF" in message
    hf_job = WorkerJob("hf", "throughput", "m.gguf", "bfloat16", 1, [[1]], [1])
    assert worker_failure(hf_job, -9) == "worker killed by SIGKILL"
    assert worker_failure(job, 1) == "worker exited with code 1 (traceback above)"
