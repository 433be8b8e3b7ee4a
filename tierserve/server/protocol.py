"""OpenAI response shapes built from RequestOutputs: completions, chunks, logprobs, usage."""

from __future__ import annotations

import json
import time

from tierserve.outputs import CompletionOutput, RequestOutput

SYSTEM_FINGERPRINT = "tierserve-0.1.0"


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
            "token": chosen.decoded_token, "logprob": chosen.logprob,
            "bytes": list(chosen.decoded_token.encode()),
            "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob,
                              "bytes": list(lp.decoded_token.encode())}
                             for _, lp in alternatives],
        })
    return {"content": content}


def completion_logprobs(completion: CompletionOutput, start: int = 0, end: int | None = None,
                        top: int = 0, text_offset: int = 0) -> dict | None:
    """OpenAI legacy completions logprobs for tokens [start, end) of a completion."""
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, step in zip(completion.token_ids[start:end], completion.logprobs[start:end]):
        chosen = step[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        ranked = sorted(step.values(), key=lambda lp: lp.rank)[:top]
        top_logprobs.append({lp.decoded_token: lp.logprob for lp in ranked})
        offsets.append(offset)
        offset += len(chosen.decoded_token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_choice(index: int, completion: CompletionOutput, top_logprobs: int) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": completion.text},
            "logprobs": chat_logprobs(completion, top=top_logprobs),
            "finish_reason": finish_reason(completion)}


def completion_choice(index: int, completion: CompletionOutput, top: int,
                      prefix: str = "") -> dict:
    return {"index": index, "text": prefix + completion.text,
            "logprobs": completion_logprobs(completion, top=top, text_offset=len(prefix)),
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
