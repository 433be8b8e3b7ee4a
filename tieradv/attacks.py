"""Training attackers against a frozen victim and measuring them: Gleave et al.'s attack (full
control of the opponent, epsilon = 1, no stealth charge) and the generalized attack (epsilon-partial
control plus the stealth charge). Reported per attacker: its win rate against the victim, the shift
of the victim's state distribution from benign play (KL of diagonal-Gaussian fits), and how well a
detector tells attacked from benign trajectories (cross-validated ROC AUC of a logistic
regression on trajectory features)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tieradv.attack import GaussianStates, PartialControl, state_shift
from tieradv.train import OneSide, outcome_rates, play, ppo_policy


def detector_auc(benign: list[np.ndarray], attacked: list[np.ndarray]) -> float:
    """Cross-validated ROC AUC of a logistic regression telling attacked from benign trajectories
    by their mean and spread of observations (0.5: indistinguishable)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(trajectory: np.ndarray) -> np.ndarray:
        return np.concatenate([trajectory.mean(axis=0), trajectory.std(axis=0)])

    x = np.array([features(t) for t in benign + attacked])
    y = np.array([0] * len(benign) + [1] * len(attacked))
    folds = max(2, min(5, len(benign), len(attacked)))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(model, x, y, cv=folds, scoring="roc_auc").mean())


@dataclass
class AttackResult:
    epsilon: float
    stealth_weight: float
    steps: int
    win_rate: float  # the attacker's (the victim's losses)
    shift: float
    auc: float
    outcomes: dict = field(default_factory=dict)


def result_path(out: Path, epsilon: float, stealth_weight: float) -> Path:
    """Where one attacker's result JSON goes (a rerun skips the attackers whose file exists)."""
    return out / f"attack-eps{epsilon}-w{stealth_weight}.json"


def train_attacker(victim_path: Path, epsilon: float, stealth_weight: float, steps: int,
                   out: Path, seed: int = 0, episodes: int = 10, n_steps: int = 1024
                   ) -> AttackResult:
    """PPO for the opponent's side against the frozen victim; the benign opponent is the victim's
    own policy playing the other side (self-play's opponent)."""
    from stable_baselines3 import PPO

    # One frozen model plays both roles: predict(deterministic=True) keeps no state between calls.
    victim = benign = ppo_policy(PPO.load(victim_path, device="cpu"))
    benign_trajectories, _ = play(victim, benign, episodes, seed=50_000)
    benign_states = np.concatenate(benign_trajectories)
    fit = GaussianStates.fit(benign_states)
    env = OneSide(victim, learner="ant1", epsilon=epsilon, benign=benign, stealth=fit,
                  stealth_weight=stealth_weight, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=min(n_steps, steps), batch_size=min(256, steps),
                seed=seed, device="cpu", verbose=0)
    model.learn(steps)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / f"attacker-eps{epsilon}-w{stealth_weight}.zip")
    attacked = PartialControl(benign, ppo_policy(model), epsilon, seed=seed + 1)
    trajectories, outcomes = play(victim, attacked, episodes, seed=60_000)
    counts = outcome_rates(outcomes)
    result = AttackResult(epsilon, stealth_weight, steps, counts["lose"],
                          state_shift(benign_states, np.concatenate(trajectories)),
                          detector_auc(benign_trajectories, trajectories), counts)
    result_path(out, epsilon, stealth_weight).write_text(json.dumps(result.__dict__))
    return result
