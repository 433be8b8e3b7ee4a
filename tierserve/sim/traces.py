"""Request traces for the simulator: lengths, arrivals, conversations. Pure Python + numpy.

    sharegpt4     Sarathi-Serve's openchat_sharegpt4: prompt median 1730 / P90 5696, output
                  415 / 834, prompt + output <= 8192 (Agrawal et al., OSDI'24, Table 2)
    arxiv         Sarathi-Serve's arxiv_summarization: prompt 7059 / 12985, output 208 / 371,
                  <= 16384 (same table)
    conversations multi-round ShareGPT-like chats: turns ~ 1 + Poisson(4.5) (mean 5.5), each
                  turn's prompt the whole conversation so far plus a new user message (user
                  and answer lengths of ShareGPT: means 161 and 338 tokens), the next turn sent
                  a think time after the previous answer ends
    FILE.csv      Vidur's processed traces (arrived_at, num_prefill_tokens, num_decode_tokens)
                  or Azure's LLM inference traces as Splitwise uses them (TIMESTAMP,
                  ContextTokens, GeneratedTokens)
    FILE.jsonl    a `tierserve bench --dataset` file with token ids: {"prompt_token_ids": [...],
                  "max_tokens": n, "client_id": ...} per line (shared prefixes stay shared)

The length-statistic traces draw each length from a lognormal fitted to the median and P90 and
truncated at the total bound (the paper's filter), so the drawn median and P90 match the table
(tested); the papers used the real datasets, whose shape beyond those two points we do not have.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


@dataclass(slots=True)
class TraceRequest:
    """One request to replay. ``arrival_s`` None: assigned by the arrival process. A request
    with ``follows`` is the next turn of that request's conversation: it is sent ``think_s``
    after it finishes, its prompt being that request's prompt and output then ``prompt_len``
    new tokens."""

    prompt_len: int
    output_len: int
    arrival_s: float | None = None
    client_id: str | None = None
    request_id: str | None = None
    follows: str | None = None
    think_s: float = 0.0
    prompt_token_ids: list[int] | None = None  # explicit tokens (shared prefixes); else drawn

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"a trace request needs prompt and output lengths >= 1, got "
                             f"{self.prompt_len} and {self.output_len}")


@dataclass(slots=True, frozen=True)
class LengthStats:
    """A length distribution given by its median and P90 (tokens)."""

    median: float
    p90: float

    def __post_init__(self) -> None:
        if not 0 < self.median < self.p90:
            raise ValueError(f"need 0 < median < p90, got {self.median} and {self.p90}")


@dataclass(slots=True, frozen=True)
class LengthTrace:
    """Prompt and output length statistics with the bound on their sum."""

    prompt: LengthStats
    output: LengthStats
    max_total: int
    source: str


LENGTH_TRACES: dict[str, LengthTrace] = {
    "sharegpt4": LengthTrace(LengthStats(1730, 5696), LengthStats(415, 834), 8192,
                             "Sarathi-Serve (OSDI'24) Table 2, openchat_sharegpt4"),
    "arxiv": LengthTrace(LengthStats(7059, 12985), LengthStats(208, 371), 16384,
                         "Sarathi-Serve (OSDI'24) Table 2, arxiv_summarization"),
}
TRACE_NAMES = (*LENGTH_TRACES, "conversations")


def fit_truncated_lognormal(stats: LengthStats, upper: float) -> tuple[float, float]:
    """(mu, sigma) of a lognormal whose truncation to (0, upper] has ``stats``' median and P90."""
    log_median, log_p90, log_upper = math.log(stats.median), math.log(stats.p90), math.log(upper)
    mu, sigma = log_median, (log_p90 - log_median) / _NORMAL.inv_cdf(0.9)
    for _ in range(100):  # fixed point: the truncation moves both quantiles down
        kept = _NORMAL.cdf((log_upper - mu) / sigma)
        z50, z90 = _NORMAL.inv_cdf(0.5 * kept), _NORMAL.inv_cdf(0.9 * kept)
        sigma = (log_p90 - log_median) / (z90 - z50)
        mu = log_median - sigma * z50
    return mu, sigma


def _truncated_draw(rng: np.random.Generator, mu: float, sigma: float,
                    upper: np.ndarray) -> np.ndarray:
    """Lognormal(mu, sigma) draws, each conditioned on <= its ``upper`` (inverse CDF)."""
    kept = np.array([_NORMAL.cdf((math.log(u) - mu) / sigma) for u in upper])
    u = rng.uniform(0.0, 1.0, size=len(upper)) * kept
    u = np.clip(u, 1e-12, 1 - 1e-12)
    values = np.exp(mu + sigma * np.array([_NORMAL.inv_cdf(float(x)) for x in u]))
    return np.clip(np.rint(values), 1, upper).astype(np.int64)


def length_trace(name: str, num_requests: int, seed: int = 0) -> list[TraceRequest]:
    """``num_requests`` requests with the named trace's lengths (arrivals left to the caller)."""
    trace = LENGTH_TRACES[name]
    rng = np.random.default_rng(seed)
    # The prompt leaves room for at least the median output; the output takes what is left.
    prompt_upper = trace.max_total - trace.output.median
    mu_p, sigma_p = fit_truncated_lognormal(trace.prompt, prompt_upper)
    prompts = _truncated_draw(rng, mu_p, sigma_p, np.full(num_requests, prompt_upper))
    mu_o, sigma_o = fit_truncated_lognormal(trace.output, trace.max_total - trace.prompt.median)
    outputs = _truncated_draw(rng, mu_o, sigma_o, (trace.max_total - prompts).astype(float))
    return [TraceRequest(int(p), int(o)) for p, o in zip(prompts, outputs)]


def conversation_trace(num_conversations: int, seed: int = 0, mean_turns: float = 5.5,
                       think_s: float = 5.0, max_context: int = 8192,
                       user_mean: float = 161.31, answer_mean: float = 337.99,
                       sigma: float = 1.0) -> list[TraceRequest]:
    """Multi-round conversations (see the module docstring). First turns carry no arrival
    (the caller's process sets when conversations start); later turns follow their previous."""
    rng = np.random.default_rng(seed)
    requests: list[TraceRequest] = []

    def draw(mean: float) -> int:
        return max(1, int(round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma))))

    for conversation in range(num_conversations):
        turns = 1 + int(rng.poisson(max(0.0, mean_turns - 1)))
        context, previous = 0, None
        for turn in range(turns):
            user, answer = draw(user_mean), draw(answer_mean)
            if context + user + answer > max_context:
                break
            request_id = f"conv{conversation}-turn{turn}"
            requests.append(TraceRequest(
                user, answer, client_id=f"conversation-{conversation}", request_id=request_id,
                follows=previous, think_s=float(rng.exponential(think_s)) if previous else 0.0))
            context += user + answer
            previous = request_id
    return requests


def poisson_arrivals(requests: list[TraceRequest], rate: float, seed: int = 0) -> None:
    """Give each request without an arrival (and not following another) a Poisson arrival at
    ``rate`` requests/s; ``rate`` 0 sends them all at time 0."""
    rng = np.random.default_rng(seed + 1_000_003)
    now = 0.0
    for request in requests:
        if request.arrival_s is not None or request.follows is not None:
            continue
        if rate > 0:
            now += float(rng.exponential(1.0 / rate))
        request.arrival_s = now


def load_csv_trace(path: str | Path, limit: int = 0) -> list[TraceRequest]:
    """Vidur's or Azure/Splitwise's CSV trace (columns in the module docstring). Arrivals are
    kept (made relative to the first) when the file has them."""
    requests: list[TraceRequest] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if {"num_prefill_tokens", "num_decode_tokens"} <= columns:
            prompt_col, output_col, time_col = "num_prefill_tokens", "num_decode_tokens", "arrived_at"
        elif {"ContextTokens", "GeneratedTokens"} <= columns:
            prompt_col, output_col, time_col = "ContextTokens", "GeneratedTokens", "TIMESTAMP"
        else:
            raise ValueError(f"{path}: expected Vidur columns (num_prefill_tokens, "
                             "num_decode_tokens[, arrived_at]) or Azure/Splitwise columns "
                             f"(TIMESTAMP, ContextTokens, GeneratedTokens); found "
                             f"{', '.join(sorted(columns)) or 'none'}")
        for number, row in enumerate(reader, 2):
            try:
                prompt, output = int(float(row[prompt_col])), int(float(row[output_col]))
                arrival = _seconds(row[time_col]) if row.get(time_col) else None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            requests.append(TraceRequest(max(1, prompt), max(1, output), arrival_s=arrival))
            if limit and len(requests) == limit:
                break
    if not requests:
        raise ValueError(f"{path} holds no requests")
    known = [r.arrival_s for r in requests if r.arrival_s is not None]
    if known:
        first = min(known)
        for request in requests:
            if request.arrival_s is not None:
                request.arrival_s -= first
    return requests


def _seconds(value: str) -> float:
    """A number of seconds, or an Azure timestamp (``2023-11-16 18:15:46.6805900``)."""
    try:
        return float(value)
    except ValueError:
        pass
    head, _, fraction = value.strip().partition(".")
    stamp = datetime.fromisoformat(head)
    return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)


def make_trace(name: str, num_requests: int, seed: int = 0, **conversation) -> list[TraceRequest]:
    """A named trace (``TRACE_NAMES``) or a CSV file; for ``conversations``, ``num_requests``
    counts conversations."""
    if name in LENGTH_TRACES:
        return length_trace(name, num_requests, seed)
    if name == "conversations":
        return conversation_trace(num_requests, seed, **conversation)
    if Path(name).suffix == ".csv":
        return load_csv_trace(name, num_requests)
    if Path(name).suffix == ".jsonl":
        from tierserve.bench.workloads import load_dataset

        return [TraceRequest(len(r.prompt_token_ids), r.max_tokens, client_id=r.client_id,
                             prompt_token_ids=r.prompt_token_ids)
                for r in load_dataset(name, None, 128, num_requests)]
    raise ValueError(f"unknown trace {name!r}; choose one of {', '.join(TRACE_NAMES)} or give a "
                     ".csv file (Vidur or Azure/Splitwise columns) or a .jsonl dataset of token ids")
