"""The OpenAPI document as a contract: every status each route can send, with its schema.

FastAPI documents a 422 for every route with a body; this server never sends one (a validation
error is OpenAI's 400), so it is removed, and the statuses the server does send are listed with
the error schema and what makes them happen.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tierserve.server.responses import ErrorResponse, Health
from tierserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"

ERROR_CAUSES = {
    400: "Invalid request: a value out of range, a prompt over the context (both numbers are "
         "named), a token id outside the vocabulary, a body that is not JSON or not UTF-8 text.",
    401: "Missing or wrong API key (only when the server runs with --api-key).",
    404: "The model named is not the one this server serves (GET /v1/models).",
    413: "The request body is larger than --max-body-size.",
    500: "The request failed inside the engine (its sampling, its logits, its text). Only this "
         "request is affected; the server goes on serving.",
    503: "The waiting queue is full (--max-waiting-requests; retry after Retry-After seconds), "
         "or the engine has stopped.",
    504: "A non-streamed request ran past --request-timeout.",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer"}}}


def errors(*statuses: int, causes: dict[int, str] | None = None) -> dict:
    """``responses=`` entries for these error statuses; ``causes`` replaces the default
    description of some (a route whose 404 is an unknown file, not a model)."""
    documented = {}
    causes = {**ERROR_CAUSES, **(causes or {})}
    for status in statuses:
        entry: dict = {"model": ErrorResponse, "description": causes[status]}
        if status == 503:
            entry["headers"] = RETRY_AFTER
        documented[status] = entry
    return documented


def generated(model: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A 200 that is JSON (``model``), or with ``stream: true`` Server-Sent Events whose
    ``data`` is a ``chunk``, an error (the request failed midway), or ``[DONE]`` (the end).
    Under OpenAPI 3.1 an event stream's ``schema`` describes one event."""
    payload = {"anyOf": [{"$ref": REF.format(model=chunk.__name__)},
                         {"$ref": REF.format(model=ErrorResponse.__name__)}]}
    event = {"type": "object", "required": ["data"],
             "description": f"One Server-Sent Event: data is a JSON {chunk.__name__}, an "
                            "ErrorResponse if the request failed midway, or [DONE] (the last).",
             "properties": {"data": {"anyOf": [
                 {"const": "[DONE]"},
                 {"type": "string", "contentMediaType": "application/json",
                  "contentSchema": payload}]}}}
    _EXTRA_MODELS.add(chunk)
    return {200: {"model": model, "description": "The completion; with stream: true, "
                  "Server-Sent Events.", "content": {"text/event-stream": {"schema": event}}}}


_EXTRA_MODELS: set[type[BaseModel]] = set()  # referenced only inside hand-written schemas


GENERATION_ERRORS = errors(400, 401, 404, 413, 500, 503, 504)
HEALTH = {200: {"model": Health, "description": "The engine is serving."},
          503: {"model": Health, "description": "The engine stopped, its KV accounting broke, or "
                "several engine steps in a row failed: restart the server."}}
METRICS = {200: {"description": "Prometheus text exposition format.",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}}


def install(app: FastAPI) -> None:
    """Serve the document without FastAPI's 422s (and their schemas)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            # Request schemas as pydantic writes them: FastAPI's OpenAPI model turns integer
            # bounds into floats, and 2**63 - 1 (the seed's) does not survive that.
            requests = (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                        DetokenizeRequest)
            for model in sorted(_EXTRA_MODELS, key=lambda m: m.__name__) + list(requests):
                definition = model.model_json_schema(ref_template=REF)
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
