"""Benchmark workloads: seeded, reproducible lists of BenchRequest (prompt ids, output length).

Prompts are token ids drawn uniformly from the model's vocabulary with its special ids left out
(no tokenizer round trip, so a length asked for is the length sent). Outputs are forced to their
drawn length with ``ignore_eos``, so every policy serves exactly the same tokens.

    sharegpt-like            lognormal prompt and output lengths, means 161 / 338 (vLLM paper)
    arxiv-summarization-like long prompts, short outputs (Sarathi-Serve's arxiv_summarization)
    shared-prefix            few-shot prefixes x questions (prefix-cache reuse)
    many-groups              64 prefixes of 1-2k tokens x 8 questions, in random order
    nested                   system prompts > templates > documents > questions, shuffled
    snippet-like             one long document, many short questions, prompt:output ~10:1
    multi-turn               conversations; each turn's prompt extends the previous turn's context
    random                   fixed lengths
    --dataset FILE.jsonl     one request per line: {"prompt": str} or {"prompt_token_ids": [...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload; ``arrival_s`` is seconds after the start (None: assigned by
    the harness, e.g. Poisson arrivals, or all at once)."""

    prompt_token_ids: list[int]
    max_tokens: int
    client_id: str | None = None
    arrival_s: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a benchmark request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens is {self.max_tokens}; it must be at least 1")


@dataclass(slots=True, frozen=True)
class TokenSpace:
    """The ids a synthetic prompt may use: ``0 .. vocab_size - 1`` minus ``excluded``."""

    vocab_size: int
    excluded: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.vocab_size - len(self.excluded & set(range(self.vocab_size))) < 1:
            raise ValueError(f"no usable token ids in a vocabulary of {self.vocab_size}")

    def draw(self, rng: np.random.Generator, count: int) -> list[int]:
        ids = rng.integers(0, self.vocab_size, size=count)
        if self.excluded:
            bad = np.isin(ids, list(self.excluded))
            while bad.any():  # redraw the few special ids hit
                ids[bad] = rng.integers(0, self.vocab_size, size=int(bad.sum()))
                bad = np.isin(ids, list(self.excluded))
        return [int(t) for t in ids]


@dataclass(slots=True, frozen=True)
class LengthDist:
    """Lognormal lengths with this mean (before clipping) and log-space sigma."""

    mean: float
    sigma: float

    def sample(self, rng: np.random.Generator, count: int, scale: float, low: int,
               high: int) -> list[int]:
        mu = math.log(self.mean * scale) - self.sigma**2 / 2  # E[X] = exp(mu + sigma^2 / 2)
        values = rng.lognormal(mu, self.sigma, size=count)
        return [int(v) for v in np.clip(np.rint(values), low, high)]


# vLLM paper (Kwon et al., 2023), Table 1: ShareGPT input mean 161.31, output mean 337.99 tokens.
SHAREGPT_PROMPT = LengthDist(161.31, 1.0)
SHAREGPT_OUTPUT = LengthDist(337.99, 1.0)
# Sarathi-Serve (Agrawal et al., 2024), arxiv_summarization: prompt median ~7059, output median
# ~208 tokens; sigma 0.5 puts the lognormal's median at those values.
ARXIV_PROMPT = LengthDist(7059 * math.exp(0.5**2 / 2), 0.5)
ARXIV_OUTPUT = LengthDist(208 * math.exp(0.5**2 / 2), 0.5)
MIN_LEN = 4


@dataclass(slots=True)
class WorkloadSpec:
    """What to generate. Lengths of the synthetic workloads are multiplied by ``scale`` (to fit
    a small CPU), then clipped to ``[4, max_*_len]``; long prompts are not scaled."""

    name: str = "sharegpt-like"
    num_requests: int = 100
    seed: int = 0
    scale: float = 1.0
    max_prompt_len: int = 4096
    max_output_len: int = 2048
    # The Sarathi scenario: this fraction of requests gets a prompt of long_prompt_len tokens.
    long_prompt_fraction: float = 0.0
    long_prompt_len: tuple[int, int] = (1000, 2000)
    input_len: int = 128  # random
    output_len: int = 128  # random, shared-prefix, multi-turn answers
    num_prefixes: int = 4  # shared-prefix
    prefix_len: int = 512  # shared-prefix (scaled)
    question_len: int = 32  # shared-prefix question, multi-turn user turn (scaled)
    turns: int = 4  # multi-turn
    dataset: str | None = None
    dataset_max_tokens: int = 128  # output length of a dataset line without "max_tokens"

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS and self.dataset is None:
            raise ValueError(f"unknown workload {self.name!r}; choose one of "
                             f"{', '.join(WORKLOADS)} or give --dataset FILE.jsonl")
        if self.num_requests < 0:
            raise ValueError(f"num_requests is {self.num_requests}; it must be >= 0")
        if self.scale <= 0:
            raise ValueError(f"--scale must be positive, got {self.scale}")
        if not 0.0 <= self.long_prompt_fraction <= 1.0:
            raise ValueError(f"--long-prompt-fraction must be in [0, 1], got "
                             f"{self.long_prompt_fraction}")
        low, high = self.long_prompt_len
        if not 1 <= low <= high:
            raise ValueError(f"--long-prompt-len {low},{high} must be two lengths, low <= high")


def make_workload(spec: WorkloadSpec, tokens: TokenSpace,
                  encode: Callable[[str], list[int]] | None = None) -> list[BenchRequest]:
    """The requests ``spec`` describes; the same spec and token space give the same list.

    ``encode`` tokenizes text prompts of a dataset file.
    """
    if spec.dataset is not None:
        return load_dataset(spec.dataset, encode, spec.dataset_max_tokens, spec.num_requests)
    rng = np.random.default_rng(spec.seed)
    requests = WORKLOADS[spec.name](spec, tokens, rng)
    if spec.long_prompt_fraction > 0:
        _mix_long_prompts(requests, spec, tokens, rng)
    return requests


def sharegpt_like(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                  ) -> list[BenchRequest]:
    return _lognormal(spec, tokens, rng, SHAREGPT_PROMPT, SHAREGPT_OUTPUT)


def arxiv_summarization_like(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                             ) -> list[BenchRequest]:
    return _lognormal(spec, tokens, rng, ARXIV_PROMPT, ARXIV_OUTPUT)


def _lognormal(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator,
               prompt: LengthDist, output: LengthDist) -> list[BenchRequest]:
    count = spec.num_requests
    prompt_lens = prompt.sample(rng, count, spec.scale, MIN_LEN, spec.max_prompt_len)
    output_lens = output.sample(rng, count, spec.scale, MIN_LEN, spec.max_output_len)
    return [BenchRequest(tokens.draw(rng, p), o) for p, o in zip(prompt_lens, output_lens)]


def random_lengths(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                   ) -> list[BenchRequest]:
    return [BenchRequest(tokens.draw(rng, spec.input_len), spec.output_len)
            for _ in range(spec.num_requests)]


def shared_prefix(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                  ) -> list[BenchRequest]:
    """``num_prefixes`` few-shot prefixes; request i asks a fresh question after prefix i % k."""
    prefix_len = max(1, round(spec.prefix_len * spec.scale))
    question_len = max(1, round(spec.question_len * spec.scale))
    prefixes = [tokens.draw(rng, prefix_len) for _ in range(spec.num_prefixes)]
    return [BenchRequest(prefixes[i % spec.num_prefixes] + tokens.draw(rng, question_len),
                         spec.output_len, client_id=f"prefix-{i % spec.num_prefixes}")
            for i in range(spec.num_requests)]


def many_groups(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                ) -> list[BenchRequest]:
    """``num_prefixes`` prefixes of ``prefix_len`` to twice that (scaled), each followed by
    ``num_requests / num_prefixes`` fresh questions, all shuffled: requests sharing a prefix are
    scattered through the input, as in a large offline batch. Output lengths differ between
    prefixes (templates), not much within one."""
    per = max(1, spec.num_requests // max(1, spec.num_prefixes))
    low = max(1, round(spec.prefix_len * spec.scale))
    question_len = max(1, round(spec.question_len * spec.scale))
    requests = []
    for group in range(spec.num_prefixes):
        prefix = tokens.draw(rng, int(rng.integers(low, 2 * low + 1)))
        # each template answers at its own typical length (lognormal around output_len), each
        # answer within 20% of it
        typical = spec.output_len * float(rng.lognormal(0.0, 0.5))
        for _ in range(per):
            length = max(1, round(typical * float(rng.uniform(0.8, 1.2))))
            requests.append(BenchRequest(prefix + tokens.draw(rng, question_len),
                                         min(length, spec.max_output_len),
                                         client_id=f"prefix-{group}"))
    return [requests[i] for i in rng.permutation(len(requests))]


# nested: (systems, templates per system, documents per template); questions fill the rest
NESTED_FANOUT = (3, 8, 4)


def nested(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
           ) -> list[BenchRequest]:
    """A four-level prefix tree, shuffled: 3 system prompts (``prefix_len``), 8 few-shot
    templates under each (``prefix_len``), 4 documents under each template (twice
    ``prefix_len``), then questions (``question_len``) spread evenly over the documents."""
    systems, templates, documents = NESTED_FANOUT
    unit = max(1, round(spec.prefix_len * spec.scale))
    question_len = max(1, round(spec.question_len * spec.scale))
    leaves = systems * templates * documents
    per = max(1, -(-spec.num_requests // leaves))
    requests = []
    for s in range(systems):
        system = tokens.draw(rng, unit)
        for t in range(templates):
            template = system + tokens.draw(rng, unit)
            for _ in range(documents):
                document = template + tokens.draw(rng, 2 * unit)
                requests += [BenchRequest(document + tokens.draw(rng, question_len),
                                          spec.output_len, client_id=f"template-{s}-{t}")
                             for _ in range(per)]
    requests = requests[: spec.num_requests]
    return [requests[i] for i in rng.permutation(len(requests))]


def snippet_like(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
                 ) -> list[BenchRequest]:
    """One document of ``prefix_len`` tokens (scaled), then ``num_requests`` short questions
    (``question_len``); each answer is a tenth of its prompt."""
    document = tokens.draw(rng, max(1, round(spec.prefix_len * spec.scale)))
    question_len = max(1, round(spec.question_len * spec.scale))
    output = max(1, (len(document) + question_len) // 10)
    return [BenchRequest(document + tokens.draw(rng, question_len), output,
                         client_id="document") for _ in range(spec.num_requests)]


def multi_turn(spec: WorkloadSpec, tokens: TokenSpace, rng: np.random.Generator
               ) -> list[BenchRequest]:
    """Conversations of ``turns`` turns. Turn k's prompt is turn k-1's prompt, a stand-in for
    its answer (``output_len`` tokens), then a new user message, so it extends the context the
    engine has cached. Turns are interleaved round-robin across conversations: with arrivals in
    list order, a conversation's next turn comes ``num_conversations`` arrivals later.
    """
    turns = max(1, spec.turns)
    num_conversations = max(1, -(-spec.num_requests // turns))
    user_len = max(1, round(spec.question_len * spec.scale))
    contexts: list[list[int]] = [[] for _ in range(num_conversations)]
    requests: list[BenchRequest] = []
    for _turn in range(turns):
        for conversation, context in enumerate(contexts):
            if len(requests) == spec.num_requests:
                return requests
            if context:
                context.extend(tokens.draw(rng, spec.output_len))  # the previous answer
            context.extend(tokens.draw(rng, user_len))
            requests.append(BenchRequest(list(context), spec.output_len,
                                         client_id=f"conversation-{conversation}"))
    return requests


def _mix_long_prompts(requests: list[BenchRequest], spec: WorkloadSpec, tokens: TokenSpace,
                      rng: np.random.Generator) -> None:
    """Give ``long_prompt_fraction`` of the requests (chosen at random) a long prompt."""
    count = round(spec.long_prompt_fraction * len(requests))
    low, high = spec.long_prompt_len
    for index in rng.choice(len(requests), size=count, replace=False):
        length = int(rng.integers(low, high + 1))
        requests[int(index)].prompt_token_ids = tokens.draw(rng, length)


def load_dataset(path: str | Path, encode: Callable[[str], list[int]] | None,
                 default_max_tokens: int, limit: int = 0) -> list[BenchRequest]:
    """Read a JSONL file: each line {"prompt": str} or {"prompt_token_ids": [...]}, optionally
    with "max_tokens" and "client_id". ``limit`` > 0 keeps the first ``limit`` lines."""
    requests: list[BenchRequest] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if "prompt_token_ids" in item:
                ids = [int(t) for t in item["prompt_token_ids"]]
            elif "prompt" in item:
                if encode is None:
                    raise ValueError(f"{path}:{number}: a text prompt needs a tokenizer")
                ids = encode(str(item["prompt"]))
            else:
                raise ValueError(f'{path}:{number}: give "prompt" or "prompt_token_ids"')
            requests.append(BenchRequest(ids, int(item.get("max_tokens", default_max_tokens)),
                                         client_id=item.get("client_id")))
            if limit and len(requests) == limit:
                break
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def describe(requests: list[BenchRequest]) -> dict:
    """Counts and mean lengths, for the JSON config block."""
    count = len(requests)
    return {
        "num_requests": count,
        "prompt_len_mean": sum(len(r.prompt_token_ids) for r in requests) / count if count else 0,
        "output_len_mean": sum(r.max_tokens for r in requests) / count if count else 0,
        "prompt_len_max": max((len(r.prompt_token_ids) for r in requests), default=0),
    }


WORKLOADS: dict[str, Callable[[WorkloadSpec, TokenSpace, np.random.Generator],
                              list[BenchRequest]]] = {
    "sharegpt-like": sharegpt_like,
    "arxiv-summarization-like": arxiv_summarization_like,
    "shared-prefix": shared_prefix,
    "many-groups": many_groups,
    "nested": nested,
    "snippet-like": snippet_like,
    "multi-turn": multi_turn,
    "random": random_lengths,
}
