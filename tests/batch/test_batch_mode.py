"""Batch mode end to end on the tiny model: same outputs, prefixes computed once, the OpenAI
batch file format with error lines, and resume after a kill."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tierserve import LLM, SamplingParams
from tierserve.batch.jobfile import run_batch_file


def _shared_prompts(seed=0, prefixes=3, per_prefix=5, prefix_len=64):
    rng = random.Random(seed)
    heads = [[rng.randrange(3, 350) for _ in range(prefix_len)] for _ in range(prefixes)]
    prompts = [h + [rng.randrange(3, 350) for _ in range(rng.randint(2, 10))]
               for h in heads for _ in range(per_prefix)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(2, 10), ignore_eos=True)
              for _ in prompts]
    return prompts, params


def test_batch_mode_gives_the_same_tokens_and_computes_each_shared_prefix_once(tiny_llama_dir):
    prompts, params = _shared_prompts()
    one_by_one = LLM(str(tiny_llama_dir), num_blocks=400, enable_prefix_caching=False)
    expected = [one_by_one.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
                for p, sp in zip(prompts, params)]
    llm = LLM(str(tiny_llama_dir), num_blocks=400)
    outputs = llm.generate(prompts, params, use_tqdm=False, batch_mode=True)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    stats = llm.last_batch_stats
    assert stats.num_groups == 3
    suffixes = sum(len(p) - 64 for p in prompts)
    assert stats.prefill_tokens == 3 * 64 + suffixes  # each 64-token prefix computed once
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks


def test_batch_mode_admits_by_memory_without_preempting(tiny_llama_dir):
    prompts, params = _shared_prompts(seed=1, prefixes=6, per_prefix=6)
    llm = LLM(str(tiny_llama_dir), num_blocks=40)
    outputs = llm.generate(prompts, params, use_tqdm=False, batch_mode=True)
    assert all(o.finished for o in outputs)
    assert llm.core.scheduler.num_preemptions == 0
    assert llm.last_batch_stats.peak_kv_blocks <= 40


def _write_input(path, tiny_prompts=12):
    rng = random.Random(3)
    shared = "You are a careful assistant. Answer briefly. " * 4
    lines = []
    for i in range(tiny_prompts):
        if i % 2:
            body = {"messages": [{"role": "system", "content": shared},
                                 {"role": "user", "content": f"Question {i}?"}],
                    "max_tokens": rng.randint(3, 12), "temperature": 0, "ignore_eos": True}
            url = "/v1/chat/completions"
        else:
            body = {"prompt": shared + f" item {i}", "max_tokens": rng.randint(3, 12),
                    "temperature": 0, "ignore_eos": True}
            url = "/v1/completions"
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                 "body": body}))
    lines.insert(3, "{this is not json")
    lines.insert(6, json.dumps({"custom_id": "bad-temp", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"messages": [{"role": "user", "content": "x"}],
                                         "temperature": 9}}))
    lines.insert(8, json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                                "body": {}}))
    path.write_text("\n".join(lines) + "\n")
    return lines


def _normalized(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        if record["response"] and "created" in record["response"]["body"]:
            record["response"]["body"].pop("created")
    return records


def test_batch_file_answers_every_line_in_order_with_errors_for_bad_ones(tiny_llama_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = _write_input(source)
    llm = LLM(str(tiny_llama_dir), num_blocks=200)
    summary = run_batch_file(llm, source, tmp_path / "out.jsonl", show_progress=False)
    records = _normalized(tmp_path / "out.jsonl")
    assert len(records) == len(lines) and summary.failed == 3 and summary.succeeded == 12
    assert [r["custom_id"] for r in records] == [
        json.loads(line)["custom_id"] if line.startswith("{\"") else None for line in lines]
    assert records[3]["error"]["code"] == "invalid_json_line" and records[3]["response"] is None
    assert records[6]["response"]["status_code"] == 400
    assert records[6]["response"]["body"]["error"]["param"] == "temperature"
    assert records[8]["error"]["code"] == "invalid_url"
    ok = [r for r in records if r["response"] and r["response"]["status_code"] == 200]
    chat = next(r for r in ok if r["custom_id"] == "req-1")["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] > 0
    text = next(r for r in ok if r["custom_id"] == "req-0")["response"]["body"]
    assert text["object"] == "text_completion" and text["choices"][0]["text"]
    with pytest.raises(FileExistsError):
        run_batch_file(llm, source, tmp_path / "out.jsonl", show_progress=False)


def test_killed_batch_resumes_to_the_same_file(tiny_llama_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = _write_input(source, tiny_prompts=240)
    reference = tmp_path / "reference.jsonl"
    run_batch_file(LLM(str(tiny_llama_dir), num_blocks=200), source, reference,
                   show_progress=False)
    target = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "tierserve.cli", "batch", str(source), str(target),
           "--model", str(tiny_llama_dir), "--kv-cache-memory", "2MiB",
           "--max-num-batched-tokens", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once some, but not all, lines are written
        if target.exists() and target.read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = target.read_text().count("\n")
    assert 5 <= written < len(lines), "kill landed too late to test a resume"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} already done" in resumed.stderr
    assert _normalized(target) == _normalized(reference)


def test_template_history_admits_more_than_declared_budgets_with_the_same_tokens(tiny_llama_dir):
    """Requests declare 200 output tokens but write 4: reserving what finished requests of the
    same template wrote lets more run at once than reserving max_tokens; tokens are unchanged."""
    prompts, _ = _shared_prompts(seed=2, prefixes=3, per_prefix=8, prefix_len=32)
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True) for _ in prompts]
    peaks, tokens = {}, {}
    for estimate in ("max_tokens", "history"):
        llm = LLM(str(tiny_llama_dir), num_blocks=60)
        seen = []
        original = llm.core.step

        def step(core=llm.core, seen=seen, original=original):
            seen.append(core.scheduler.num_running + core.scheduler.num_waiting)
            return original()

        llm.core.step = step
        outputs = llm.generate(prompts, params, use_tqdm=False, batch_mode=True,
                               batch_options={"output_estimate": estimate,
                                              "declared_max_tokens": [200] * len(prompts)})
        tokens[estimate] = [o.outputs[0].token_ids for o in outputs]
        peaks[estimate] = max(seen)
        assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    assert tokens["history"] == tokens["max_tokens"]
    assert peaks["max_tokens"] <= 4 < peaks["history"]
    with pytest.raises(ValueError, match="unknown batch_options"):
        LLM(str(tiny_llama_dir), num_blocks=60).generate(prompts[:2], params[:2],
                                                         batch_mode=True,
                                                         batch_options={"estimate": 1})
