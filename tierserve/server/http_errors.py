"""Everything that answers with an error: ApiError, the exception handlers, the body-size limit and
the API key check. Every error leaves in OpenAI's shape ({"error": {message, type, param, code}})
with the status the OpenAPI document lists for it; nothing reaches the client as a bare 500."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.engine.async_engine import EngineDeadError, QueueFullError
from tierserve.server.schemas import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An OpenAI-shaped error with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def api_key_check(api_key: str | None):
    """A FastAPI dependency: 401 unless ``Authorization: Bearer <api_key>`` (when one is set)."""
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                           "<key>'", "authentication_error", code="invalid_api_key")

    return check


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # pydantic names union members in the location ("prompt.list[constrained-int]"):
        # keep field names and indices only.
        loc = [str(part) for part in first.get("loc", ())
               if part != "body" and (isinstance(part, int) or str(part).isidentifier())]
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
        # 404 for an unknown path, 405 for a wrong method (with its Allow header)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so, in our shape
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (by header, or counted as they come);
    ``overrides`` maps a path to its own limit (file uploads)."""

    def __init__(self, app, max_bytes: int, overrides: dict[str, tuple[int, str]] | None = None
                 ) -> None:
        self.app, self.max_bytes, self.overrides = app, max_bytes, overrides or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, flag = self.overrides.get(scope.get("path", ""), (self.max_bytes, "--max-body-size"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(send, limit, flag)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await self._reject(send, limit, flag)

    @staticmethod
    async def _reject(send, limit: int, flag: str) -> None:
        response = JSONResponse(error_body(f"request body is larger than {limit:,} bytes "
                                           f"({flag})", code="body_too_large"), status_code=413)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass
