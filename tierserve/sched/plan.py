"""The step contract: StepPlan (scheduler -> executor), StepResult (executor -> scheduler), RequestUpdate.

Plain dataclasses, no tensors: the same plan drives the real model runner, a fake executor in
tests, and a cost model in the simulator.

Failures are part of the contract. An executor reports a request it could not serve in
``StepResult.failed`` (its other requests' results stand), or raises ``RequestError`` naming
the requests at fault before it has results for any (the engine then runs the step again
without them), or ``CopyError`` naming the KV copies of the plan that failed (the engine fails
whoever holds what they wrote, then runs the rest). Any other exception fails the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.kv.tiers import SwapOrder
from tierserve.request import SamplingParams


@dataclass(slots=True)
class ScheduledChunk:
    """``len(token_ids)`` tokens of one request to run this step, at positions from ``start_pos``."""

    request_id: str
    token_ids: list[int]
    start_pos: int  # == the request's num_computed_tokens when scheduled
    block_table: list[int]  # block ids covering positions [0, start_pos + len(token_ids))
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    sampling_params: SamplingParams
    # Read-only views for penalties and min_tokens; the runner must not mutate them.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()
    # Static KV eviction: positions before this chunk that hold no cache slot (token p's K/V
    # is at slot p - kv_offset), and while the request has not evicted yet, the position where
    # its prefill ends (the chunk ending there evicts; chunks reaching into the window observe).
    kv_offset: int = 0
    evict_at: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def evicts(self) -> bool:
        """This chunk ends the prefill of a request that evicts after it."""
        return self.evict_at is not None and self.start_pos + len(self.token_ids) == self.evict_at

    @property
    def num_prompt_tokens(self) -> int:
        """How many of this chunk's tokens are prompt (prefill) tokens."""
        end = min(self.start_pos + len(self.token_ids), len(self.prompt_token_ids))
        return max(0, end - self.start_pos)


@dataclass(slots=True)
class StepPlan:
    """What one engine step runs."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests that ended since the last plan: the executor may drop their per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Copies between KV tiers, in order. The executor starts them all; the forward waits only
    # for the orders marked ``wait`` (swap-ins, victim saves); swap-outs overlap the step.
    swap_orders: list[SwapOrder] = field(default_factory=list)
    # Keys of copies submitted in earlier steps that this step's forward needs (prefetches).
    wait_keys: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.swap_orders


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of a sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass(slots=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens ``first_position, first_position + 1, ...`` (each
    scored by the logits of the position before it), from one chunk."""

    first_position: int
    entries: list[TokenLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    """What the executor produced: one sampled token per chunk that asked for one."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    swaps_done: list[SwapDone] = field(default_factory=list)
    # Requests this step could not serve (their sampling, logits processing, a non-finite
    # logits row, ...): request id -> what went wrong. They get no token; the others do.
    failed: dict[str, str] = field(default_factory=dict)
    # Static KV eviction ran after these requests' prefill: request id -> tokens evicted (their
    # blocks past the kept tokens may be freed).
    evicted: dict[str, int] = field(default_factory=dict)


class CopyError(Exception):
    """Raised by an executor whose step cannot run as planned because KV copies it had to wait
    for failed: ``failures`` maps each copy key to what went wrong. Every copy of the plan has
    finished (done or failed) when it is raised."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__("; ".join(f"copy {key}: {msg}" for key, msg in failures.items()))
        self.failures = failures


class RequestError(Exception):
    """Raised by an executor that knows which requests made its step fail, before it has any
    result: ``failures`` maps each to a message. The engine fails them and runs the rest."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__("; ".join(f"{rid}: {msg}" for rid, msg in failures.items()))
        self.failures = failures


@dataclass(slots=True)
class SwapDone:
    """A finished copy order: its device blocks may now be reused."""

    key: str
    num_blocks: int = 0
    num_copies: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None  # the copy failed: its blocks are released, its request failed


@dataclass(slots=True)
class RequestUpdate:
    """What a step changed for one request, for the output processor."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # in prompt order
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    error: str | None = None  # with finish_reason "error": what failed, for the client
