"""Faults injected into the real model path (tiny Llama): a logits processor that raises, a NaN
logits row, a detokenizer that raises, a KV copy that fails. The faulty request fails alone; every
other request finishes with the tokens of a fault-free run; no block is left held."""

from __future__ import annotations

import json
import random

import pytest

from tierserve import LLM, SamplingParams
from tierserve.model.kv_storage import SwapWorker
from tierserve.model.tokenizer import IncrementalDetokenizer

PROMPTS = [[random.Random(i).randrange(3, 400) for _ in range(8 + 9 * i)] for i in range(5)]
BAD = 2  # index of the request the fault is injected into


def _params(**kw) -> list[SamplingParams]:
    """Greedy, seeded and penalised requests mixed."""
    kinds = [dict(temperature=0.0), dict(temperature=0.9, seed=11),
             dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=0.8, seed=3, top_p=0.9),
             dict(temperature=0.0, presence_penalty=0.5)]
    return [SamplingParams(max_tokens=12, ignore_eos=True, **kind, **kw) for kind in kinds]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_blocks=96)


@pytest.fixture(scope="module")
def expected(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params(), use_tqdm=False)]


def _assert_clean(llm) -> None:
    llm.core.kv.check_invariants()
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    assert not llm.core.scheduler.requests and not llm.core.kv.owners()


def _check(outputs, expected, fragment: str) -> None:
    for index, output in enumerate(outputs):
        if index == BAD:
            assert output.outputs[0].finish_reason == "error", output
            assert fragment in output.error
        else:
            assert output.error is None and output.outputs[0].token_ids == expected[index]


def _raising_processor(output_ids, row):
    if len(output_ids) == 4:
        raise RuntimeError("processor bug at token 4")
    return row


def test_a_logits_processor_that_raises_fails_its_request_alone(llm, expected):
    params = _params()
    params[BAD].logits_processors = [_raising_processor]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    _check(outputs, expected, "processor bug at token 4")
    assert len(outputs[BAD].outputs[0].token_ids) == 4  # the tokens before the fault stay
    _assert_clean(llm)


def test_a_nan_logits_row_fails_its_request_alone(llm, expected, monkeypatch):
    sampler = llm.engine.runner.sampler
    real = sampler.sample
    bad_id = {}

    def poisoned(logits, rows):
        for index, row in enumerate(rows):
            if row.request_id == bad_id.get("id") and len(row.output_token_ids) == 2:
                logits = logits.clone()
                logits[index, 5] = float("nan")
        return real(logits, rows)

    monkeypatch.setattr(sampler, "sample", poisoned)
    real_make = llm.core.make_requests

    def remember(request_id, prompt_ids, params, **kw):  # the engine id of request BAD
        made = real_make(request_id, prompt_ids, params, **kw)
        if prompt_ids == PROMPTS[BAD]:
            bad_id["id"] = made[0].request_id
        return made

    monkeypatch.setattr(llm.core, "make_requests", remember)
    _check(llm.generate(PROMPTS, _params(), use_tqdm=False), expected, "non-finite")
    _assert_clean(llm)


def test_a_detokenizer_that_raises_fails_its_request_alone(llm, expected, monkeypatch):
    real_add = IncrementalDetokenizer.add

    context = PROMPTS[BAD][-IncrementalDetokenizer.CONTEXT_TOKENS:]

    def add(self, token_id):
        if self._ids[:len(context)] == context and len(self.output_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_add(self, token_id)

    # the detokenizer starts on the prompt's last tokens: they identify request BAD
    assert all(p[-len(context):] != context for i, p in enumerate(PROMPTS) if i != BAD)
    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    _check(llm.generate(PROMPTS, _params(), use_tqdm=False), expected, "processing its output")
    _assert_clean(llm)


@pytest.mark.parametrize("kind", ["out", "in", "victim"])
def test_a_failed_swap_copy_fails_only_its_request_and_releases_every_tier(
        tiny_llama_dir, monkeypatch, kind):
    """A pool too small for all four requests preempts by swap, and evicted prefix blocks are
    saved to the host tier. The first swap-out (or swap-in, or copy-up) fails: its request
    fails, the others finish exactly, no step fails as a whole. Or the first victim save
    fails: nobody fails (the host copy is dropped, so it is never found by content)."""
    llm = LLM(str(tiny_llama_dir), num_blocks=14, max_num_batched_tokens=32,
              preemption_mode="swap", swap_space="4MiB")
    prompts = [p[:40] for p in PROMPTS[1:]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.core.scheduler.num_swap_preemptions > 0
    real_execute, failed = SwapWorker._execute, []

    def execute(self, job):
        if not failed and job.key.startswith(f"{kind}-"):
            failed.append(job.key)
            raise OSError("injected: host memory copy failed")
        return real_execute(self, job)

    monkeypatch.setattr(SwapWorker, "_execute", execute)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    errors = [o for o in outputs if o.error]
    assert failed, f"no {kind} copy ran"
    if kind == "victim":
        assert errors == []
    else:
        assert len(errors) == 1 and "between memory tiers" in errors[0].error
    assert llm.core.num_step_failures == 0
    for output, tokens in zip(outputs, expected):
        if not output.error:
            assert output.outputs[0].token_ids == tokens
    _assert_clean(llm)
    for store in llm.core.kv.lower:
        assert store.pool.num_free == store.pool.num_blocks


def test_a_batch_file_line_that_fails_becomes_an_error_line_and_the_run_goes_on(
        llm, tmp_path, monkeypatch):
    from tierserve.batch.jobfile import run_batch_file

    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": PROMPTS[i], "max_tokens": 6, "temperature": 0}}
             for i in range(4)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    clean = run_batch_file(llm, source, tmp_path / "clean.jsonl", show_progress=False)
    assert clean.succeeded == 4
    sampler = llm.engine.runner.sampler
    real = sampler.sample

    def poisoned(logits, rows):
        logits = logits.clone()
        for index, row in enumerate(rows):
            if row.prompt_token_ids == PROMPTS[1]:
                logits[index] = float("nan")
        return real(logits, rows)

    monkeypatch.setattr(sampler, "sample", poisoned)
    summary = run_batch_file(llm, source, tmp_path / "out.jsonl", show_progress=False)
    assert (summary.succeeded, summary.failed) == (3, 1) and "non-finite" in summary.errors[0]
    got = [json.loads(t) for t in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = [json.loads(t) for t in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in got] == ["c0", "c1", "c2", "c3"]
    assert got[1]["response"]["status_code"] == 500
    assert got[1]["response"]["body"]["error"]["type"] == "server_error"
    for index in (0, 2, 3):
        assert (got[index]["response"]["body"]["choices"][0]["text"]
                == want[index]["response"]["body"]["choices"][0]["text"])
    _assert_clean(llm)


def test_a_request_the_executor_names_is_failed_and_the_step_rerun_without_it(llm, expected):
    """RequestError (what the runner raises for a chunk whose inputs it cannot build) over the
    real runner: the named request fails, the step runs again without it, the rest is exact."""
    from tests.fakes import FaultyExecutor

    runner = llm.core.executor
    llm.core.executor = FaultyExecutor(runner, raise_when=lambda chunk: (
        chunk.prompt_token_ids == PROMPTS[BAD] and len(chunk.output_token_ids) == 3))
    try:
        outputs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    finally:
        llm.core.executor = runner
    _check(outputs, expected, "injected: bad inputs")
    assert len(outputs[BAD].outputs[0].token_ids) == 3
    assert llm.core.num_step_failures == 0
    _assert_clean(llm)
