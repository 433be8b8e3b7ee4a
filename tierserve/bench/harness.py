"""The in-process benchmark loop: add requests whose arrival time has come, then step the engine.

Every benchmark builds a fresh engine per configuration (so no run inherits another's prefix
cache or counters), warms it up, and drives one seeded workload through ``drive``. Timestamps
are the engine core's own (``core.metrics``); a request's arrival time is its scheduled arrival,
so time spent waiting for the step in flight when it arrived counts in its TTFT, as it would
for a request reaching a server mid-step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tierserve.bench.workloads import BenchRequest, TokenSpace
from tierserve.config import EngineConfig
from tierserve.metrics import MetricsCollector, RequestTimeline
from tierserve.request import SamplingParams
from tierserve.sched.plan import StepPlan, StepResult, SwapDone


@dataclass(slots=True)
class RunRecord:
    """What one configuration's run produced."""

    timelines: list[RequestTimeline]  # finished, in finishing order
    outputs: dict[str, list[int]]  # request id -> output token ids
    summary: dict  # core.metrics.summary()
    start: float  # monotonic time of arrival offset 0
    wall_s: float  # first arrival to last finish
    num_steps: int | None  # None: a remote server's (not known to the client)
    preemptions: int | None  # None: the server does not report them
    swap_preemptions: int | None
    swaps: list[SwapDone] = field(default_factory=list)  # finished copies (out, in, victim)
    copies_per_swap: list[int] = field(default_factory=list)  # decided swap outs and ins
    blocks_per_swap: list[int] = field(default_factory=list)
    clipped: int = 0  # requests shortened to fit the context
    errors: list[str] = field(default_factory=list)  # requests that failed (remote runs)
    # A remote server's own mean TTFT from its /metrics, beside the client's: the gap is HTTP,
    # its event loop and the client (None in process, or when the server has no such metric).
    server_ttft_mean_s: float | None = None

    @property
    def output_tokens(self) -> int:
        return sum(len(ids) for ids in self.outputs.values())


class RecordingExecutor:
    """Passes plans to the real executor and keeps every finished copy it reports."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.swaps: list[SwapDone] = []

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.inner.execute(plan)
        self.swaps.extend(result.swaps_done)
        return result


def open_engine(config: EngineConfig, warmup: bool = True):
    """A fresh LLM for ``config`` (a private copy), warmed up, with empty metrics."""
    from tierserve.engine.llm import LLM

    llm = LLM(config=copy.deepcopy(config))
    if warmup:
        warm_up(llm)
    llm.core.metrics = MetricsCollector()
    llm.core.executor = RecordingExecutor(llm.core.executor)
    return llm


def warm_up(llm) -> None:
    """Run a couple of short requests so the first measured steps do not pay one-off costs
    (allocator growth, kernel selection). They are unique tokens: nothing stays cached that a
    workload could hit."""
    tokens = token_space(llm)
    rng = np.random.default_rng(12345)
    prompt_len = max(1, min(64, llm.core.limits.kv_capacity_tokens // 4))
    prompts = [tokens.draw(rng, prompt_len) for _ in range(2)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    cache = llm.core.kv.prefix_cache
    cache.clear()
    cache.queries = cache.hits = 0  # the hit rate a run reports is the workload's own


def token_space(llm) -> TokenSpace:
    """The model's ids minus special and stop ids (prompts never contain control tokens)."""
    return model_token_space(llm.tokenizer, llm.core.limits.vocab_size, llm.core.eos_token_ids)


def model_token_space(tokenizer, vocab_size: int, stop_ids) -> TokenSpace:
    """``token_space`` without an engine: ``vocab_size`` ids minus the tokenizer's special ids
    and ``stop_ids``."""
    excluded = {i for i, token in tokenizer.backend.get_added_tokens_decoder().items()
                if token.special}
    excluded |= set(stop_ids)
    return TokenSpace(vocab_size, frozenset(excluded))


def local_prompt_space(model_path) -> tuple[object, TokenSpace]:
    """The tokenizer of a model file or folder and the ids prompts are drawn from, without
    loading weights: below both the checkpoint's and the tokenizer's vocabulary (an id past the
    tokenizer's has no token in llama.cpp or a server), minus special and stop ids."""
    from tierserve.model.loader import load_arch_config
    from tierserve.model.tokenizer import Tokenizer

    arch = load_arch_config(model_path)
    tokenizer = Tokenizer.from_path(model_path)
    space = model_token_space(tokenizer, min(arch.vocab_size, tokenizer.vocab_size),
                              set(tokenizer.stop_token_ids) | set(arch.eos_token_ids))
    return tokenizer, space


def fit_to_context(requests: list[BenchRequest], context: int) -> tuple[list[BenchRequest], int]:
    """Shorten requests so prompt + output fit ``context`` tokens; (requests, how many changed).
    Outputs keep up to half the context; prompts keep their head."""
    fitted, clipped = [], 0
    for request in requests:
        prompt, max_tokens = request.prompt_token_ids, request.max_tokens
        if len(prompt) + max_tokens > context:
            max_tokens = max(1, min(max_tokens, context // 2))
            prompt = prompt[: max(1, context - max_tokens - 1)]
            clipped += 1
        fitted.append(BenchRequest(prompt, max_tokens, request.client_id, request.arrival_s))
    return fitted, clipped


def drive(llm, requests: list[BenchRequest], progress: str | None = None) -> RunRecord:
    """Serve ``requests`` (arrival offsets from now; None = at once) to completion, greedily
    and with ``ignore_eos`` so each produces exactly its ``max_tokens``. ``progress`` names a
    tqdm bar (None: no bar)."""
    from tqdm.auto import tqdm

    core = llm.core
    limits = core.limits
    requests, clipped = fit_to_context(
        requests, min(limits.max_model_len, limits.kv_capacity_tokens))
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s or 0.0)
    preemptions0 = core.scheduler.num_preemptions
    swap_preemptions0 = core.scheduler.num_swap_preemptions
    counters = core.kv.counters
    copies0, blocks0 = len(counters.copies_per_swap), len(counters.blocks_per_swap)
    outputs: dict[str, list[int]] = {}
    bar = tqdm(total=len(requests), desc=progress or "bench", unit="req",
               disable=progress is None, leave=False)
    start = time.monotonic()
    next_index, tokens = 0, 0
    with bar:
        while next_index < len(order) or core.has_unfinished():
            now = time.monotonic()
            while next_index < len(order):
                index = order[next_index]
                arrival = start + (requests[index].arrival_s or 0.0)
                if arrival > now:
                    break
                _add(core, f"r{index}", requests[index], arrival)
                outputs[f"r{index}"] = []
                next_index += 1
            if not core.has_unfinished():
                time.sleep(max(0.0, arrival - time.monotonic()))
                continue
            for update in core.step():
                outputs[update.request_id].extend(update.new_token_ids)
                tokens += len(update.new_token_ids)
                if update.finished:
                    bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-9):.1f} tok/s",
                                refresh=False)
    timelines = core.metrics.finished_timelines()
    end = max((t.finished_time for t in timelines), default=start)
    first = min((t.arrival_time for t in timelines), default=start)
    return RunRecord(
        timelines=timelines, outputs=outputs, summary=core.metrics.summary(), start=start,
        wall_s=end - first, num_steps=core.metrics.steps_total,
        preemptions=core.scheduler.num_preemptions - preemptions0,
        swap_preemptions=core.scheduler.num_swap_preemptions - swap_preemptions0,
        swaps=list(core.executor.swaps) if isinstance(core.executor, RecordingExecutor) else [],
        copies_per_swap=counters.copies_per_swap[copies0:],
        blocks_per_swap=counters.blocks_per_swap[blocks0:], clipped=clipped)


def _add(core, request_id: str, request: BenchRequest, arrival: float) -> None:
    params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    core.add_request(core.make_request(request_id, request.prompt_token_ids, params,
                                       client_id=request.client_id, arrival_time=arrival))


def run_variants(config: EngineConfig, variants: dict[str, Callable[[EngineConfig], None]],
                 build: Callable[[object], list[BenchRequest]], progress: bool = True
                 ) -> tuple[list[BenchRequest], dict[str, RunRecord]]:
    """Serve one workload under each named variant of ``config``, one after the other.

    Each variant edits a private copy of the config and gets a fresh, warmed-up engine; the
    requests are built once, with the first engine (``build(llm)``), and reused by every variant.
    """
    requests: list[BenchRequest] | None = None
    records: dict[str, RunRecord] = {}
    for name, adjust in variants.items():
        variant = copy.deepcopy(config)
        adjust(variant)
        llm = open_engine(variant)
        try:
            if requests is None:
                requests = build(llm)
            records[name] = drive(llm, requests, progress=name if progress else None)
        finally:
            close_engine(llm)
    return requests or [], records


def policy_variants(policies) -> dict[str, Callable[[EngineConfig], None]]:
    """One variant per scheduling policy name."""
    def use(policy: str) -> Callable[[EngineConfig], None]:
        return lambda config: setattr(config.scheduler, "policy", policy)

    return {policy: use(policy) for policy in policies}


def close_engine(llm) -> None:
    """Stop the swap worker thread (and remove a disk tier's file) before the next engine."""
    llm.engine.runner.close()
