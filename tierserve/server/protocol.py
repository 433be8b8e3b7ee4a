"""OpenAI response shapes built from RequestOutputs: completions, chunks, logprobs, usage.

Their schemas, for the OpenAPI document, are the models in responses.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from tierserve.outputs import CompletionOutput, Logprob, RequestOutput
from tierserve.structured.tools import CallSyntax, parse_calls

SYSTEM_FINGERPRINT = "tierserve-0.1.0"
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: a logprob below this is sent as this (as vLLM)


def _logprob(value: float) -> float:
    return value if value >= LOGPROB_FLOOR and not math.isnan(value) else LOGPROB_FLOOR


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(response_id: str, obj: str, model: str, choices: list, created: int | None = None,
             usage_: dict | None = None) -> dict:
    body = {"id": response_id, "object": obj, "created": created or int(time.time()),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_logprobs(completion: CompletionOutput, start: int = 0, end: int | None = None,
                  top: int = 0) -> dict | None:
    """OpenAI chat logprobs ({"content": [...]}) for tokens [start, end) of a completion."""
    if completion.logprobs is None:
        return None
    content = []
    for token_id, step in zip(completion.token_ids[start:end], completion.logprobs[start:end]):
        chosen = step[token_id]
        alternatives = sorted(step.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({
            "token": chosen.decoded_token, "logprob": _logprob(chosen.logprob),
            "bytes": list(chosen.decoded_token.encode()),
            "top_logprobs": [{"token": lp.decoded_token, "logprob": _logprob(lp.logprob),
                              "bytes": list(lp.decoded_token.encode())}
                             for _, lp in alternatives],
        })
    return {"content": content}


def completion_logprobs(completion: CompletionOutput, start: int = 0, end: int | None = None,
                        top: int = 0, text_offset: int = 0) -> dict | None:
    """OpenAI legacy completions logprobs for tokens [start, end) of a completion."""
    if completion.logprobs is None:
        return None
    steps = zip(completion.token_ids[start:end], completion.logprobs[start:end])
    return _legacy_logprobs(steps, top, text_offset)


def echo_logprobs(output: RequestOutput, top: int, decode: Callable[[list[int]], str]) -> dict:
    """The prompt's part of legacy logprobs under ``echo``: every prompt token, its logprob
    (null for the first, which nothing predicts), its top alternatives, its text offset."""
    scored = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return _legacy_logprobs(zip(output.prompt_token_ids, scored), top, 0, decode)


def _legacy_logprobs(steps, top: int, text_offset: int,
                     decode: Callable[[list[int]], str] | None = None) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, step in steps:
        if step is None:  # an unscored first prompt token
            text = decode([token_id]) if decode else ""
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            chosen = step[token_id]
            text = chosen.decoded_token
            token_logprobs.append(_logprob(chosen.logprob))
            ranked = sorted(step.values(), key=lambda lp: lp.rank)[:top]
            top_logprobs.append({lp.decoded_token: _logprob(lp.logprob) for lp in ranked})
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def echo(output: RequestOutput, logprobs: int | None, tokenizer) -> tuple[str, dict | None]:
    """The echoed prompt: its text (as sent, or decoded from token ids with special tokens)
    and, when logprobs are asked for, its tokens' legacy logprobs."""
    text = output.prompt
    if text is None:
        text = tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)
    if logprobs is None:
        return text, None
    return text, echo_logprobs(output, logprobs,
                               lambda ids: tokenizer.decode(ids, skip_special_tokens=False))


def join_logprobs(first: dict | None, second: dict | None) -> dict | None:
    """Legacy logprobs of the echoed prompt followed by those of the completion."""
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs(output: RequestOutput) -> list | None:
    """vLLM's prompt_logprobs: null for the first token, then {token id: {logprob, rank,
    decoded_token}} per prompt token."""
    if output.prompt_logprobs is None:
        return None
    return [None if step is None else {str(token_id): _prompt_entry(lp)
                                       for token_id, lp in step.items()}
            for step in output.prompt_logprobs]


def _prompt_entry(lp: Logprob) -> dict:
    return {"logprob": _logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}


def chat_choice(index: int, completion: CompletionOutput, top_logprobs: int,
                syntax: CallSyntax | None = None, parallel: bool = True) -> dict:
    """One choice; with a call ``syntax`` (tools active) the text is parsed for tool calls
    (then the finish reason of a stopped answer is ``tool_calls``); without ``parallel``, one
    call."""
    message = {"role": "assistant", "content": completion.text}
    reason = finish_reason(completion)
    if syntax is not None:
        content, calls = parse_calls(completion.text, syntax, parallel)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            reason = "tool_calls" if reason == "stop" else reason
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(completion, top=top_logprobs), "finish_reason": reason}


def completion_choice(index: int, completion: CompletionOutput, top: int,
                      prefix: str = "", prefix_logprobs: dict | None = None) -> dict:
    """One choice; ``prefix`` (and its ``prefix_logprobs``) is the echoed prompt, if any."""
    logprobs = completion_logprobs(completion, top=top, text_offset=len(prefix))
    return {"index": index, "text": prefix + completion.text,
            "logprobs": join_logprobs(prefix_logprobs, logprobs),
            "finish_reason": finish_reason(completion)}


def finish_reason(completion: CompletionOutput) -> str | None:
    reason = completion.finish_reason
    return "stop" if reason == "abort" else reason


def sse(data: dict | str) -> str:
    """One Server-Sent Events message."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def count_tokens(outputs: list[RequestOutput]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) over several user requests."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, completion
