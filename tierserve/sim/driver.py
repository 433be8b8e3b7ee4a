"""One arrival loop for the real engine and the simulated one: release each trace request when
the clock reaches its arrival, step the engine, send a conversation's next turn a think time
after its previous turn finished.

Under the simulator the clock is virtual and idle time is skipped; under the real engine it is
the wall clock and idle time is slept. Everything else (EngineCore, Scheduler, KV manager,
policies) is the same code, which is what lets the simulator's numbers be checked against the
engine's.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tierserve.engine.core import EngineCore
from tierserve.request import Request, SamplingParams
from tierserve.sim.traces import TraceRequest

# Prompt ids are drawn from [FIRST_ID, vocab): low ids are special tokens in most vocabularies.
FIRST_ID = 16


@dataclass(slots=True)
class DriveResult:
    """What a replay produced: the engine's metrics summary and counts."""

    summary: dict
    num_steps: int
    num_requests: int
    clock_s: float  # the clock when the last request finished (from the start)
    requests: dict[str, Request] = field(default_factory=dict)


class PromptMaker:
    """Seeded prompt token ids for trace requests without explicit ones."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        if vocab_size <= FIRST_ID:
            raise ValueError(f"a vocabulary of {vocab_size} ids leaves none for prompts")
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> list[int]:
        return self.rng.integers(FIRST_ID, self.vocab_size, size=count).tolist()


def drive(core: EngineCore, trace: list[TraceRequest], clock: Callable[[], float],
          wait: Callable[[float], None], prompts: PromptMaker,
          progress: Callable[[int], None] | None = None, max_steps: int = 10_000_000,
          step: Callable[[], list] | None = None,
          before_step: Callable[[int, EngineCore], None] | None = None) -> DriveResult:
    """Replay ``trace`` on ``core`` until every request (and follow-up turn) has finished.

    ``wait(seconds)`` is called when the engine is idle before the next arrival (the simulator
    advances its clock, the real run sleeps). ``progress(n)`` is told of each finished request.
    ``step`` replaces ``core.step`` (a timing wrapper); ``before_step(n, core)`` runs before
    step n (a workload that changes priorities as it goes).
    """
    step = step or core.step
    start = clock()
    pending: list[tuple[float, int, TraceRequest]] = []
    followers: dict[str, TraceRequest] = {}
    for index, item in enumerate(trace):
        if item.follows is not None:
            followers[item.follows] = item
        elif item.arrival_s is None:
            raise ValueError(f"trace request {index} has no arrival; assign arrivals first "
                             "(poisson_arrivals)")
        else:
            pending.append((start + item.arrival_s, index, item))
    heapq.heapify(pending)
    live: dict[str, Request] = {}
    sent: dict[str, Request] = {}
    counter = len(trace)
    steps = 0
    while pending or core.has_unfinished():
        now = clock()
        while pending and pending[0][0] <= now:
            arrival, index, item = heapq.heappop(pending)
            request = _submit(core, item, index, arrival, prompts, sent)
            live[request.request_id] = sent[request.request_id] = request
        if not core.has_unfinished():
            wait(pending[0][0] - now)
            continue
        if before_step is not None:
            before_step(steps, core)
        updates = step()
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"the replay did not finish in {max_steps:,} steps")
        for update in updates:
            if not update.finished:
                continue
            finished = live.pop(update.request_id, None)
            if progress is not None:
                progress(1)
            follower = followers.pop(update.request_id, None)
            if follower is not None and finished is not None:
                counter += 1
                follower.prompt_token_ids = (finished.prompt_token_ids
                                             + finished.output_token_ids
                                             + prompts.draw(follower.prompt_len))
                heapq.heappush(pending, (clock() + follower.think_s, counter, follower))
    return DriveResult(core.metrics.summary(), steps, len(sent), clock() - start, sent)


def _submit(core: EngineCore, item: TraceRequest, index: int, arrival: float,
            prompts: PromptMaker, sent: dict[str, Request]) -> Request:
    prompt_ids = item.prompt_token_ids or prompts.draw(item.prompt_len)
    params = SamplingParams(max_tokens=item.output_len, ignore_eos=True, temperature=0.0)
    request_id = item.request_id or f"req{index}"
    if request_id in sent:
        raise ValueError(f"trace request id {request_id!r} appears twice")
    request = core.make_request(request_id, prompt_ids, params, client_id=item.client_id,
                                arrival_time=arrival)
    core.add_request(request)
    return request
