"""Exact results on tabular zero-sum Markov games: matrix-game values, Shapley's robust victim (zero
exploitability), best responses against brute force, policy gradients against finite differences,
and the convergence claim: timescale-separated training drives exploitability to zero at a
polynomial rate where single-timescale play keeps oscillating."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tieradv.tabular import (
    best_response,
    exploitability,
    fitted_rate,
    gradients,
    make_game,
    policy_value,
    project_simplex,
    run_dynamics,
    shapley,
    solve_matrix_game,
)


@pytest.mark.parametrize("payoff, value, x", [
    ([[1, -1], [-1, 1]], 0.0, [0.5, 0.5]),  # matching pennies
    ([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], 0.0, [1 / 3] * 3),  # rock-paper-scissors
    ([[3, 1], [2, 0]], 1.0, [1.0, 0.0]),  # the first row dominates
    ([[2, -1], [-1, 1]], 0.2, [0.4, 0.6]),  # mixed, value (2-1)/(2+1+1+1)
])
def test_matrix_games(payoff, value, x):
    got_value, got_x, got_y = solve_matrix_game(np.array(payoff, dtype=float))
    assert got_value == pytest.approx(value, abs=1e-9)
    np.testing.assert_allclose(got_x, x, atol=1e-9)
    assert got_x @ np.array(payoff) @ got_y == pytest.approx(value, abs=1e-9)


@pytest.fixture(scope="module", params=["pennies", "random"])
def game(request):
    return make_game(request.param, states=4, actions=2, gamma=0.8, seed=3)


def test_shapley_is_a_fixed_point_and_its_victim_is_unexploitable(game):
    value, victim, attacker = shapley(game)
    stage = game.reward + game.gamma * game.transition @ value
    for s in range(len(value)):
        assert solve_matrix_game(stage[s])[0] == pytest.approx(value[s], abs=1e-9)
    assert abs(exploitability(game, victim, value)) < 1e-9
    np.testing.assert_allclose(policy_value(game, victim, attacker), value, atol=1e-8)


def test_best_response_equals_brute_force(game):
    rng = np.random.default_rng(0)
    victim = rng.dirichlet(np.ones(2), size=4)
    worst, _ = best_response(game, victim)
    brute = min((policy_value(game, victim, np.eye(2)[list(choice)])
                 for choice in itertools.product(range(2), repeat=4)), key=lambda v: game.start @ v)
    np.testing.assert_allclose(worst, brute, atol=1e-10)
    assert exploitability(game, victim) > 0


def test_gradients_match_finite_differences(game):
    rng = np.random.default_rng(1)
    victim, attacker = rng.dirichlet(np.ones(2), size=4), rng.dirichlet(np.ones(2), size=4)
    grad_v, grad_a = gradients(game, victim, attacker)
    h = 1e-6
    for s, a in itertools.product(range(4), range(2)):
        bumped = victim.copy()
        bumped[s, a] += h  # the direct parametrization, off the simplex (the gradient theorem's)
        numeric = (game.start @ policy_value(game, bumped, attacker)
                   - game.start @ policy_value(game, victim, attacker)) / h
        assert grad_v[s, a] == pytest.approx(numeric, rel=1e-4, abs=1e-6)
        bumped = attacker.copy()
        bumped[s, a] += h
        numeric = (game.start @ policy_value(game, victim, bumped)
                   - game.start @ policy_value(game, victim, attacker)) / h
        assert grad_a[s, a] == pytest.approx(numeric, rel=1e-4, abs=1e-6)


def test_simplex_projection():
    rows = np.array([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [-1.0, 0.5, 0.6]])
    out = project_simplex(rows)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[0], rows[0])
    np.testing.assert_allclose(out[1], [1, 0, 0])
    np.testing.assert_allclose(out[2], [0, 0.45, 0.55])


def test_timescale_separation_converges_and_single_timescale_does_not():
    game = make_game("pennies", states=4, actions=2, gamma=0.8, seed=0)
    steps, every = 1000, 20
    separated = run_dynamics(game, steps, victim_lr=0.1, attacker_lr=0.5, attacker_steps=20,
                             seed=0, record_every=every)
    single = run_dynamics(game, steps, victim_lr=0.1, attacker_lr=0.1, seed=0, record_every=every)
    start = separated.exploitability[0]
    assert single.exploitability[0] == start  # the same seeded start
    late = separated.exploitability[3 * len(separated.exploitability) // 4:]
    assert max(late) < 0.08 * start  # driven towards the robust victim
    assert fitted_rate(separated.exploitability, every) < -0.15  # polynomially
    tail = single.exploitability[len(single.exploitability) // 2:]
    assert min(tail) > 0.5 * start  # simultaneous play never settles
    assert max(tail) - min(tail) > 0.2 * max(tail)  # it keeps oscillating
