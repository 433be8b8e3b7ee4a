"""Expert-caching policies (``--expert-policy``): what to load ahead, what to keep, what to pin.

A policy is a small class registered by name. The offload driver (``offload.py``) owns the
mechanism: slots, loads, waits. A policy only answers, in pure Python:

- ``pinned()``: experts held for the whole run (the static hot set);
- ``begin_step(chunks)`` and ``after_route(layer)``: experts to load ahead, most urgent first;
- ``score(key)``: how much an expert in a free slot is worth keeping (lower is evicted first,
  0 means "nobody is predicted to need it"); ``None`` from ``scores`` means plain LRU.

``lookahead`` asks the driver to run the next MoE layer's router on this layer's input and
load what it picks (Mixtral-offloading's gate lookahead; that needs tensors, so the driver does
it). Predictions and true routes reach the policy through ``annotate`` (a request's predicted
path or trace, set when the request arrives) and ``forget``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tierserve.experts.cache import ExpertKey
from tierserve.experts.routes import (
    PredictedRoute,
    RequestTrace,
    StepRequest,
    expert_frequencies,
    prompt_key,
)

NEGLIGIBLE = 0.01  # a score below this counts as no predicted use


class ExpertPolicy:
    """On-demand LRU: load an expert when a forward asks for it, evict the least recently used."""

    name = "lru"
    lookahead = False
    scores = False  # True: the cache evicts by ``score`` instead of recency
    observes = False  # True: ``observe`` is told each request's recent true choices
    needs = ""  # "trace" | "predictor": what the policy reads

    def bind(self, moe_layers: Sequence[int], num_experts: int, top_k: int,
             num_slots: int) -> None:
        self.moe_layers = list(moe_layers)
        self.num_experts, self.top_k, self.num_slots = num_experts, top_k, num_slots
        self._position = {layer: i for i, layer in enumerate(self.moe_layers)}

    def pinned(self) -> list[ExpertKey]:
        return []

    def annotate(self, request_id: str, route: PredictedRoute | RequestTrace | None) -> None:
        """What is known of a new request's path (None: nothing)."""

    def forget(self, request_id: str) -> None:
        """The request ended."""

    def observe(self, request_id: str, layer: int, choices: list[list[int]]) -> None:
        """The experts the request's last computed tokens chose at ``layer``, oldest first."""

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        """The experts the policy now expects the request to use most, per MoE layer."""
        return None

    def begin_step(self, chunks: Sequence[StepRequest], waiting: Sequence[str] = ()
                   ) -> list[ExpertKey]:
        return []

    def after_route(self, layer: int) -> list[ExpertKey]:
        return []

    def score(self, key: ExpertKey) -> float:
        return 0.0


class LookaheadPolicy(ExpertPolicy):
    """Mixtral-offloading: LRU plus the next layer's gate run on this layer's input."""

    name = "lookahead"
    lookahead = True


class StaticPolicy(ExpertPolicy):
    """Fiddler / ktransformers / ``--n-cpu-moe``: the most often chosen experts of a recorded
    trace stay pinned; the others share the remaining slots on demand (LRU). The remaining
    slots are at least one layer's experts, so any forward fits."""

    name = "static"
    needs = "trace"

    def __init__(self, traces: Sequence[RequestTrace]) -> None:
        self.frequencies = expert_frequencies(traces)

    def pinned(self) -> list[ExpertKey]:
        room = max(0, self.num_slots - self.num_experts)
        return [key for key, _ in self.frequencies.most_common(room)]


class _PredictiveBase(ExpertPolicy):
    """Prefetch by the demand of this step's requests, ``depth`` MoE layers ahead; evict by
    predicted next use (LSM-GNN's look-ahead: the expert needed furthest away goes first).
    Demand is a (MoE layers, experts) array of probabilities of use."""

    scores = True

    # 0.3 over 0.5: hit ratio 0.979 vs 0.952 at +2% bytes read (16 requests of a seed-2 text
    # workload, MoEfied SmolLM2, 120 of 480 experts; the bench uses other prompts).
    def __init__(self, depth: int = 2, threshold: float = 0.3) -> None:
        self.depth = depth
        self.threshold = threshold  # prefetch experts at least this likely to be used
        self._demand = np.zeros((0, 0))  # (layers, experts): P(used this step)
        self._next_demand = np.zeros((0, 0))  # ... by the step after
        self._layer = -1  # the MoE layer the forward has routed last; -1 before the first
        self._scores: dict[ExpertKey, float] = {}  # valid until the layer or the demand moves

    def demand(self, chunks: Sequence[StepRequest], waiting: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def begin_step(self, chunks: Sequence[StepRequest], waiting: Sequence[str] = ()
                   ) -> list[ExpertKey]:
        self._demand, self._next_demand = self.demand(chunks, waiting)
        self._layer = -1
        self._scores = {}
        return self._ahead(range(min(self.depth, len(self.moe_layers))))

    def after_route(self, layer: int) -> list[ExpertKey]:
        self._layer = layer
        self._scores = {}
        index = self._position[layer]
        return self._ahead(range(index + 1, min(index + 1 + self.depth, len(self.moe_layers))))

    def _ahead(self, positions) -> list[ExpertKey]:
        keys = []
        for position in positions:
            row = self._demand[position]
            order = np.argsort(-row, kind="stable")
            keys += [(self.moe_layers[position], int(e)) for e in order
                     if row[e] >= self.threshold]
        return keys

    def score(self, key: ExpertKey) -> float:
        """Predicted use over the distance to it, in MoE layers: this step's later layers come
        first, then the next step's (the running decodes come back)."""
        cached = self._scores.get(key)
        if cached is None:
            cached = self._scores[key] = self._score(key)
        return cached

    def _score(self, key: ExpertKey) -> float:
        layer, expert = key
        position = self._position.get(layer)
        if position is None or not self._demand.size:
            return 0.0
        current = self._position.get(self._layer, -1)
        soon = float(self._demand[position, expert]) if position > current else 0.0
        later = float(self._next_demand[position, expert])
        value = max(soon / (position - current) if soon else 0.0,
                    later / (len(self.moe_layers) - current + position))
        # Below this, "nobody needs it": the pool then takes the first such slot it meets
        # instead of scanning on for the very least.
        return value if value >= NEGLIGIBLE else 0.0


class ExpertFlowPolicy(_PredictiveBase):
    """ExpertFlow: each request's path predicted from its prompt (``RoutePredictor``) drives
    prefetch and eviction before the request computes; once it computes, the prediction is
    corrected by what its tokens actually chose (a recency-weighted average: consecutive tokens
    of a request share most experts). Waiting requests' paths count towards the next step's
    demand. With a trace and ``pin_fraction``, LSM-GNN's hybrid: that share of the slots holds
    the trace's most chosen experts for good (static), the rest follows the predictions."""

    name = "expertflow"
    needs = "predictor"
    observes = True

    def __init__(self, depth: int = 2, decay: float = 0.5, trust: float = 0.75,
                 threshold: float = 0.3, traces: Sequence[RequestTrace] | None = None,
                 pin_fraction: float = 0.0) -> None:
        super().__init__(depth, threshold)
        self.frequencies = expert_frequencies(traces) if traces else None
        self.pin_fraction = pin_fraction
        self.decay = decay  # weight of the older tokens in the observed shares
        self.trust = trust  # weight of the observed shares against the prompt's prediction
        self.predicted: dict[str, np.ndarray] = {}  # request -> (layers, experts) shares
        self.observed: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # shares, layers seen

    def pinned(self) -> list[ExpertKey]:
        if not self.frequencies or self.pin_fraction <= 0:
            return []
        room = min(int(self.num_slots * self.pin_fraction), self.num_slots - 2 * self.num_experts)
        return [key for key, _ in self.frequencies.most_common(max(0, room))]

    def annotate(self, request_id: str, route) -> None:
        if isinstance(route, PredictedRoute):
            zeros = [0.0] * self.num_experts
            self.predicted[request_id] = np.array(
                [route.shares.get(layer, zeros) for layer in self.moe_layers])

    def forget(self, request_id: str) -> None:
        self.predicted.pop(request_id, None)
        self.observed.pop(request_id, None)

    def observe(self, request_id: str, layer: int, choices: list[list[int]]) -> None:
        if request_id not in self.observed:
            self.observed[request_id] = (np.zeros((len(self.moe_layers), self.num_experts)),
                                         np.zeros(len(self.moe_layers), dtype=bool))
        shares, seen = self.observed[request_id]
        row = self._position[layer]
        for choice in choices:
            token = np.zeros(self.num_experts)
            token[choice] = 1.0 / len(choice)
            shares[row] = self.decay * shares[row] + (1.0 - self.decay) * token if seen[row] \
                else token
            seen[row] = True

    def shares_of(self, request_id: str) -> np.ndarray | None:
        """(layers, experts): what the request's tokens are expected to choose."""
        guess = self.predicted.get(request_id)
        if request_id not in self.observed:
            return guess
        shares, seen = self.observed[request_id]
        if guess is None:
            return shares
        mixed = self.trust * shares + (1.0 - self.trust) * guess
        return np.where(seen[:, None], mixed, guess)

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        shares = self.shares_of(request_id)
        if shares is None:
            return None
        hot = shares >= 1.0 / self.num_experts
        return tuple(frozenset(np.flatnonzero(row).tolist()) for row in hot)

    def demand(self, chunks, waiting):
        now = self._usage([(c.request_id, c.num_tokens) for c in chunks])
        later = self._usage([(c.request_id, 1) for c in chunks] + [(r, 1) for r in waiting])
        return now, later

    def _usage(self, requests) -> np.ndarray:
        """P(expert chosen by at least one of the tokens) if each token picks expert ``e`` with
        probability ``top_k * share``, independently."""
        unused = np.ones((len(self.moe_layers), self.num_experts))
        for request_id, tokens in requests:
            shares = self.shares_of(request_id)
            if shares is not None:
                unused *= (1.0 - np.clip(self.top_k * shares, 0.0, 1.0)) ** tokens
        return 1.0 - unused


class OraclePolicy(_PredictiveBase):
    """The upper bound: every request's true routes, replayed from a recorded trace of the same
    prompts (greedy decoding makes them repeat exactly)."""

    name = "oracle"
    needs = "trace"

    def __init__(self, traces: Sequence[RequestTrace], depth: int = 2) -> None:
        super().__init__(depth)
        self.by_prompt = {prompt_key(t.prompt): t for t in traces}
        self.routes: dict[str, RequestTrace] = {}

    def annotate(self, request_id: str, route) -> None:
        if isinstance(route, RequestTrace):
            self.routes[request_id] = route

    def forget(self, request_id: str) -> None:
        self.routes.pop(request_id, None)

    def demand(self, chunks, waiting):
        shape = (len(self.moe_layers), self.num_experts)
        now, later = np.zeros(shape), np.zeros(shape)
        for chunk in chunks:
            trace = self.routes.get(chunk.request_id)
            if trace is None:
                continue
            stop = chunk.start_pos + chunk.num_tokens
            for position, layer in enumerate(self.moe_layers):
                now[position, list(trace.experts_at(layer, chunk.start_pos, stop))] = 1.0
                later[position, list(trace.experts_at(layer, stop, stop + 1))] = 1.0
        return now, later


POLICIES = {cls.name: cls for cls in (ExpertPolicy, LookaheadPolicy, StaticPolicy,
                                       ExpertFlowPolicy, OraclePolicy)}


def make_expert_policy(name: str, traces: Sequence[RequestTrace] | None = None,
                       depth: int = 2, pin_fraction: float = 0.0) -> ExpertPolicy:
    """A registered policy by name; static and oracle need a trace (``--expert-trace``);
    expertflow pins ``pin_fraction`` of the slots from one when given."""
    if name not in POLICIES:
        raise ValueError(f"unknown expert policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if cls.needs == "trace":
        if not traces:
            raise ValueError(f"--expert-policy {name} needs a router trace (--expert-trace "
                             "FILE.jsonl, recorded with `tierserve moe trace`)")
        return cls(traces) if cls is StaticPolicy else cls(traces, depth)
    if cls is ExpertFlowPolicy:
        if pin_fraction and not traces:
            raise ValueError("--expert-pin-fraction pins a trace's most chosen experts; give "
                             "--expert-trace FILE.jsonl too")
        return cls(depth, traces=traces, pin_fraction=pin_fraction)
    return cls()
