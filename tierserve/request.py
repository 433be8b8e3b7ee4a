"""Request, RequestStatus and SamplingParams: what a request asks for and how far it has got."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

from tierserve.errors import InvalidRequestError

# Seeds outside the signed 64-bit range are refused (as vLLM's API does), not reduced into it,
# so two different seeds never silently give the same stream.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per position, as vLLM's default max_logprobs
GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy

# vLLM's per-request logits processors: fn(output_ids, logits) or fn(prompt_ids, output_ids,
# logits) -> logits, on one (vocab,) float32 row; it may edit the row in place.
LogitsProcessor = Callable[..., object]


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; the fields and defaults follow vLLM's.

    ``max_tokens=None`` lets the request run to the end of the model's context; ``0`` only
    scores the prompt (with ``prompt_logprobs``) and generates nothing. ``prompt_logprobs=k``
    returns each prompt token's log-probability and the top ``k`` at its position (the first
    token has none); such a request computes its whole prompt (no prefix-cache hit), as vLLM's.
    ``logits_processors`` run on the request's own logits row before sampling; one that raises
    fails that request alone.
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
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # tierserve.structured.StructuredOutputs: the output follows a JSON schema, a regex, a
    # choice list or a grammar (vLLM's structured_outputs / guided decoding).
    structured_outputs: object | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])
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
        _check(self.max_tokens is None or self.max_tokens >= 0, "max_tokens", self.max_tokens,
               "must be >= 0 (0: score the prompt only)")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               self.logprobs, f"must be between 0 and {MAX_LOGPROBS}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
               "prompt_logprobs", self.prompt_logprobs, f"must be between 0 and {MAX_LOGPROBS}")
        _check(self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed", self.seed,
               f"must be a signed 64-bit integer ({SEED_MIN} to {SEED_MAX})")
        _check(all(0 <= t < 2**63 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be token ids (>= 0)")
        _check(all(callable(fn) for fn in self.logits_processors), "logits_processors",
               self.logits_processors, "must be callables")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")
        _check(self.structured_outputs is None or hasattr(self.structured_outputs, "key"),
               "structured_outputs",
               self.structured_outputs, "must be a tierserve.structured.StructuredOutputs")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (a temperature this close to 0 is greedy, as
        vLLM's: dividing logits by it would overflow)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def for_completion(self, index: int) -> SamplingParams:
        """The parameters of completion ``index`` of ``n``: a seed moves on by the index (so
        the completions differ), and only completion 0 scores the prompt (they share it)."""
        if index == 0 or (self.seed is None and self.prompt_logprobs is None):
            return self
        # Completion i samples with seed + i, wrapped within the signed 64-bit range.
        seed = None if self.seed is None else (self.seed + index - SEED_MIN) % 2**64 + SEED_MIN
        return replace(self, seed=seed, prompt_logprobs=None)


def call_logits_processor(fn: LogitsProcessor, prompt_ids: list[int], output_ids: list[int],
                          row):
    """vLLM's two signatures: (output_ids, logits) and (prompt_ids, output_ids, logits)."""
    if len(inspect.signature(fn).parameters) == 3:
        return fn(prompt_ids, output_ids, row)
    return fn(output_ids, row)


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


# Requests at or above this ``priority`` are background work (the HTTP Batch API): they run
# after every online request, are preempted for one (every policy), and do not count toward
# the server's --max-waiting-requests.
BACKGROUND_PRIORITY = 1 << 31


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
    prompt_logprobs_next: int = 1  # prompt position whose logprob is sent next (0 has none)
    # MoE with a routing-path predictor: the experts predicted hot per MoE layer (regrouping)
    expert_route: tuple[frozenset[int], ...] | None = None
    # Static KV eviction (--kv-eviction): the request evicts prompt tokens once its prefill
    # has run (``kv_evicted`` then); the first ``num_evicted_tokens`` positions hold no slot,
    # so token ``p``'s K/V lives at slot ``p - num_evicted_tokens`` (for p after the prompt).
    evicts_kv: bool = False
    kv_evicted: bool = False
    num_evicted_tokens: int = 0

    @property
    def num_kv_tokens(self) -> int:
        """Cached tokens the KV blocks hold: computed ones less the evicted."""
        return self.num_computed_tokens - self.num_evicted_tokens

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
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still to be computed."""
        return (self.sampling_params.prompt_logprobs is not None
                and self.prompt_logprobs_next < len(self.prompt_token_ids))

    @property
    def finished(self) -> bool:
        return self.status.finished
