"""Request, RequestStatus and SamplingParams: what a request asks for and how far it has got."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from tierserve.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; the fields and defaults follow vLLM's.

    ``max_tokens=None`` lets the request run to the end of the model's context.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(self.n >= 1, "n", self.n, "must be at least 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 or -1 disables it)")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               self.frequency_penalty, "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "must be > 0")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be at least 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", self.logprobs,
               "must be between 0 and 20")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def _check(ok: bool, param: str, value: object, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param} {rule}, got {value!r}", param=param)


class RequestStatus(Enum):
    """Where a request is in its life; the FINISHED_* states are terminal."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # KV dropped: recomputed when it runs again
    SWAPPED = "swapped"  # KV in the host or disk tier: copied back when it runs again
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status, else None."""
        return self.value if self.finished else None


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated. The scheduler sees counters, never tensors.

    Invariant: ``num_computed_tokens <= num_tokens``; tokens in ``[num_computed_tokens,
    num_tokens)`` still need a forward pass (the prompt's unprocessed part, or the last sampled
    token). A request that needs exactly one more token computed is "decoding".
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: sampling_params.max_tokens or what the context leaves
    arrival_time: float = field(default_factory=time.monotonic)
    client_id: str | None = None  # fairness key (OpenAI `user`)
    priority: int = 0
    # The request that computes a prefix shared with this one (an n > 1 sibling, or a batch
    # group's first member); this one is not admitted until the leader has computed
    # ``shared_prefix_len`` tokens (None: the leader's whole prompt), then hits them in the cache.
    prefill_leader: str | None = None
    shared_prefix_len: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids in positions [start, end) of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def finished(self) -> bool:
        return self.status.finished
