"""Router traces and route books: which experts each request's tokens chose, per MoE layer.

A trace is JSON lines, one finished request per line:
``{"prompt": [ids], "output": [ids], "routes": {"<layer>": [[expert, ...] per position]}}``
where position ``p`` is the token at ``p`` of prompt + output (the last output token is never
computed, so it has no route). Written by ``tierserve moe trace``, read by the predictor's
trainer, the static policy (expert frequencies) and the oracle (exact routes). No torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tierserve.experts.cache import ExpertKey


@dataclass(slots=True)
class RequestTrace:
    prompt: list[int]
    output: list[int]
    routes: dict[int, list[list[int]]] = field(default_factory=dict)  # layer -> per position
    # layer -> per position: what the next MoE layer's router picks on this layer's input (the
    # gate lookahead's guess), so that a replay onto another model can still run ``lookahead``
    lookahead: dict[int, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(per_position) for per_position in self.routes.values()}
        if len(lengths) > 1:
            raise ValueError(f"a trace's layers cover different numbers of positions: {lengths}")

    @property
    def num_positions(self) -> int:
        return len(next(iter(self.routes.values()), []))

    def experts_at(self, layer: int, start: int, stop: int) -> set[int]:
        """Experts chosen at ``layer`` by positions ``start .. stop - 1``."""
        return {e for choice in self.routes.get(layer, [])[start:stop] for e in choice}

    def shares(self, layer: int, num_experts: int, start: int = 0) -> list[float]:
        """Each expert's share of the choices at ``layer`` from position ``start`` on (sums to 1)."""
        counts = Counter(e for choice in self.routes.get(layer, [])[start:] for e in choice)
        total = sum(counts.values())
        return [counts[e] / total if total else 0.0 for e in range(num_experts)]

    def to_json(self) -> str:
        data = {"prompt": self.prompt, "output": self.output,
                "routes": {str(layer): r for layer, r in sorted(self.routes.items())}}
        if self.lookahead:
            data["lookahead"] = {str(layer): r for layer, r in sorted(self.lookahead.items())}
        return json.dumps(data)

    @classmethod
    def from_json(cls, line: str) -> RequestTrace:
        data = json.loads(line)
        return cls(list(data["prompt"]), list(data["output"]),
                   {int(layer): r for layer, r in data["routes"].items()},
                   {int(layer): r for layer, r in data.get("lookahead", {}).items()})


def by_votes(rows: Iterable[Iterable[int]]) -> list[int]:
    """The experts some row chose, most chosen first (ties by id): a lookahead's prefetch order,
    since a prefetch window looks at the front of the list only."""
    votes = Counter(e for row in rows for e in row)
    return sorted(votes, key=lambda e: (-votes[e], e))


def prompt_key(prompt: Iterable[int]) -> str:
    """A request's identity in a trace: the hash of its prompt tokens."""
    return hashlib.blake2b(json.dumps(list(prompt)).encode(), digest_size=12).hexdigest()


def write_traces(path: str | Path, traces: Iterable[RequestTrace]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for trace in traces:
            out.write(trace.to_json() + "\n")
            count += 1
    return count


def read_traces(path: str | Path) -> list[RequestTrace]:
    """Every request of a trace file; a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"router trace {path} does not exist; record one with "
                                "`tierserve moe trace MODEL OUT.jsonl`")
    traces = []
    for number, line in enumerate(_lines(path), start=1):
        try:
            traces.append(RequestTrace.from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a router trace line ({exc})") from exc
    return traces


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        yield from (line for line in lines if line.strip())


def trace_layout(traces: list[RequestTrace]) -> tuple[list[int], int, int]:
    """(MoE layers, experts per layer, experts per token) of a trace: the largest expert id
    seen + 1, and the longest choice."""
    choices = [c for t in traces for per_position in t.routes.values() for c in per_position]
    return (sorted(traces[0].routes), 1 + max(e for c in choices for e in c),
            max(len(c) for c in choices))


def expert_frequencies(traces: Iterable[RequestTrace]) -> Counter[ExpertKey]:
    """How often each (layer, expert) was chosen over every position of every trace."""
    counts: Counter[ExpertKey] = Counter()
    for trace in traces:
        for layer, per_position in trace.routes.items():
            counts.update((layer, e) for choice in per_position for e in choice)
    return counts


@dataclass(slots=True)
class PredictedRoute:
    """A request's predicted path: per MoE layer, each expert's share of its tokens' choices."""

    shares: dict[int, list[float]]


def write_predictions(path: str | Path, predictions: dict[str, PredictedRoute]) -> int:
    """Predicted routes by prompt key, one JSON line each (``tierserve moe predict``): what the
    simulator's expertflow reads without running the predictor."""
    with open(path, "w", encoding="utf-8") as out:
        for key, route in predictions.items():
            shares = {str(layer): row for layer, row in sorted(route.shares.items())}
            out.write(json.dumps({"prompt_key": key, "shares": shares}) + "\n")
    return len(predictions)


def read_predictions(path: str | Path) -> dict[str, PredictedRoute]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predicted routes {path} do not exist; write them with "
                                "`tierserve moe predict PREDICTOR TRACE.jsonl OUT.jsonl`")
    predictions = {}
    for number, line in enumerate(_lines(path), start=1):
        try:
            data = json.loads(line)
            predictions[data["prompt_key"]] = PredictedRoute(
                {int(layer): [float(v) for v in row] for layer, row in data["shares"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{number}: not a predicted-route line ({exc})") from exc
    return predictions


@dataclass(slots=True)
class StepRequest:
    """One request's chunk in this step, as the expert policies see it."""

    request_id: str
    start_pos: int
    num_tokens: int
