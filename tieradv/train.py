"""Learning on the sumo environment with Stable-Baselines3's PPO: one side learns while the other
follows a fixed policy (a frozen snapshot of the learner in self-play, a random or scripted
opponent, or a frozen victim under attack); evaluation by win rate; resumable checkpoints.

Each training run is the three-call step seam: ``schedule`` (the next chunk of environment steps
and the opponent snapshot it plays), ``execute`` (PPO learns on it) and ``update`` (checkpoint, new
snapshot, curve)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium
import numpy as np

from tieradv.attack import GaussianStates, PartialControl, stealth_penalty
from tieradv.sumo import OTHER, SumoEnv


class RandomPolicy:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        return self.rng.uniform(-1, 1, 8)


class StandPolicy:
    """A scripted opponent that holds its stance (zero torque): it never leaves the ring or falls
    by itself, so beating it takes pushing it out."""

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        return np.zeros(8)


class GaitPolicy:
    """A scripted opponent: a fixed open-loop trot (hips and ankles on phase-shifted sines). It
    walks blind, so it tends to leave the ring by itself."""

    def __init__(self, period: int = 10, amplitude: float = 0.4) -> None:
        self.period, self.amplitude, self.t = period, amplitude, 0
        self.phase = np.array([0, 0.5, 0.5, 0, 0, 0.5, 0.5, 0]) * 2 * np.pi

    def reset(self) -> None:
        self.t = 0

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        self.t += 1
        return self.amplitude * np.sin(2 * np.pi * self.t / self.period + self.phase)


# Factories, not instances: each evaluation gets a fresh opponent, so its result does not depend on
# how many evaluations ran before it (a shared RandomPolicy's stream would).
OPPONENTS = {"random": lambda: RandomPolicy(1), "gait": GaitPolicy, "stand": StandPolicy}


def ppo_policy(model):
    return lambda observation: model.predict(observation, deterministic=True)[0]


class OneSide(gymnasium.Env):
    """One agent's view of the sumo match: ``opponent`` plays the other side. Under attack, the
    learner is the attacker: its action is executed with probability ``epsilon`` and ``benign``
    acts otherwise (PartialControl), and ``stealth`` (a benign state fit) with ``stealth_weight``
    charges it for the states the victim sees."""

    def __init__(self, opponent, learner: str = "ant1", epsilon: float = 1.0, benign=None,
                 stealth: GaussianStates | None = None, stealth_weight: float = 0.0,
                 shaping_weight: float = 1.0, seed: int = 0) -> None:
        self.env = SumoEnv(shaping_weight=shaping_weight)
        self.learner, self.other = learner, OTHER[learner]
        self.opponent, self.seed_ = opponent, seed
        self.control = PartialControl(benign, lambda o: self._action, epsilon, seed) \
            if benign is not None else None
        self.stealth, self.stealth_weight = stealth, stealth_weight
        self.observation_space = self.env.observation_space(learner)
        self.action_space = self.env.action_space(learner)
        self._episodes = 0
        self._obs: dict = {}

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._episodes += 1
        self._obs, _ = self.env.reset(seed=self.seed_ * 100_003 + self._episodes
                                      if seed is None else seed)
        if hasattr(self.opponent, "reset"):
            self.opponent.reset()
        return self._obs[self.learner], {}

    def step(self, action):
        self._action = np.asarray(action)
        own = self.control(self._obs[self.learner]) if self.control else self._action
        actions = {self.learner: own, self.other: self.opponent(self._obs[self.other])}
        self._obs, rewards, terminations, truncations, infos = self.env.step(actions)
        reward = rewards[self.learner]
        if self.stealth is not None and self.stealth_weight:
            reward -= float(stealth_penalty(self.stealth, self._obs[self.other][None],
                                            self.stealth_weight)[0])
        return (self._obs[self.learner], reward, terminations[self.learner],
                truncations[self.learner], infos[self.learner])


def play(policy, opponent, episodes: int, seed: int, learner: str = "ant0"
         ) -> tuple[list[np.ndarray], list[str]]:
    """``policy`` playing ``learner`` against ``opponent``, one seeded episode after another: the
    learner's observations per episode (the state it saw before each step) and its outcomes."""
    env = SumoEnv()
    other = OTHER[learner]
    trajectories, outcomes = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        if hasattr(opponent, "reset"):
            opponent.reset()
        seen, infos = [obs[learner]], {}
        while env.agents:
            obs, _, _, _, infos = env.step({learner: policy(obs[learner]),
                                            other: opponent(obs[other])})
            if env.agents:
                seen.append(obs[learner])
        trajectories.append(np.array(seen))
        outcomes.append(infos[learner]["outcome"])
    return trajectories, outcomes


def outcome_rates(outcomes: list[str]) -> dict[str, float]:
    """The share of each outcome ("win", "lose", "draw") among ``outcomes``."""
    return {k: outcomes.count(k) / len(outcomes) for k in ("win", "lose", "draw")}


def evaluate(policy, opponent, episodes: int = 20, learner: str = "ant0", seed: int = 10_000
             ) -> dict:
    """Win/loss/draw rates of ``policy`` playing ``learner`` against ``opponent``."""
    _, outcomes = play(policy, opponent, episodes, seed, learner)
    return outcome_rates(outcomes) | {"episodes": episodes}


@dataclass
class SelfPlayPlan:
    steps: int  # environment steps to learn in this chunk
    snapshot: int  # which frozen copy the opponent is


@dataclass
class SelfPlayState:
    done_steps: int = 0
    snapshots: int = 0
    curve: list = field(default_factory=list)  # win rates against OPPONENTS after each chunk


class SelfPlay:
    """Self-play PPO for the victim: the learner plays ``ant0`` against a frozen copy of itself,
    refreshed every chunk; checkpoints after each chunk, so a killed run resumes where it was."""

    def __init__(self, out: Path, total_steps: int, chunk: int = 4096, seed: int = 0,
                 n_steps: int = 1024, eval_episodes: int = 4) -> None:
        from stable_baselines3 import PPO

        self.out, self.total, self.chunk, self.seed = Path(out), total_steps, chunk, seed
        self.eval_episodes = eval_episodes
        self.out.mkdir(parents=True, exist_ok=True)
        self.frozen = RandomPolicy(seed)  # the first opponent, until a snapshot exists
        self.env = OneSide(self._opponent, learner="ant0", seed=seed)
        state_file, model_file = self.out / "state.json", self.out / "model.zip"
        if state_file.exists() and model_file.exists():
            self.state = SelfPlayState(**json.loads(state_file.read_text()))
            self.model = PPO.load(model_file, env=self.env, device="cpu")
            if self.state.snapshots:
                self._freeze()
        else:
            self.state = SelfPlayState()
            n_steps = min(n_steps, chunk)  # so a chunk is whole rollouts
            self.model = PPO("MlpPolicy", self.env, n_steps=n_steps, batch_size=min(256, n_steps),
                             seed=seed, device="cpu", verbose=0)

    def _opponent(self, observation: np.ndarray) -> np.ndarray:
        return self.frozen(observation)

    def _freeze(self) -> None:
        """The opponent becomes a frozen copy of the last checkpoint (model.zip)."""
        from stable_baselines3 import PPO

        self.frozen = ppo_policy(PPO.load(self.out / "model.zip", device="cpu"))

    def schedule(self) -> SelfPlayPlan | None:
        left = self.total - self.state.done_steps
        return SelfPlayPlan(min(self.chunk, left), self.state.snapshots) if left > 0 else None

    def execute(self, plan: SelfPlayPlan) -> None:
        self.model.learn(plan.steps, reset_num_timesteps=False)

    def update(self, plan: SelfPlayPlan) -> None:
        self.state.done_steps += plan.steps
        self.state.snapshots += 1
        rates = {name: evaluate(ppo_policy(self.model), make(), self.eval_episodes)["win"]
                 for name, make in OPPONENTS.items()}
        self.state.curve.append({"steps": self.state.done_steps, **rates})
        self.model.save(self.out / "model.zip")
        (self.out / "state.json").write_text(json.dumps(self.state.__dict__))
        self._freeze()

    def run(self, progress: bool = True) -> SelfPlayState:
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=self.state.done_steps, unit="step",
                   desc="self-play", disable=not progress)
        while (plan := self.schedule()) is not None:
            self.execute(plan)
            self.update(plan)
            bar.update(plan.steps)
        bar.close()
        return self.state
