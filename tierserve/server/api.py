"""The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Handlers validate (pydantic, 400 on bad input), tokenize off the event loop, submit to the
AsyncEngine and either collect the result or stream Server-Sent Events. A client that leaves
aborts its request, which frees its KV blocks at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from tierserve.errors import InvalidRequestError
from tierserve.metrics import render_prometheus
from tierserve.outputs import RequestOutput
from tierserve.request import SamplingParams
from tierserve.server import convert, protocol
from tierserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
)
from tierserve.server.streaming import stream_chat, stream_completion

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    request_timeout: float | None = None  # seconds, non-streamed requests


class ApiError(Exception):
    """An OpenAI-shaped error with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app over a running AsyncEngine."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        log.info("shutting down: aborting %d in-flight requests", engine.num_in_flight)
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="tierserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving with paged, tiered KV memory.")
    app.state.engine, app.state.settings = engine, settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    app.include_router(_v1_router(engine, settings), prefix="/v1",
                       dependencies=[Depends(_api_key_check(settings.api_key))])

    @app.get("/health", summary="200 while the engine loop is alive")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(render_prometheus(engine.core.metrics, _gauges(engine)),
                                 media_type="text/plain; version=0.0.4")

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

    @router.get("/models", summary="The served model")
    async def models():
        # max_model_len as vLLM reports it: clients (e.g. tierserve bench --url) fit prompts to it.
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "tierserve",
                                            "max_model_len": engine.core.limits.max_model_len}]}

    @router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body, settings)
        try:
            prompt_ids = await asyncio.to_thread(engine.tokenizer.encode_chat,
                                                 convert.chat_messages(body))
        except ValueError as exc:  # a template that rejects the conversation
            raise ApiError(400, str(exc), param="messages") from exc
        params = _checked(convert.chat_params, body)
        request_id = engine.next_request_id("chatcmpl")
        streams = [_submit(engine, request_id, None, prompt_ids, params, body)]
        if body.stream:
            return _sse(stream_chat(streams, request_id, settings.model_name, body, params))
        outputs = await _collect(streams, request, settings)
        choices = [protocol.chat_choice(c.index, c, body.top_logprobs or 0)
                   for c in outputs[0].outputs]
        return protocol.envelope(request_id, "chat.completion", settings.model_name, choices,
                                 usage_=protocol.usage(*protocol.count_tokens(outputs)))

    @router.post("/completions", summary="Text completion (OpenAI-compatible)")
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
        request_id = engine.next_request_id("cmpl")
        streams = [_submit(engine, f"{request_id}-{i}", text, ids, params, body)
                   for i, (text, ids) in enumerate(prompts)]
        if body.stream:
            return _sse(stream_completion(streams, request_id, settings.model_name, body, params))
        outputs = await _collect(streams, request, settings)
        choices = []
        for prompt_index, (output, (text, _)) in enumerate(zip(outputs, prompts)):
            prefix = (text or "") if body.echo else ""
            for c in output.outputs:
                choices.append(protocol.completion_choice(prompt_index * params.n + c.index, c,
                                                          body.logprobs or 0, prefix))
        return protocol.envelope(request_id, "text_completion", settings.model_name, choices,
                                 usage_=protocol.usage(*protocol.count_tokens(outputs)))

    return router


def _check_model(body: SamplingFields, settings: ServerSettings) -> None:
    if body.model and body.model != settings.model_name:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server serves "
                       f"'{settings.model_name}' (GET /v1/models)", "invalid_request_error",
                       "model", "model_not_found")


def _checked(convert_fn, *args):
    try:
        return convert_fn(*args)
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from exc


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
            return done.result()
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


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                           "<key>'", "authentication_error", code="invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
            param = loc[0] if loc else None
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError):
        return JSONResponse(error_body(f"server busy: {exc}; retry shortly", "server_busy",
                                       code="queue_full"), status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return JSONResponse(error_body(str(exc), "server_error"), status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (by header, or counted as they come)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        response = JSONResponse(error_body(f"request body is larger than {self.max_bytes:,} "
                                           "bytes (--max-body-size)", code="body_too_large"),
                                status_code=413)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass
