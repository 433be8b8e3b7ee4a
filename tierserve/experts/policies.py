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

from tierserve.experts.cache import ExpertKey
from tierserve.experts.routes import (
    PredictedRoute,
    RequestTrace,
    StepRequest,
    expert_frequencies,
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
    predicted next use (LSM-GNN's look-ahead: the expert needed furthest away goes first)."""

    scores = True

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._demand: dict[int, dict[int, float]] = {}  # layer -> expert -> P(used this step)
        self._next_demand: dict[int, dict[int, float]] = {}  # ... by the step after
        self._layer = -1  # the MoE layer the forward has routed last; -1 before the first
        self._scores: dict[ExpertKey, float] = {}  # valid until the layer or the demand moves

    def demand(self, chunks: Sequence[StepRequest], waiting: Sequence[str]
               ) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
        raise NotImplementedError

    def begin_step(self, chunks: Sequence[StepRequest], waiting: Sequence[str] = ()
                   ) -> list[ExpertKey]:
        self._demand, self._next_demand = self.demand(chunks, waiting)
        self._layer = -1
        self._scores = {}
        return self._ahead(self.moe_layers[:self.depth])

    def after_route(self, layer: int) -> list[ExpertKey]:
        self._layer = layer
        self._scores = {}
        index = self._position[layer]
        return self._ahead(self.moe_layers[index + 1:index + 1 + self.depth])

    def _ahead(self, layers: Sequence[int]) -> list[ExpertKey]:
        keys = []
        for layer in layers:
            wanted = self._demand.get(layer, {})
            keys += [(layer, e) for e, p in sorted(wanted.items(), key=lambda kv: -kv[1])
                     if p >= 0.5]
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
        if position is None:
            return 0.0
        current = self._position.get(self._layer, -1)
        soon = self._demand.get(layer, {}).get(expert, 0.0) if position > current else 0.0
        later = self._next_demand.get(layer, {}).get(expert, 0.0)
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
    demand."""

    name = "expertflow"
    needs = "predictor"
    observes = True

    def __init__(self, depth: int = 2, decay: float = 0.5, trust: float = 0.75) -> None:
        super().__init__(depth)
        self.decay = decay  # weight of the older tokens in the observed shares
        self.trust = trust  # weight of the observed shares against the prompt's prediction
        self.routes: dict[str, PredictedRoute] = {}
        self.observed: dict[str, dict[int, list[float]]] = {}

    def annotate(self, request_id: str, route) -> None:
        if isinstance(route, PredictedRoute):
            self.routes[request_id] = route

    def forget(self, request_id: str) -> None:
        self.routes.pop(request_id, None)
        self.observed.pop(request_id, None)

    def observe(self, request_id: str, layer: int, choices: list[list[int]]) -> None:
        shares = self.observed.setdefault(request_id, {}).get(layer)
        for choice in choices:
            if shares is None:
                shares = [0.0] * self.num_experts
                weight = 1.0
            else:
                shares = [s * self.decay for s in shares]
                weight = 1.0 - self.decay
            for e in choice:
                shares[e] += weight / len(choice)
        if shares is not None:
            self.observed[request_id][layer] = shares

    def shares(self, request_id: str, layer: int) -> list[float] | None:
        predicted = self.routes.get(request_id)
        guess = predicted.shares.get(layer) if predicted is not None else None
        seen = self.observed.get(request_id, {}).get(layer)
        if seen is None or guess is None:
            return seen or guess
        return [self.trust * s + (1.0 - self.trust) * g for s, g in zip(seen, guess)]

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        if request_id not in self.routes and request_id not in self.observed:
            return None
        threshold = 1.0 / self.num_experts
        return tuple(frozenset(e for e, s in enumerate(self.shares(request_id, layer) or ())
                               if s >= threshold) for layer in self.moe_layers)

    def demand(self, chunks, waiting):
        now = self._usage([(c.request_id, c.num_tokens) for c in chunks])
        later = self._usage([(c.request_id, 1) for c in chunks] + [(r, 1) for r in waiting])
        return now, later

    def _usage(self, requests) -> dict[int, dict[int, float]]:
        """P(expert chosen by at least one of the tokens) if each token picks expert ``e`` with
        probability ``top_k * share``, independently."""
        usage: dict[int, dict[int, float]] = {}
        for layer in self.moe_layers:
            unused = [1.0] * self.num_experts
            for request_id, tokens in requests:
                for e, share in enumerate(self.shares(request_id, layer) or ()):
                    unused[e] *= max(0.0, 1.0 - min(1.0, self.top_k * share)) ** tokens
            usage[layer] = {e: 1.0 - u for e, u in enumerate(unused) if u < 1.0}
        return usage


class OraclePolicy(_PredictiveBase):
    """The upper bound: every request's true routes, replayed from a recorded trace of the same
    prompts (greedy decoding makes them repeat exactly)."""

    name = "oracle"
    needs = "trace"

    def __init__(self, traces: Sequence[RequestTrace], depth: int = 2) -> None:
        super().__init__(depth)
        from tierserve.experts.routes import prompt_key

        self.by_prompt = {prompt_key(t.prompt): t for t in traces}
        self.routes: dict[str, RequestTrace] = {}

    def annotate(self, request_id: str, route) -> None:
        if isinstance(route, RequestTrace):
            self.routes[request_id] = route

    def forget(self, request_id: str) -> None:
        self.routes.pop(request_id, None)

    def demand(self, chunks, waiting):
        now: dict[int, dict[int, float]] = {}
        later: dict[int, dict[int, float]] = {}
        for chunk in chunks:
            trace = self.routes.get(chunk.request_id)
            if trace is None:
                continue
            stop = chunk.start_pos + chunk.num_tokens
            for layer in self.moe_layers:
                for e in trace.experts_at(layer, chunk.start_pos, stop):
                    now.setdefault(layer, {})[e] = 1.0
                for e in trace.experts_at(layer, stop, stop + 1):
                    later.setdefault(layer, {})[e] = 1.0
        return now, later


POLICIES = {cls.name: cls for cls in (ExpertPolicy, LookaheadPolicy, StaticPolicy,
                                       ExpertFlowPolicy, OraclePolicy)}


def make_expert_policy(name: str, traces: Sequence[RequestTrace] | None = None,
                       depth: int = 2) -> ExpertPolicy:
    """A registered policy by name; static and oracle need a trace (``--expert-trace``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown expert policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if cls.needs == "trace":
        if not traces:
            raise ValueError(f"--expert-policy {name} needs a router trace (--expert-trace "
                             "FILE.jsonl, recorded with `tierserve moe trace`)")
        return cls(traces) if cls is StaticPolicy else cls(traces, depth)
    if cls is ExpertFlowPolicy:
        return cls(depth)
    return cls()
