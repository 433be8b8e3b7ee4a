"""Tabular two-player zero-sum Markov games with exact answers: Shapley's value iteration for the
robust (max-min) victim policy, exact attacker best responses and the victim's exploitability, and
the policy-gradient dynamics of the defense: timescale-separated (the attacker near a best response,
the victim slower) against single-timescale simultaneous gradient descent-ascent."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog


@dataclass
class MarkovGame:
    transition: np.ndarray  # (S, Av, Aa, S): P(s' | s, victim action, attacker action)
    reward: np.ndarray  # (S, Av, Aa): the victim's reward; the attacker gets its negative
    gamma: float
    start: np.ndarray  # (S,): initial state distribution

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.reward.shape


def make_game(kind: str = "pennies", states: int = 4, actions: int = 2, gamma: float = 0.8,
              seed: int = 0) -> MarkovGame:
    """``pennies``: every state a perturbed matching-pennies stage (a unique mixed equilibrium, where
    simultaneous gradient play cycles); ``random``: uniform random payoffs. Transitions are random
    and depend on both actions; the start distribution has full support."""
    rng = np.random.default_rng(seed)
    if kind == "pennies":
        base = np.where(np.eye(actions, dtype=bool), 1.0, -1.0 / max(1, actions - 1))
        reward = base[None] + 0.3 * rng.standard_normal((states, actions, actions))
    elif kind == "random":
        reward = rng.uniform(-1, 1, (states, actions, actions))
    else:
        raise ValueError(f"unknown game kind {kind!r} (pennies, random)")
    transition = rng.dirichlet(np.ones(states), size=(states, actions, actions))
    return MarkovGame(transition, reward, gamma, np.full(states, 1.0 / states))


def solve_matrix_game(payoff: np.ndarray, value_only: bool = False
                      ) -> tuple[float, np.ndarray, np.ndarray | None]:
    """max_x min_y x^T payoff y by linear programming: (value, x, y); y is None with value_only."""

    def maximin(matrix: np.ndarray) -> tuple[float, np.ndarray]:
        n, m = matrix.shape
        cost = np.r_[np.zeros(n), -1.0]  # maximise v
        upper = np.c_[-matrix.T, np.ones(m)]  # v <= x^T M[:, j] for every column j
        result = linprog(cost, A_ub=upper, b_ub=np.zeros(m), A_eq=np.r_[np.ones(n), 0.0][None],
                         b_eq=[1.0], bounds=[(0, 1)] * n + [(None, None)], method="highs")
        if not result.success:
            raise RuntimeError(f"matrix game LP failed: {result.message}")
        x = np.clip(result.x[:n], 0, None)
        return float(result.x[-1]), x / x.sum()

    value, x = maximin(payoff)
    if value_only:
        return value, x, None
    _, y = maximin(-payoff.T)
    return value, x, y


def shapley(game: MarkovGame, tol: float = 1e-11, max_iter: int = 10_000):
    """The game's value per state and the max-min (robust) victim policy and min-max attacker
    policy, by Shapley's value iteration (a gamma-contraction)."""
    states, victim_actions, attacker_actions = game.shape
    value = np.zeros(states)
    for _ in range(max_iter):
        stage = game.reward + game.gamma * game.transition @ value  # (S, Av, Aa)
        new = np.array([solve_matrix_game(stage[s], value_only=True)[0] for s in range(states)])
        converged = np.max(np.abs(new - value)) < tol
        value = new
        if converged:
            break
    stage = game.reward + game.gamma * game.transition @ value
    solved = [solve_matrix_game(stage[s]) for s in range(states)]
    victim = np.array([x for _, x, _ in solved])
    attacker = np.array([y for _, _, y in solved])
    return value, victim, attacker


def _joint(game: MarkovGame, victim: np.ndarray, attacker: np.ndarray):
    reward = np.einsum("sa,sab,sb->s", victim, game.reward, attacker)
    transition = np.einsum("sa,sabt,sb->st", victim, game.transition, attacker)
    return reward, transition


def policy_value(game: MarkovGame, victim: np.ndarray, attacker: np.ndarray) -> np.ndarray:
    """V(s) of the victim under both (stationary, stochastic) policies, exactly."""
    reward, transition = _joint(game, victim, attacker)
    return np.linalg.solve(np.eye(len(reward)) - game.gamma * transition, reward)


def best_response(game: MarkovGame, victim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's exact best response to a fixed victim policy (policy iteration on the MDP it
    induces): (the victim's value under it, the deterministic attacker policy)."""
    states, _, attacker_actions = game.shape
    reward = np.einsum("sa,sab->sb", victim, game.reward)  # (S, Aa)
    transition = np.einsum("sa,sabt->sbt", victim, game.transition)  # (S, Aa, S)
    choice = np.zeros(states, dtype=int)
    while True:
        r = reward[np.arange(states), choice]
        p = transition[np.arange(states), choice]
        value = np.linalg.solve(np.eye(states) - game.gamma * p, r)
        q = reward + game.gamma * transition @ value
        better = q.argmin(axis=1)
        improve = q[np.arange(states), better] < q[np.arange(states), choice] - 1e-12
        if not improve.any():
            return value, np.eye(attacker_actions)[choice]
        choice = np.where(improve, better, choice)


def exploitability(game: MarkovGame, victim: np.ndarray, game_value: np.ndarray | None = None
                   ) -> float:
    """How much a best-responding attacker pushes the victim below the game's value (from the
    start distribution): 0 exactly for a max-min victim policy, positive otherwise."""
    if game_value is None:
        game_value = shapley(game)[0]
    worst, _ = best_response(game, victim)
    return float(game.start @ game_value - game.start @ worst)


def project_simplex(rows: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the probability simplex."""
    n = rows.shape[-1]
    ordered = -np.sort(-rows, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1) - 1
    index = np.arange(1, n + 1)
    condition = ordered - cumulative / index > 0
    rho = n - 1 - np.argmax(condition[..., ::-1], axis=-1)
    theta = cumulative[np.arange(len(rows)), rho] / (rho + 1)
    return np.maximum(rows - theta[:, None], 0)


def gradients(game: MarkovGame, victim: np.ndarray, attacker: np.ndarray):
    """Exact policy gradients of start @ V under the direct parametrization (the policy gradient
    theorem): d/d victim(a|s) = d(s) Q_v(s, a) / (1 - gamma), likewise for the attacker."""
    reward, transition = _joint(game, victim, attacker)
    resolvent = np.eye(len(reward)) - game.gamma * transition  # I - gamma P, solved twice
    value = np.linalg.solve(resolvent, reward)
    visits = np.linalg.solve(resolvent.T, game.start)  # d(s) / (1 - gamma): discounted visits
    stage = game.reward + game.gamma * game.transition @ value  # (S, Av, Aa)
    q_victim = np.einsum("sab,sb->sa", stage, attacker)
    q_attacker = np.einsum("sa,sab->sb", victim, stage)
    return visits[:, None] * q_victim, visits[:, None] * q_attacker


@dataclass
class DynamicsResult:
    name: str
    exploitability: list[float] = field(default_factory=list)
    victim: np.ndarray | None = None
    attacker: np.ndarray | None = None


def run_dynamics(game: MarkovGame, steps: int, victim_lr: float, attacker_lr: float,
                 attacker_steps: int = 1, name: str = "", seed: int = 0,
                 record_every: int = 1, decay: float = 0.5) -> DynamicsResult:
    """Projected gradient play from a seeded interior start. Each step the attacker takes
    ``attacker_steps`` descent steps on the victim's value, then the victim one ascent step.
    Timescale separation: attacker_steps > 1 and/or victim_lr << attacker_lr; the single-timescale
    baseline: one step each at equal rates, simultaneously (chosen by ``attacker_steps == 1`` and
    equal rates). The victim's rate decays as ``(1 + step) ** -decay`` in both (a subgradient
    method needs it: the victim's worst case is not smooth where the best response switches); the
    attacker's decays with it only in simultaneous play, and stays constant when separated."""
    rng = np.random.default_rng(seed)
    states, victim_actions, attacker_actions = game.shape
    victim = rng.dirichlet(np.ones(victim_actions) * 2, size=states)
    attacker = rng.dirichlet(np.ones(attacker_actions) * 2, size=states)
    game_value = shapley(game)[0]
    out = DynamicsResult(name)
    for step in range(steps):
        if step % record_every == 0:
            out.exploitability.append(exploitability(game, victim, game_value))
        scale = (1 + step) ** -decay
        if attacker_steps == 1 and victim_lr == attacker_lr:  # simultaneous play
            grad_v, grad_a = gradients(game, victim, attacker)
            victim = project_simplex(victim + scale * victim_lr * grad_v)
            attacker = project_simplex(attacker - scale * attacker_lr * grad_a)
            continue
        for _ in range(attacker_steps):
            _, grad_a = gradients(game, victim, attacker)
            attacker = project_simplex(attacker - attacker_lr * grad_a)
        grad_v, _ = gradients(game, victim, attacker)
        victim = project_simplex(victim + scale * victim_lr * grad_v)
    out.victim, out.attacker = victim, attacker
    return out


def fitted_rate(values: list[float], record_every: int = 1, skip: float = 0.1) -> float:
    """The slope of log(exploitability) against log(step) over the run past its first ``skip``
    share: about -k for an O(step^-k) decay, about 0 when it does not decay."""
    y = np.asarray(values, dtype=float)
    x = (np.arange(len(y)) + 1) * record_every
    keep = slice(int(len(y) * skip), None)
    y = np.maximum(y[keep], 1e-15)
    return float(np.polyfit(np.log(x[keep]), np.log(y), 1)[0])
