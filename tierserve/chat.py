"""Interactive terminal chat: streams tokens as they come and keeps the conversation."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def run_chat(args: argparse.Namespace) -> int:
    """Read user turns from stdin until Ctrl-D; Ctrl-C stops an answer, or exits at the prompt."""
    from tierserve.cli import engine_config_from_args, sampling_from_args
    from tierserve.engine.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    params = sampling_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tierserve chat with {args.model}. Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        answer = _stream_answer(llm, system + history, params)
        history.append({"role": "assistant", "content": answer})


def _stream_answer(llm, messages: list[dict], params) -> str:
    shown = 0
    text = ""
    output = None
    stream = llm.stream_chat(messages, params)
    try:
        for output in stream:
            text = output.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if output is not None:
        log.info("turn of %d messages: %d prompt tokens (%d from the prefix cache), %d generated",
                 len(messages), len(output.prompt_token_ids), output.num_cached_tokens,
                 len(output.outputs[0].token_ids))
    return text
