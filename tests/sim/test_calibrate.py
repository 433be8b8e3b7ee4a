"""`sim profile` and `sim calibrate` run the real engine end to end (a tiny model, a small grid):
the profile has every operator, the calibration report compares every metric."""

import math

import pytest

from tierserve.config import EngineConfig, ModelConfig, SchedulerConfig
from tierserve.sim.calibrate import E2E_METRICS, CalibrationWorkload, calibrate
from tierserve.sim.cost import BatchShape
from tierserve.sim.profile import ProfileGrid, run_profile
from tierserve.sim.profiled import ProfiledCostModel, ProfileTable

GRID = ProfileGrid(linear_tokens=(1, 4, 16, 64), prefill_chunks=(16, 64), prefill_max_context=256,
                   decode_batches=(1, 4, 16), decode_contexts=(32, 256))


@pytest.fixture(scope="module")
def profiled(tiny_llama_dir, tmp_path_factory):
    config = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir), num_threads=1),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64))
    table = run_profile(config, repeats=3, progress=False, grid=GRID)
    folder = tmp_path_factory.mktemp("profile")
    table.write(folder)
    return config, ProfileTable.read(folder)


def test_profile_measures_every_operator(profiled):
    _, table = profiled
    assert sorted({p.num_tokens for p in table.of("linear")}) == [1, 4, 16, 64]
    # Decode contexts: the nominal one plus the step's own token(s).
    measured = {(p.batch_size, p.kv_cache_size // p.batch_size // 32 * 32)
                for p in table.of("attn_decode")}
    assert measured == {(b, c) for b in (1, 4, 16) for c in (32, 256)}
    assert {p.num_tokens for p in table.of("attn_prefill")} == {16, 64}
    assert max(p.kv_cache_size for p in table.of("attn_prefill")) == 256
    assert table.of("overhead") and all(p.seconds > 0 for p in table.of("overhead"))
    assert table.meta["machine"]["cpu"] and table.meta["prefill_at_zero_in_linear"]
    cost = ProfiledCostModel(table)
    assert cost.step_seconds(BatchShape.of(*[(1, 100)] * 8)) > cost.step_seconds(BatchShape.of((1, 100)))


def test_calibration_compares_simulated_and_measured(profiled):
    config, table = profiled
    workloads = (CalibrationWorkload("online", 12, 24, 8, rate=20.0),
                 CalibrationWorkload("batch", 12, 24, 8, rate=0.0, seed=1))
    report = calibrate(config, ProfiledCostModel(table), workloads, progress=False,
                       repeat_real=True)
    assert set(report["workloads"]) == {"online", "batch"}
    for part in report["workloads"].values():
        assert part["measured"]["num_finished"] == part["simulated"]["num_finished"] == 12
        assert part["steps"]["count"] > 12
        assert set(part["e2e"]) == set(E2E_METRICS)
        for values in part["e2e"].values():
            assert values["measured"] > 0 and values["simulated"] > 0
            assert math.isfinite(values["error_pct"])
            assert values["measured_again"] > 0 and math.isfinite(values["repeat_diff_pct"])
    assert math.isfinite(report["median_abs_e2e_error_pct"])
    assert math.isfinite(report["median_abs_real_repeat_diff_pct"])


def test_one_command_profiles_then_calibrates(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """`sim calibrate` without --profile profiles first, back to back (small grid here)."""
    import json

    from tierserve.cli import main
    from tierserve.sim import calibrate as calibrate_module
    from tierserve.sim import profile as profile_module

    profiles = []

    def small_profile(config, repeats, progress):
        profiles.append(repeats)
        return run_profile(config, repeats, progress, grid=GRID)

    def small_calibrate(config, cost, progress, repeat_real):
        return calibrate(config, cost, (CalibrationWorkload("online", 8, 24, 8, rate=20.0),),
                         progress=progress, repeat_real=repeat_real)

    monkeypatch.setattr(profile_module, "run_profile", small_profile)
    monkeypatch.setattr(calibrate_module, "calibrate", small_calibrate)
    out, saved = tmp_path / "calibration.json", tmp_path / "profile"
    assert main(["sim", "calibrate", "--model", str(tiny_llama_dir), "--threads", "1",
                 "--max-num-batched-tokens", "64", "--repeats", "2", "--no-repeat",
                 "--no-progress", "--save-profile", str(saved), "--json", str(out)]) == 0
    assert profiles == [2]
    assert (saved / "profile.csv").is_file()
    report = json.loads(out.read_text())
    assert report["workloads"]["online"]["measured"]["num_finished"] == 8
    assert "median abs error" in capsys.readouterr().out
