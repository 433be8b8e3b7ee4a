"""tieradv: adversarial policies in multi-agent RL (arXiv 2305.17342). It owns the exact tabular
Markov-game results (robust victim, exploitability, timescale-separated vs. single-timescale
adversarial training), the two-ant MuJoCo sumo environment, self-play PPO for the victim, and the
generalized attack (partial control, stealth charge) with its measures; the PPO defenses are still
to come (see docs/design.md). It imports nothing from tierserve."""

__version__ = "0.1.0"
