"""The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /v1/files, /v1/batches,
/tokenize, /detokenize, /tokenizer_info, /health, /metrics.

Handlers validate (pydantic, 400 on bad input), tokenize off the event loop, submit to the
AsyncEngine and either collect the result or stream Server-Sent Events. A client that leaves
aborts its request, which frees its KV blocks at the next engine step. A request that fails in
the engine gets a 500 (or an error event on its stream); the others are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tierserve.batch.service import BatchService, BatchSettings
from tierserve.engine.async_engine import AsyncEngine
from tierserve.errors import InvalidRequestError
from tierserve.metrics import render_prometheus
from tierserve.outputs import RequestOutput
from tierserve.request import SamplingParams
from tierserve.server import convert, openapi, protocol
from tierserve.server.batches import batch_router
from tierserve.server.http_errors import (
    ApiError,
    BodySizeLimit,
    api_key_check,
    install_error_handlers,
)
from tierserve.server.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Detokenized,
    ModelList,
    Tokenized,
    TokenizerInfo,
)
from tierserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from tierserve.server.streaming import stream_chat, stream_completion

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    request_timeout: float | None = None  # seconds, non-streamed requests
    # /health answers 503 after this many engine steps in a row failed as a whole.
    max_consecutive_step_failures: int = 3
    # The Batch API's files and batches (None: a temporary folder, gone with the process).
    data_dir: Path | None = None
    batch_share: float = 0.5  # of KV and sequences a batch may reserve beside online requests
    max_batch_file_bytes: int = 200 << 20
    max_batch_requests: int = 50_000


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app over a running AsyncEngine."""
    data_dir = settings.data_dir
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="tierserve-batches-"))
        log.warning("batch API: no --data-dir; files and batches live in %s until the process "
                    "ends", data_dir)
    batches = BatchService(engine, settings.model_name, BatchSettings(
        Path(data_dir), share=settings.batch_share,
        max_file_bytes=settings.max_batch_file_bytes,
        max_requests=settings.max_batch_requests))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        batches.start()
        yield
        await batches.stop()  # a batch in progress stays so and resumes at the next start
        log.info("shutting down: aborting %d in-flight requests", engine.num_in_flight)
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="tierserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving with paged, tiered KV memory.")
    app.state.engine, app.state.settings, app.state.batches = engine, settings, batches
    # An upload carries the file plus its multipart framing.
    upload_limit = (settings.max_batch_file_bytes + (64 << 10), "--max-batch-file-size")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       overrides={"/v1/files": upload_limit})
    install_error_handlers(app)
    auth = [Depends(api_key_check(settings.api_key))]
    app.include_router(_v1_router(engine, settings), prefix="/v1", dependencies=auth)
    app.include_router(batch_router(batches), prefix="/v1", dependencies=auth)
    app.include_router(_tokenizer_router(engine, settings), dependencies=auth)

    @app.get("/health", summary="200 while the engine serves; 503 when it should be restarted",
             response_model=None, responses=openapi.HEALTH)
    async def health():
        problem = engine.health_problem(settings.max_consecutive_step_failures)
        if problem is not None:
            log.error("health check: unhealthy: %s", problem)
            return JSONResponse({"status": f"unhealthy: {problem}"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
             responses=openapi.METRICS)
    async def metrics():
        return PlainTextResponse(render_prometheus(engine.core.metrics, _gauges(engine)),
                                 media_type="text/plain; version=0.0.4")

    openapi.install(app)
    return app


def _gauges(engine: AsyncEngine) -> dict[str, float]:
    core, kv = engine.core, engine.core.kv
    gauges = {"num_requests_running": core.scheduler.num_running,
              "num_requests_waiting": core.scheduler.num_waiting,
              "num_requests_swapped": core.scheduler.num_swapped,
              "kv_blocks_in_use": kv.pool.num_used,
              "prefix_cache_hit_rate": kv.prefix_cache.hit_rate,
              "tokens_per_second": core.metrics.recent_tokens_per_second()}
    for tier, usage in kv.tier_usage().items():
        gauges[f'kv_cache_usage{{tier="{tier}"}}'] = usage
    return gauges


def _v1_router(engine: AsyncEngine, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    @router.get("/models", summary="The served model", response_model=ModelList,
                responses=openapi.errors(401))
    async def models():
        # max_model_len as vLLM reports it: clients (e.g. tierserve bench --url) fit prompts to it.
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "tierserve",
                                            "max_model_len": engine.core.limits.max_model_len}]}

    @router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)",
                 response_model=None, responses={
                     **openapi.generated(ChatCompletion, ChatCompletionChunk),
                     **openapi.GENERATION_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body, settings)
        try:
            messages, template_args = convert.chat_inputs(body, engine.tokenizer)
            prompt_ids = await asyncio.to_thread(engine.tokenizer.encode_chat, messages,
                                                 **template_args)
        except ValueError as exc:  # a template that rejects the conversation
            raise ApiError(400, str(exc), param="messages") from exc
        syntax = convert.tool_syntax(body, engine.tokenizer)
        params = _checked(convert.chat_params, body, syntax)
        await _check_structured(engine, params)
        request_id = engine.next_request_id("chatcmpl")
        streams = [_submit(engine, request_id, None, prompt_ids, params, body)]
        if body.stream:
            return _sse(stream_chat(streams, request_id, settings.model_name, body, params,
                                    syntax))
        outputs = await _collect(streams, request, settings)
        choices = [protocol.chat_choice(c.index, c, body.top_logprobs or 0, syntax,
                                        body.parallel_tool_calls)
                   for c in outputs[0].outputs]
        response = protocol.envelope(request_id, "chat.completion", settings.model_name, choices,
                                     usage_=protocol.usage(*protocol.count_tokens(outputs)))
        if params.prompt_logprobs is not None:
            response["prompt_logprobs"] = protocol.prompt_logprobs(outputs[0])
        return response

    @router.post("/completions", summary="Text completion (OpenAI-compatible)",
                 response_model=None, responses={
                     **openapi.generated(Completion, CompletionChunk),
                     **openapi.GENERATION_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body, settings)
        prompts = await asyncio.to_thread(_checked, convert.encode_prompts, engine.tokenizer,
                                          body.prompt)
        limit = engine.max_waiting_requests
        if limit is not None and len(prompts) > limit:  # a 503 would never clear: say so
            raise ApiError(400, f"this request has {len(prompts)} prompts; the server queues at "
                           f"most {limit} waiting requests (--max-waiting-requests): send fewer "
                           "prompts per request", param="prompt")
        params = _checked(convert.completion_params, body)
        await _check_structured(engine, params)
        request_id = engine.next_request_id("cmpl")
        streams = [_submit(engine, f"{request_id}-{i}", text, ids, params, body)
                   for i, (text, ids) in enumerate(prompts)]
        if body.stream:
            return _sse(stream_completion(streams, request_id, settings.model_name, body, params,
                                          engine.tokenizer))
        outputs = await _collect(streams, request, settings)
        choices = _completion_choices(outputs, body, params.n, engine.tokenizer)
        return protocol.envelope(request_id, "text_completion", settings.model_name, choices,
                                 usage_=protocol.usage(*protocol.count_tokens(outputs)))

    return router


def _completion_choices(outputs: list[RequestOutput], body: CompletionRequest, n: int,
                        tokenizer) -> list[dict]:
    """The choices of a non-streamed completion: prompt i's completions at i * n + index,
    each after its echoed prompt when asked."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        prefix, prefix_logprobs = "", None
        if body.echo:
            prefix, prefix_logprobs = protocol.echo(output, body.logprobs, tokenizer)
        for c in output.outputs:
            choice = protocol.completion_choice(prompt_index * n + c.index, c,
                                                body.logprobs or 0, prefix, prefix_logprobs)
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = protocol.prompt_logprobs(output)
            choices.append(choice)
    return choices


def _tokenizer_router(engine: AsyncEngine, settings: ServerSettings) -> APIRouter:
    """vLLM's tokenizer routes: what lets lm-evaluation-harness's local-completions score
    through this server with no tokenizer of its own (its remote tokenizer backend)."""
    router = APIRouter()
    tokenizer = engine.tokenizer
    bad_input = openapi.errors(400, 401, 404, 413)

    @router.post("/tokenize", summary="Token ids of a text or a conversation (vLLM's)",
                 response_model=Tokenized, responses=bad_input)
    async def tokenize(body: TokenizeRequest):
        _check_model(body, settings)
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                ids = await asyncio.to_thread(tokenizer.encode_chat, messages,
                                              body.add_generation_prompt)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
        else:
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.core.limits.max_model_len,
                "tokens": ids}

    @router.post("/detokenize", summary="The text of token ids (vLLM's)",
                 response_model=Detokenized, responses=bad_input)
    async def detokenize(body: DetokenizeRequest):
        _check_model(body, settings)
        vocab = engine.core.limits.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           param="tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @router.get("/tokenizer_info", summary="The tokenizer's special tokens and chat template",
                response_model=TokenizerInfo, responses=openapi.errors(401))
    async def tokenizer_info():
        special = tokenizer.special_tokens
        return {"tokenizer_class": "tierserve.Tokenizer", "bos_token": special.get("bos_token"),
                "eos_token": special.get("eos_token"), "pad_token": special.get("pad_token"),
                "chat_template": tokenizer.chat_template,
                "model_max_length": engine.core.limits.max_model_len,
                "vocab_size": engine.core.limits.vocab_size}

    return router


def _check_model(body: SamplingFields | TokenizeRequest | DetokenizeRequest,
                 settings: ServerSettings) -> None:
    if body.model and body.model != settings.model_name:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server serves "
                       f"'{settings.model_name}' (GET /v1/models)", "invalid_request_error",
                       "model", "model_not_found")


def _checked(convert_fn, *args):
    try:
        return convert_fn(*args)
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from exc


async def _check_structured(engine: AsyncEngine, params: SamplingParams) -> None:
    """Compile a structured output's grammar off the event loop (cached per spec), so a bad
    one is a 400 before anything is queued."""
    if params.structured_outputs is not None and engine.core.constraints is not None:
        await asyncio.to_thread(_checked, engine.core.constraints.check, params.structured_outputs)


def _submit(engine: AsyncEngine, request_id: str, text: str | None, prompt_ids: list[int],
            params: SamplingParams, body: SamplingFields) -> AsyncIterator[RequestOutput]:
    try:
        requests = engine.make_requests(request_id, prompt_ids, params, client_id=body.user,
                                        priority=body.priority)
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from exc
    return engine.generate(request_id, text, requests)


async def _collect(streams: list[AsyncIterator[RequestOutput]], request: Request,
                   settings: ServerSettings) -> list[RequestOutput]:
    """Run non-streamed requests to the end; abort them if the client leaves or time runs out."""

    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for output in stream:
            final = output
        return final

    tasks = [asyncio.ensure_future(last(stream)) for stream in streams]
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done = asyncio.gather(*tasks)
        finished, _ = await asyncio.wait({done, watcher}, timeout=settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        if done in finished:
            outputs = done.result()
            failed = next((output for output in outputs if output.error), None)
            if failed is not None:
                raise ApiError(500, f"the request failed: {failed.error}", "server_error")
            return outputs
        if watcher in finished:
            raise ApiError(499, "client closed the request", "client_closed")
        raise ApiError(504, f"the request did not finish within --request-timeout "
                       f"{settings.request_timeout:g} s; lower max_tokens or stream it",
                       "timeout", code="timeout")
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()  # an unfinished stream's finally aborts its request
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
