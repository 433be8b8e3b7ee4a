"""LLM: offline generate() and chat() for Python users, shaped like vLLM's LLM class."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from tierserve.config import EngineConfig
from tierserve.engine.core import EngineCore
from tierserve.engine.loading import build_engine
from tierserve.engine.output import OutputProcessor
from tierserve.errors import InvalidRequestError
from tierserve.outputs import RequestOutput
from tierserve.request import Request, SamplingParams

PromptInput = str | list[int] | dict[str, Any]

log = logging.getLogger(__name__)


class LLM:
    """Load a model once, then generate for many prompts at once with continuous batching.

    ``model`` is a known name (``smollm2``), a ``.gguf`` file, or an HF folder with config.json
    and safetensors. Keyword arguments mirror the CLI flags; ``config`` overrides them all.
    """

    def __init__(self, model: str = "smollm2", *, config: EngineConfig | None = None,
                 **options: Any) -> None:
        """``options`` are engine settings by field name, e.g. ``dtype="bfloat16"``,
        ``kv_cache_memory="2GiB"``, ``max_num_batched_tokens=256``, ``scheduling_policy="fair"``,
        ``preemption_mode="swap"``, ``swap_space="4GiB"``, ``enable_prefix_caching=False``
        (see tierserve.config for every field and its default)."""
        if config is None:
            config = EngineConfig.from_kwargs(model=str(model), **options)
        self.config = config
        self.engine = build_engine(config)
        self.core: EngineCore = self.engine.core
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, batch_mode: bool = False,
                 batch_options: dict | None = None) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or {"prompt_token_ids": [...]}); in order.

        A request that fails inside the engine (say its logits processor raises) comes back
        with ``error`` set and its completions' ``finish_reason`` "error"; the others finish
        as if it had never been there. ``batch_mode=True`` runs the whole list with the BatchLLM
        planner (the batch's prefix tree computed once per node, decode-heavy requests first,
        admission by KV memory): best for large offline jobs; results are the same.
        ``batch_options`` goes to it: ``output_estimate`` ("history", the default, or
        "max_tokens") and ``declared_max_tokens`` (a list, the budgets the plan sees).
        """
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        if batch_mode:
            return self._run_batch(encoded, sampling_params, use_tqdm, batch_options or {})
        return self._run(encoded, sampling_params, use_tqdm)

    def _run_batch(self, encoded, sampling_params, use_tqdm: bool,
                   options: dict) -> list[RequestOutput]:
        from tierserve.batch.runner import BatchRunner

        params = self._per_prompt(sampling_params, len(encoded))
        for (_, ids), p in zip(encoded, params):  # every prompt valid before anything runs
            self.core.make_request("check", ids, p)
        results: list[RequestOutput | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc="batch", unit="req",
                   disable=not use_tqdm or len(encoded) < 2)

        def done(index: int, output: RequestOutput) -> None:
            results[index] = output
            bar.update(1)

        unknown = set(options) - {"output_estimate", "declared_max_tokens"}
        if unknown:
            raise ValueError(f"unknown batch_options: {', '.join(sorted(unknown))}")
        runner = BatchRunner(self.core, OutputProcessor(self.tokenizer),
                             output_estimate=options.get("output_estimate", "history"))
        with bar:
            try:
                self.last_batch_stats = runner.run(
                    encoded, params, on_output=done, id_prefix=f"b{next(self._ids)}",
                    declared_max_tokens=options.get("declared_max_tokens"))
            except BaseException:
                self.core.abort(list(self.core.scheduler.requests))
                raise
        _warn_failed(results)
        return results  # type: ignore[return-value]

    @staticmethod
    def _per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise InvalidRequestError(
                f"got {len(sampling_params)} SamplingParams for {count} prompts; "
                "give one, or one per prompt", "sampling_params")
        return list(sampling_params)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        encoded = [self.tokenizer.chat_prompt(c, add_generation_prompt) for c in conversations]
        return self._run(encoded, sampling_params, use_tqdm)

    def stream_chat(self, messages: list[dict], sampling_params: SamplingParams | None = None
                    ) -> Iterator[RequestOutput]:
        """Answer one conversation, yielding the growing RequestOutput after every step.

        Closing the iterator early (or Ctrl-C) aborts the request and frees its KV blocks.
        """
        params = sampling_params or SamplingParams()
        text, ids = self.tokenizer.chat_prompt(messages)
        request_id, requests = self._make_requests(ids, params)
        processor = OutputProcessor(self.tokenizer)
        processor.add(request_id, text, requests)
        for request in requests:
            self.core.add_request(request)
        try:
            while processor.num_unfinished:
                yield from processor.step(self.core)[0]
        finally:
            self.core.abort([r.request_id for r in requests])

    # -- internals -----------------------------------------------------------------------------
    def _encode(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(
            "a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}; "
            f"got {type(prompt).__name__}", "prompt")

    def _run(self, encoded: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        sampling_params = self._per_prompt(sampling_params, len(encoded))
        processor = OutputProcessor(self.tokenizer)
        batches = [self._make_requests(ids, params)
                   for (_, ids), params in zip(encoded, sampling_params)]
        order = {}
        for (text, _), (request_id, requests) in zip(encoded, batches):
            processor.add(request_id, text, requests)
            order[request_id] = len(order)
        added: list[str] = []
        try:
            for _, requests in batches:
                for request in requests:
                    self.core.add_request(request)
                    added.append(request.request_id)
            finished = self._drive(processor, len(batches), use_tqdm)
            if len(finished) != len(batches):
                raise RuntimeError(f"the engine stopped with {len(batches) - len(finished)} of "
                                   f"{len(batches)} requests unfinished")
        except BaseException:
            self.core.abort(added)  # Ctrl-C or an error: free every block before re-raising
            raise
        _warn_failed(finished)
        return sorted(finished, key=lambda out: order[out.request_id])

    def _make_requests(self, ids: list[int], params: SamplingParams) -> tuple[str, list[Request]]:
        request_id = str(next(self._ids))
        return request_id, self.core.make_requests(request_id, ids, params)

    def _drive(self, processor: OutputProcessor, total: int, use_tqdm: bool
               ) -> list[RequestOutput]:
        finished: list[RequestOutput] = []
        bar = tqdm(total=total, desc="generate", unit="req", disable=not use_tqdm or total < 2)
        started, tokens = time.perf_counter(), 0

        def on_step(outputs: list[RequestOutput], new_tokens: int) -> None:  # output thread
            nonlocal tokens
            tokens += new_tokens
            for output in outputs:
                if output.finished:
                    finished.append(output)
                    bar.update(1)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)

        with bar:
            processor.drive(self.core, on_step)
        return finished


def _warn_failed(outputs: Sequence[RequestOutput | None]) -> None:
    failed = [output for output in outputs if output is not None and output.error]
    if failed:
        log.warning("%d of %d requests failed (their outputs carry the error); the first: %s",
                    len(failed), len(outputs), failed[0].error)
