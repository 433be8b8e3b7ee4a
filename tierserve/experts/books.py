"""ExpertBooks: the mechanism of expert offloading without the weights: which expert sits in
which fast slot, which loads are in flight, what the policy asks to load ahead. No torch.

Two users drive the same books: ``ExpertOffload`` (the engine: slots are weight tensors, loads
run on the KV tiers' ``SwapWorker``) and the simulator's ``SimExperts`` (loads timed on a
simulated host link). A load queue is anything with the SwapWorker's three calls:

    submit(key, [ExpertLoad])    start a load
    poll() -> [done]             loads finished since the last poll (``.key``, ``.error``)
    wait([key])                  block until those are done (raises ``CopyError`` on failure)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tierserve.experts.cache import ExpertCache, ExpertKey
from tierserve.experts.policies import ExpertPolicy
from tierserve.experts.routes import StepRequest
from tierserve.sched.plan import CopyError

log = logging.getLogger(__name__)
OBSERVED_ROWS = 8  # a chunk's last rows that correct its request's predicted route
PREFETCH_WINDOW = 2  # loads in flight beyond which no prefetch starts (see ExpertBooks)
# ``hold``'s slot for an expert the forward computes where its weights live (the host), not in
# a fast slot: a miss chosen by at most ``host_rows`` rows (Fiddler's rule).
ON_HOST = -1


class ExpertTierError(RuntimeError):
    """An expert could not be read from its tier; the message names the file and the fix."""


@dataclass(slots=True, frozen=True)
class ExpertLoad:
    """Copy expert ``key`` from the source tier into fast slot ``slot`` (one load-queue op);
    ``evicted``: the expert the slot held until now (a victim buffer saves it first)."""

    key: ExpertKey
    slot: int
    evicted: ExpertKey | None = None

    @property
    def num_blocks(self) -> int:
        return 1

    @property
    def runs(self) -> tuple[ExpertLoad, ...]:
        return (self,)


@dataclass(slots=True)
class OffloadStats:
    steps: int = 0
    stall_seconds: float = 0.0  # forwards waiting for expert loads
    bytes_loaded: dict[str, int] = field(default_factory=dict)  # source tier -> bytes
    distinct_per_step: list[int] = field(default_factory=list)  # experts run, all layers
    experts_this_step: int = 0
    host_runs: int = 0  # missed experts computed on the host instead of loaded (Fiddler)
    host_rows: int = 0  # rows those host runs computed


class LoadQueue(Protocol):
    def submit(self, key: str, ops: list[ExpertLoad]) -> None: ...

    def poll(self) -> list: ...

    def wait(self, keys: list[str]) -> None: ...


class ExpertBooks:
    """``num_slots`` fast slots over ``policy``; loads go to ``loads``; ``clock`` times stalls.

    ``prefetch_window`` (None or 0: no limit): with ``n`` loads in flight, a prefetch looks at
    only the first ``window - n`` experts the policy asks for (most urgent first); those already
    in a slot take their turn too. The load queue is first in, first out, so each speculative
    load queued ahead of a forward's miss delays it; the rest of the list is asked again at the
    next layer, when the routes are better known. In the simulator (Mixtral-sized experts over
    PCIe 4.0, 16-32 concurrent) the window of 2 makes expertflow 1.41-2.52x LRU's tok/s against
    1.07-1.86x without one; windows of 1 and 2 tie, 4 and 16 lose part of it, and starting up to
    ``window`` loads from anywhere down the list loses at batch 1 (docs/paper-results.md).

    ``host_rows`` (0: off): a missed expert that at most this many of a forward's rows chose is
    not loaded; the forward computes it where the lower tier keeps it (``ON_HOST``), as Fiddler
    computes cold experts on the CPU: a few rows there cost less than moving the weights."""

    def __init__(self, num_slots: int, policy: ExpertPolicy, moe_layers: Sequence[int],
                 num_experts: int, top_k: int, loads: LoadQueue,
                 clock: Callable[[], float],
                 prefetch_window: int | None = PREFETCH_WINDOW, host_rows: int = 0) -> None:
        if num_slots < num_experts:
            raise ValueError(f"--expert-cache {num_slots} holds fewer experts than one layer has "
                             f"({num_experts}); a layer may need all of them at once")
        self.policy = policy
        self.loads = loads
        self.clock = clock
        self.cache = ExpertCache(num_slots, policy.score if policy.scores else None)
        policy.bind(sorted(moe_layers), num_experts, top_k, num_slots)
        self.stats = OffloadStats()
        self.reserve = num_experts  # slots prefetches leave free: one layer's misses must fit
        self.prefetch_window = prefetch_window or None
        self.host_rows = host_rows
        self.pinned = 0
        self._known: dict[str, None] = {}  # live request ids, arrival order
        self._load_key: dict[int, str] = {}  # slot -> load-queue key of its load in flight
        self._serial = itertools.count()
        self.chunks: list[StepRequest] = []  # this step's, in row order

    # -- requests and steps --------------------------------------------------------------------
    def annotate(self, request_id: str, route) -> None:
        """A request arrived with what is known of its path (a prediction, a trace, None)."""
        self._known[request_id] = None
        if route is not None:
            self.policy.annotate(request_id, route)

    def forget(self, finished: Iterable[str]) -> None:
        """These requests ended (twice is harmless)."""
        for request_id in finished:
            self._known.pop(request_id, None)
            self.policy.forget(request_id)

    def begin_step(self, chunks: list[StepRequest], finished: Iterable[str]) -> None:
        """A step is about to run ``chunks``: forget ended requests, prefetch what it needs."""
        self.chunks = chunks
        self.forget(finished)
        self.reap()
        if self.stats.steps:
            self.stats.distinct_per_step.append(self.stats.experts_this_step)
        self.stats.steps += 1
        self.stats.experts_this_step = 0
        running = {c.request_id for c in chunks}
        waiting = [r for r in self._known if r not in running]
        self.prefetch(self.policy.begin_step(chunks, waiting))

    def observe(self, layer: int, rows: list[list[int]]) -> None:
        """Tell the policy each request's last ``OBSERVED_ROWS`` true choices (``rows``: this
        step's top-k choices at ``layer``, chunk after chunk)."""
        row = 0
        for chunk in self.chunks:
            end = row + chunk.num_tokens
            self.policy.observe(chunk.request_id, layer, rows[max(row, end - OBSERVED_ROWS):end])
            row = end

    def hold(self, layer: int, experts: Sequence[int],
             rows: Sequence[int] | None = None) -> dict[int, int]:
        """Hold ``experts`` of ``layer`` for one forward (loading the misses), then prefetch
        what the policy asks for after this layer's routing; expert -> slot, or ``ON_HOST`` for
        a miss the forward computes on the host (``rows[i]``: how many rows chose
        ``experts[i]``, at most ``host_rows``). Release with ``release``; wait for a slot's
        load with ``ready``."""
        self.reap()
        counters = self.cache.counters.layer(layer)
        held: dict[int, int] = {}
        try:
            for i, expert in enumerate(experts):
                slot = self.cache.acquire((layer, expert), counters)
                if slot is None and rows is not None and rows[i] <= self.host_rows:
                    held[expert] = ON_HOST
                    self.stats.host_runs += 1
                    self.stats.host_rows += rows[i]
                    continue
                if slot is None:
                    slot = self.load((layer, expert), prefetch=False)
                    self.cache.hold(slot)
                held[expert] = slot
            self.stats.experts_this_step += len(held)
            self.prefetch(self.policy.after_route(layer))
        except BaseException:
            self.release(held)
            raise
        return held

    def release(self, held: dict[int, int]) -> None:
        self.cache.release([slot for slot in held.values() if slot != ON_HOST])

    def ready(self, slot: int) -> None:
        """Wait for ``slot``'s load, if one is in flight (the time counts as stall)."""
        key = self._load_key.get(slot)
        if key is None:
            return
        started = self.clock()
        try:
            self.loads.wait([key])
        except CopyError as exc:
            self.reap()
            raise ExpertTierError(f"loading expert {self.cache.key_of(slot) or ''} failed: "
                                  f"{next(iter(exc.failures.values()), exc)}") from exc
        finally:
            self.stats.stall_seconds += self.clock() - started
        self.reap()

    def hot_sets(self, request_id: str) -> tuple[frozenset[int], ...] | None:
        return self.policy.hot_sets(request_id)

    # -- mechanics ------------------------------------------------------------------------------
    def load(self, key: ExpertKey, prefetch: bool) -> int:
        slot = self.cache.reserve(key, prefetch)
        if slot is None and not prefetch and self._load_key:
            started = self.clock()  # loads in flight hold slots until they are reaped: the
            self.settle()  # forward waits for them, a stall like waiting for its own load
            self.stats.stall_seconds += self.clock() - started
            slot = self.cache.reserve(key, prefetch)
        if slot is None:
            raise ExpertTierError(f"no free expert slot for {key}: all {self.cache.num_slots} are "
                                  "held; raise --expert-cache")
        load_key = f"expert:{key[0]}:{key[1]}:{next(self._serial)}"
        self._load_key[slot] = load_key
        self.loads.submit(load_key, [ExpertLoad(key, slot, self.cache.evicted)])
        return slot

    def prefetch(self, keys: list[ExpertKey]) -> None:
        if self.prefetch_window is not None:
            keys = keys[:max(0, self.prefetch_window - len(self._load_key))]
        for key in keys:
            if self.cache.slot_of(key) is not None:
                continue
            # Prefetches leave one layer's worth of slots free: a forward's misses must fit.
            if self.cache.num_free <= self.reserve:
                return
            if self.policy.scores:
                victim = self.cache.pool.peek_victim()
                old = self.cache.key_of(victim)
                if old is not None and self.policy.score(old) >= self.policy.score(key):
                    return  # everything evictable is worth more than what is asked for
            self.load(key, prefetch=True)

    def reap(self) -> None:
        """Mark finished loads ready (or their slots empty, when they failed)."""
        for done in self.loads.poll():
            slot = next((s for s, k in self._load_key.items() if k == done.key), None)
            if slot is None:
                continue
            del self._load_key[slot]
            if done.error is not None:
                log.warning("expert load %s failed: %s", done.key, done.error)
            self.cache.loaded(slot, ok=done.error is None)

    def pin(self, keys: list[ExpertKey]) -> None:
        """Load ``keys`` and hold them for good (a static hot set)."""
        for key in keys:
            self.load(key, prefetch=False)
            self.cache.hold(self.cache.slot_of(key))
        self.settle()
        self.pinned = len(keys)

    def settle(self) -> None:
        """Wait for every load in flight (tests, and before measuring)."""
        with contextlib.suppress(CopyError):
            self.loads.wait(list(self._load_key.values()))
        self.reap()

    def check_invariants(self) -> None:
        self.settle()
        self.cache.check_invariants(held=self.pinned)
