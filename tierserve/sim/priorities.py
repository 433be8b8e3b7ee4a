"""FastSwitch's priority patterns: each conversation's priority changes as the run goes.

FastSwitch (Shen et al., 2024, section 6) evaluates fairness-aware scheduling under priorities
that are re-drawn at a fixed frequency (a fraction of steps: 0.04 re-draws every 25 steps):

    random  every update, each conversation gets a level drawn uniformly from ``levels``
    markov  every update, each conversation stays at its level with probability ``stay``, else
            moves one level up or down (a birth-death chain over the levels)

Lower values run first (as ``Request.priority``). Used as the driver's ``before_step`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class PriorityPattern:
    """Re-draws live requests' priorities by conversation (``client_id``) every few steps."""

    kind: str = "random"  # random | markov
    update_fraction: float = 0.04  # updates per step
    levels: int = 4
    stay: float = 0.6
    seed: int = 0
    updates: int = 0
    _levels: dict[str, int] = field(default_factory=dict)
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("random", "markov"):
            raise ValueError(f"priority pattern must be random or markov, got {self.kind!r}")
        if not 0 < self.update_fraction <= 1:
            raise ValueError("update_fraction must be in (0, 1]")
        self._rng = np.random.default_rng(self.seed)

    @property
    def every(self) -> int:
        return max(1, round(1 / self.update_fraction))

    def __call__(self, step: int, core) -> None:
        requests = core.scheduler.requests.values()
        for request in requests:  # a new conversation starts at a random level
            client = request.client_id or request.request_id
            if client not in self._levels:
                self._levels[client] = int(self._rng.integers(self.levels))
        if step % self.every == 0:
            self.updates += 1
            for client, level in self._levels.items():
                self._levels[client] = self._next(level)
        for request in requests:
            request.priority = self._levels[request.client_id or request.request_id]

    def _next(self, level: int) -> int:
        if self.kind == "random":
            return int(self._rng.integers(self.levels))
        if self._rng.random() < self.stay:
            return level
        move = -1 if self._rng.random() < 0.5 else 1
        return min(self.levels - 1, max(0, level + move))
