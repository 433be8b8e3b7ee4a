"""tieradv: adversarial policies in multi-agent RL (arXiv 2305.17342). It owns the exact tabular
Markov-game results (robust victim, exploitability, timescale-separated vs. single-timescale
adversarial training); the two-ant sumo environment, the generalized attack and the defenses follow
(see docs/design.md). It imports nothing from tierserve."""

__version__ = "0.1.0"
