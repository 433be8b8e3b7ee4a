"""Server-Sent Events exactly as OpenAI sends them: a role chunk, content deltas, a chunk with the
finish_reason, an optional usage chunk, then ``data: [DONE]``.

Text that could still turn out to be the start of a stop string is held back until it is known
not to be (the non-streamed text never contains the stop string, and neither does the stream).
A request that fails midway gets an error event, ``data: {"error": {...}}`` in OpenAI's shape
(the official client raises it as APIError), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from tierserve.engine.async_engine import EngineDeadError
from tierserve.outputs import CompletionOutput, RequestOutput
from tierserve.request import SamplingParams
from tierserve.server import protocol
from tierserve.server.schemas import ChatCompletionRequest, CompletionRequest, error_body
from tierserve.structured.tools import (
    CallSyntax,
    between_calls,
    complete_calls,
    content_end,
    with_id,
)


class _Chunks:
    """Builds one stream's SSE chunks: same id, object, model and creation time on each."""

    def __init__(self, request_id: str, obj: str, model: str, stream_options) -> None:
        self.request_id, self.obj, self.model = request_id, obj, model
        self.created = int(time.time())
        self.include_usage = bool(stream_options and stream_options.include_usage)

    def __call__(self, choices: list) -> str:
        envelope = protocol.envelope(self.request_id, self.obj, self.model, choices, self.created)
        if self.include_usage:
            envelope["usage"] = None  # OpenAI: null on every chunk but the last
        return protocol.sse(envelope)

    def usage(self, outputs: list[RequestOutput]) -> str:
        """The final chunk: no choices, the whole request's usage."""
        counts = protocol.usage(*protocol.count_tokens(outputs))
        return protocol.sse(protocol.envelope(self.request_id, self.obj, self.model, [],
                                              self.created, counts))


class _ChoiceState:
    """What has been sent of one choice."""

    def __init__(self) -> None:
        self.text_sent = 0
        self.tokens_sent = 0
        self.finished = False
        self.echo_len: int | None = None  # chars of echoed prompt sent (None: not yet)
        self.calls_sent = 0  # tool calls streamed so far (requests with tools)


def _ready(completion: CompletionOutput, state: _ChoiceState, holdback: int) -> tuple[str, int]:
    """(new text, token count) that may be sent now."""
    end = len(completion.text)
    if not completion.finished:
        end = max(state.text_sent, end - holdback)
    return completion.text[state.text_sent:end], len(completion.token_ids)


async def _merged(streams: list[AsyncIterator[RequestOutput]]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def stream_chat(streams, request_id: str, model: str, body: ChatCompletionRequest,
                      params: SamplingParams, syntax: CallSyntax | None = None
                      ) -> AsyncIterator[str]:
    """SSE chunks of a chat completion; with ``syntax`` (``convert.tool_syntax``: tools are
    active) calls are parsed out."""
    chunk = _Chunks(request_id, "chat.completion.chunk", model, body.stream_options)

    for index in range(params.n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    holdback = max((len(s) for s in params.stop), default=1) - 1
    states = [_ChoiceState() for _ in range(params.n)]
    final: RequestOutput | None = None
    try:
        async for _, output in _merged(streams):
            final = output
            if output.error:
                yield _failed(output)
                break
            for completion in output.outputs:
                state = states[completion.index]
                if state.finished:
                    continue
                if syntax:  # content until a call opens, then each call once it is complete
                    for event in _tool_stream(chunk, completion, state, holdback, syntax,
                                              body.parallel_tool_calls):
                        yield event
                    continue
                text, tokens = _ready(completion, state, holdback)
                if text or (completion.finished and tokens > state.tokens_sent):
                    logprobs = protocol.chat_logprobs(completion, state.tokens_sent, tokens,
                                                      body.top_logprobs or 0)
                    yield chunk([{"index": completion.index, "delta": {"content": text},
                                  "logprobs": logprobs, "finish_reason": None}])
                    state.text_sent += len(text)
                    state.tokens_sent = tokens
                if completion.finished:
                    state.finished = True
                    yield chunk([{"index": completion.index, "delta": {}, "logprobs": None,
                                  "finish_reason": protocol.finish_reason(completion)}])
    except EngineDeadError as exc:
        yield protocol.sse(error_body(str(exc), "server_error"))
    if chunk.include_usage and final is not None and not final.error:
        yield chunk.usage([final])
    yield protocol.sse("[DONE]")


def _tool_stream(chunk, completion, state: _ChoiceState, holdback: int, syntax: CallSyntax,
                 parallel: bool = True) -> list[str]:
    """The events of one update of a choice of a request with tools: text while no call has
    opened (a tail that may start one held back), each call as a tool_calls delta as soon as
    it is complete (only the first without ``parallel``), at the end the text between and
    after the calls and the finish reason (tool_calls when it called)."""
    text, index, events = completion.text, completion.index, []

    def delta(body: dict, reason: str | None = None) -> str:
        return chunk([{"index": index, "delta": body, "logprobs": None,
                       "finish_reason": reason}])

    calls = complete_calls(text, syntax)
    if state.calls_sent == 0:
        # Finished without a call: all of it is content (a broken call block too, as the
        # non-streamed answer has it).
        end = (len(text) if completion.finished and not calls
               else min(content_end(text, syntax),
                        len(text) - (0 if completion.finished else holdback)))
        if end > state.text_sent:
            events.append(delta({"content": text[state.text_sent:end]}))
            state.text_sent = end
    for _, _, call in (calls if parallel else calls[:1])[state.calls_sent:]:
        events.append(delta({"tool_calls": [{"index": state.calls_sent, **with_id(call)}]}))
        state.calls_sent += 1
    if completion.finished:
        state.finished = True
        reason = protocol.finish_reason(completion)
        if state.calls_sent:  # what the non-streamed answer has as content, less what was sent
            rest = between_calls(text, calls, state.text_sent)
            rest = rest.rstrip() if state.text_sent else rest.strip()
            if rest:
                events.append(delta({"content": rest}))
            reason = "tool_calls" if reason == "stop" else reason
        events.append(delta({}, reason))
    return events


async def stream_completion(streams, request_id: str, model: str, body: CompletionRequest,
                            params: SamplingParams, tokenizer) -> AsyncIterator[str]:
    chunk = _Chunks(request_id, "text_completion", model, body.stream_options)

    holdback = max((len(s) for s in params.stop), default=1) - 1
    states: dict[int, _ChoiceState] = {}
    finals: dict[int, RequestOutput] = {}
    try:
        async for prompt_index, output in _merged(streams):
            finals[prompt_index] = output
            if output.error:
                yield _failed(output)
                break
            for completion in output.outputs:
                choice = prompt_index * params.n + completion.index
                state = states.setdefault(choice, _ChoiceState())
                if state.finished:
                    continue
                if state.echo_len is None:  # the prompt goes first, once per choice
                    if body.echo and not _prompt_scored(output, body, completion):
                        continue  # its logprobs come chunk by chunk under chunked prefill
                    state.echo_len = 0
                    if body.echo:
                        prefix, logprobs = protocol.echo(output, body.logprobs, tokenizer)
                        state.echo_len = len(prefix)
                        yield chunk([{"index": choice, "text": prefix, "logprobs": logprobs,
                                      "finish_reason": None}])
                text, tokens = _ready(completion, state, holdback)
                if text or completion.finished:
                    logprobs = protocol.completion_logprobs(
                        completion, state.tokens_sent, tokens, body.logprobs or 0,
                        state.echo_len + state.text_sent)
                    reason = protocol.finish_reason(completion) if completion.finished else None
                    yield chunk([{"index": choice, "text": text, "logprobs": logprobs,
                                  "finish_reason": reason}])
                    state.text_sent += len(text)
                    state.tokens_sent = tokens
                    state.finished = completion.finished
    except EngineDeadError as exc:
        yield protocol.sse(error_body(str(exc), "server_error"))
    if chunk.include_usage and not any(output.error for output in finals.values()):
        yield chunk.usage(list(finals.values()))
    yield protocol.sse("[DONE]")


def _prompt_scored(output: RequestOutput, body: CompletionRequest,
                   completion: CompletionOutput) -> bool:
    """Whether every prompt token's logprob has arrived (always, without logprobs)."""
    if body.logprobs is None or completion.finished:
        return True
    scored = output.prompt_logprobs
    return scored is not None and len(scored) >= len(output.prompt_token_ids)


def _failed(output: RequestOutput) -> str:
    return protocol.sse(error_body(f"the request failed: {output.error}", "server_error"))
