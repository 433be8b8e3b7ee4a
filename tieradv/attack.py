"""The generalized attack's two parts (arXiv 2305.17342): partial control, where the attacker's
action is taken with probability epsilon and the agent's benign policy acts otherwise, and the
stealth regularizer, which charges the attacker for moving the state distribution away from the
benign one. Gleave et al.'s attack is epsilon = 1 with no regularizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Policy = Callable[[np.ndarray], np.ndarray]


class PartialControl:
    """The controlled agent's policy under attack: each step, with probability ``epsilon`` the
    attacker's action, otherwise the benign policy's. Seeded, so rollouts repeat."""

    def __init__(self, benign: Policy, attacker: Policy, epsilon: float, seed: int = 0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.benign, self.attacker, self.epsilon = benign, attacker, epsilon
        self.rng = np.random.default_rng(seed)
        self.attacked_steps = self.steps = 0

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        self.steps += 1
        if self.epsilon > 0 and (self.epsilon == 1 or self.rng.random() < self.epsilon):
            self.attacked_steps += 1
            return self.attacker(observation)
        return self.benign(observation)


@dataclass
class GaussianStates:
    """A diagonal Gaussian fitted to states: the benign state distribution's stand-in."""

    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def fit(cls, states: np.ndarray, floor: float = 1e-6) -> GaussianStates:
        states = np.asarray(states, dtype=np.float64)
        return cls(states.mean(axis=0), states.var(axis=0) + floor)


def stealth_penalty(benign: GaussianStates, states: np.ndarray, weight: float) -> np.ndarray:
    """The regularizer per step: weight times how much less likely each state is under the benign
    distribution than the benign states are on average (the cross-entropy term of
    KL(attacked || benign), the part the attacker's actions move)."""
    # nll(s) - E_benign[nll] = 0.5 * sum(z^2 - 1): the log-normalizers cancel, so none is computed
    # in the env's step loop.
    z2 = (np.asarray(states, dtype=np.float64) - benign.mean) ** 2 / benign.var
    return weight * 0.5 * (z2 - 1).sum(axis=-1)


def state_shift(benign_states: np.ndarray, attacked_states: np.ndarray) -> float:
    """KL(attacked || benign) between diagonal-Gaussian fits: the shift figure reported."""
    p = GaussianStates.fit(attacked_states)
    q = GaussianStates.fit(benign_states)
    return float(0.5 * (np.log(q.var / p.var) + (p.var + (p.mean - q.mean) ** 2) / q.var
                        - 1).sum())
