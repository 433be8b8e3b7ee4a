"""The sumo environment: PettingZoo's parallel API test, seeded determinism, RoboSumo's rules
(ring-out, fall, draw at the step limit, +2000/-2000/-1000), rendering; the generalized attack's
limits (epsilon 0 is the benign policy, 1 is full control) and its stealth measures."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; read when mujoco is imported
pytest.importorskip("mujoco")

from pettingzoo.test import parallel_api_test  # noqa: E402

from tieradv.attack import (  # noqa: E402
    GaussianStates,
    PartialControl,
    state_shift,
    stealth_penalty,
)
from tieradv.sumo import DRAW, LOSE, RING_RADIUS, WIN, SumoEnv  # noqa: E402


def test_pettingzoo_parallel_api():
    parallel_api_test(SumoEnv(max_steps=40), num_cycles=60)


def rollout(seed: int, steps: int = 30):
    env, rng = SumoEnv(), np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    trace = [obs["ant0"].copy()]
    for _ in range(steps):
        if not env.agents:
            break
        obs, rewards, *_ = env.step({a: rng.uniform(-1, 1, 8) for a in env.agents})
        trace += [obs["ant0"].copy(), np.array([rewards["ant0"], rewards["ant1"]])]
    return trace


def test_seeded_rollouts_repeat_exactly():
    first, again, other = rollout(3), rollout(3), rollout(4)
    assert len(first) == len(again) and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_ring_out_is_a_win_and_a_loss():
    env = SumoEnv()
    env.reset(seed=0)
    root = env._index["ant1"]["qpos"].start
    env.data.qpos[root:root + 2] = [RING_RADIUS + 0.3, 0.0]  # ant1 past the edge
    obs, rewards, terminations, _, infos = env.step({a: np.zeros(8) for a in env.agents})
    assert all(terminations.values()) and env.agents == []
    assert infos["ant0"]["outcome"] == "win" and infos["ant1"]["outcome"] == "lose"
    assert rewards["ant0"] > WIN - 100 and rewards["ant1"] < LOSE + 100


def test_a_flipped_ant_has_fallen():
    env = SumoEnv()
    env.reset(seed=0)
    root = env._index["ant0"]["qpos"].start
    env.data.qpos[root + 2] = 1.0
    env.data.qpos[root + 3:root + 7] = [0.0, 1.0, 0.0, 0.0]  # upside down
    _, _, terminations, _, infos = env.step({a: np.zeros(8) for a in env.agents})
    assert terminations["ant0"] and infos["ant0"]["outcome"] == "lose"


def test_draw_at_the_step_limit():
    env = SumoEnv(max_steps=5, shaping_weight=0.0)
    env.reset(seed=0)
    for _ in range(5):
        _, rewards, terminations, truncations, infos = env.step({a: np.zeros(8) for a in env.agents})
    assert all(truncations.values()) and not any(terminations.values())
    assert rewards == {"ant0": DRAW, "ant1": DRAW} and infos["ant0"]["outcome"] == "draw"


def test_render_gives_an_image():
    env = SumoEnv(render_mode="rgb_array")
    env.reset(seed=0)
    try:
        frame = env.render()
    except Exception as e:  # no OpenGL (EGL) on this machine
        pytest.skip(f"no OpenGL context for MuJoCo rendering: {e}")
    assert frame.shape == (360, 480, 3) and frame.std() > 10
    env.close()


def test_partial_control_limits():
    benign, attacker = (lambda o: np.zeros(8)), (lambda o: np.ones(8))
    obs = np.zeros(40)
    never = PartialControl(benign, attacker, 0.0, seed=1)
    assert all((never(obs) == 0).all() for _ in range(200)) and never.attacked_steps == 0
    always = PartialControl(benign, attacker, 1.0, seed=1)
    assert all((always(obs) == 1).all() for _ in range(200)) and always.attacked_steps == 200
    some = PartialControl(benign, attacker, 0.3, seed=1)
    share = np.mean([some(obs)[0] for _ in range(4000)])
    assert abs(share - 0.3) < 0.03
    with pytest.raises(ValueError, match="epsilon"):
        PartialControl(benign, attacker, 1.5)


def test_stealth_measures():
    rng = np.random.default_rng(0)
    benign = rng.standard_normal((5000, 6))
    same = rng.standard_normal((5000, 6))
    moved = rng.standard_normal((5000, 6)) + 1.0
    assert state_shift(benign, same) < 0.01 < 2.5 < state_shift(benign, moved) < 3.5  # 6 * 0.5
    fit = GaussianStates.fit(benign)
    assert abs(stealth_penalty(fit, same, 1.0).mean()) < 0.1
    assert stealth_penalty(fit, moved, 1.0).mean() == pytest.approx(3.0, abs=0.2)
    assert stealth_penalty(fit, moved, 0.0).max() == 0.0
