"""Self-play PPO on the sumo environment at a tiny budget: the run checkpoints, a stopped run
resumes from its checkpoint (steps and curve carried on, the model reloaded), evaluation counts
every episode; the one-side view applies the generalized attack's control and stealth charge."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("mujoco")
pytest.importorskip("stable_baselines3")

from tieradv.attack import GaussianStates  # noqa: E402
from tieradv.cli import main  # noqa: E402
from tieradv.train import (  # noqa: E402
    OneSide,
    RandomPolicy,
    SelfPlay,
    StandPolicy,
    evaluate,
)


def test_self_play_checkpoints_and_resumes(tmp_path):
    first = SelfPlay(tmp_path, total_steps=512, chunk=512, n_steps=256, eval_episodes=1)
    assert first.run(progress=False).done_steps == 512
    obs = np.linspace(-1, 1, 40).astype(np.float32)
    saved_action = first.model.predict(obs, deterministic=True)[0]
    resumed = SelfPlay(tmp_path, total_steps=1024, chunk=512, n_steps=256, eval_episodes=1)
    assert resumed.state.done_steps == 512 and resumed.state.snapshots == 1
    np.testing.assert_array_equal(resumed.model.predict(obs, deterministic=True)[0], saved_action)
    state = resumed.run(progress=False)
    assert state.done_steps == 1024 and [c["steps"] for c in state.curve] == [512, 1024]
    assert resumed.model.num_timesteps >= 1024
    again = SelfPlay(tmp_path, total_steps=1024, chunk=512, n_steps=256, eval_episodes=1)
    assert again.schedule() is None  # nothing left to do


def test_evaluation_counts_every_episode():
    result = evaluate(lambda o: np.zeros(8), StandPolicy(), episodes=2)
    assert result == {"win": 0.0, "lose": 0.0, "draw": 1.0, "episodes": 2}  # two standers draw
    random = evaluate(lambda o: np.zeros(8), RandomPolicy(0), episodes=3)
    assert random["win"] + random["lose"] + random["draw"] == pytest.approx(1.0)


def test_one_side_view_applies_control_and_stealth():
    benign = StandPolicy()
    full = OneSide(StandPolicy(), epsilon=1.0, benign=benign, seed=0)
    none = OneSide(StandPolicy(), epsilon=0.0, benign=benign, seed=0)
    for env in (full, none):
        env.reset(seed=5)
        env.step(np.ones(8))
    assert full.env.data.ctrl[full.env._index["ant1"]["ctrl"]].tolist() == [1.0] * 8
    assert none.env.data.ctrl[none.env._index["ant1"]["ctrl"]].tolist() == [0.0] * 8
    states = np.random.default_rng(0).standard_normal((500, 40)) * 0.01
    charged = OneSide(StandPolicy(), stealth=GaussianStates.fit(states), stealth_weight=1.0)
    free = OneSide(StandPolicy())
    charged.reset(seed=5)
    free.reset(seed=5)
    assert charged.step(np.zeros(8))[1] < free.step(np.zeros(8))[1] - 100  # far from benign


def test_victim_command(tmp_path, capsys):
    assert main(["victim", "--out", str(tmp_path), "--steps", "256", "--chunk", "256",
                 "--eval-episodes", "2"]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 256 and set(result["final_win_rates"]) == {"random", "gait", "stand"}
    assert json.loads(capsys.readouterr().out)["steps"] == 256


def test_attack_command_trains_and_measures(tmp_path):
    """A tiny victim, then Gleave's attack (epsilon 1) and a generalized one (epsilon 0.5 with the
    stealth charge): each gets a win rate, a state shift and a detector AUC; a rerun skips them."""
    victim = tmp_path / "victim"
    assert main(["victim", "--out", str(victim), "--steps", "256", "--chunk", "256",
                 "--eval-episodes", "2"]) == 0
    out = tmp_path / "attacks"
    args = ["attack", "--victim", str(victim / "model.zip"), "--out", str(out), "--epsilons",
            "1.0,0.5", "--stealth-weights", "0", "--steps", "256", "--episodes", "4"]
    assert main(args) == 0
    results = json.loads((out / "attacks.json").read_text())
    assert [(r["epsilon"], r["stealth_weight"]) for r in results] == [(1.0, 0.0), (0.5, 0.0)]
    for r in results:
        assert 0 <= r["win_rate"] <= 1 and r["shift"] >= 0 and 0 <= r["auc"] <= 1
        assert sum(r["outcomes"].values()) == pytest.approx(1.0)
    before = (out / "attacks.json").stat().st_mtime_ns
    assert main(args) == 0 and json.loads((out / "attacks.json").read_text()) == results
    assert (out / "attacks.json").stat().st_mtime_ns >= before


def test_detector_auc_separates_what_differs():
    from tieradv.attacks import detector_auc

    rng = np.random.default_rng(0)
    benign = [rng.standard_normal((30, 4)) for _ in range(20)]
    same = [rng.standard_normal((30, 4)) for _ in range(20)]
    moved = [rng.standard_normal((30, 4)) + 0.8 for _ in range(20)]
    assert detector_auc(benign, moved) > 0.95
    assert detector_auc(benign, same) < 0.8
