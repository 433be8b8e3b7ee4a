"""The OpenAI Files and Batches routes (/v1/files, /v1/batches) over a BatchService.

What the official ``openai`` client calls: ``files.create(file=..., purpose="batch")``,
``files.retrieve/list/delete/content``, ``batches.create/retrieve/list/cancel``. Refusals are
OpenAI-shaped errors (400, 404 for an unknown file or batch, 409 for a state conflict, 413 for
an upload over the size limit).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from tierserve.batch.service import BatchRequestError, BatchService
from tierserve.server import openapi
from tierserve.server.http_errors import ApiError

FILE_404 = "No file has this id (GET /v1/files lists them)."
BATCH_404 = "No batch has this id (GET /v1/batches lists them)."
CONFLICT = ("The batch is already finished and cannot be cancelled, or the file is the input of "
            "an unfinished batch and cannot be deleted.")
UPLOAD_400 = ("Invalid upload: a missing file or purpose, a purpose other than 'batch', a file "
              "over --max-batch-file-size.")
CREATE_400 = ("Invalid batch: an endpoint other than /v1/chat/completions or /v1/completions, a "
              "completion_window other than 24h, an input file that is empty, not a batch "
              "file, or over --max-batch-requests lines.")

# OpenAPI links: what a created file or batch can be used for (Schemathesis follows them).
FILE_LINKS = {name: {"operationId": op, "parameters": {"file_id": "$response.body#/id"}}
              for name, op in (("RetrieveFile", "retrieveFile"), ("DownloadFile", "downloadFile"),
                               ("DeleteFile", "deleteFile"))}
FILE_LINKS["CreateBatch"] = {"operationId": "createBatch", "requestBody": {
    "input_file_id": "$response.body#/id", "endpoint": "/v1/completions",
    "completion_window": "24h"}}
BATCH_LINKS = {name: {"operationId": op, "parameters": {"batch_id": "$response.body#/id"}}
               for name, op in (("RetrieveBatch", "retrieveBatch"), ("CancelBatch", "cancelBatch"))}


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str = Field(description="batch (uploads) or batch_output (a batch's results)")
    status: str
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str | None
    message: str | None
    param: str | None
    line: int | None = Field(description="the input file's line (from 1) at fault")


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed",
                      "expired", "cancelling", "cancelled"]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class CreateBatchRequest(BaseModel):
    input_file_id: str = Field(description="a file uploaded with purpose 'batch'")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None


def batch_router(service: BatchService) -> APIRouter:
    router = APIRouter()

    async def call(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except BatchRequestError as exc:
            raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from exc

    @router.post("/files", summary="Upload a file (JSONL input of a batch)",
                 response_model=FileObject, operation_id="createFile",
                 responses={200: {"description": "The stored file.", "links": FILE_LINKS},
                            **openapi.errors(400, 401, 413, causes={400: UPLOAD_400})})
    async def create_file(file: Annotated[UploadFile, File(description="the JSONL file")],
                          purpose: Annotated[Literal["batch"], Form()]):
        data = await file.read()
        return await call(service.create_file, data, file.filename or "", purpose)

    @router.get("/files", summary="Files, newest first", response_model=FileList,
                responses=openapi.errors(400, 401))
    async def list_files(purpose: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         after: str | None = None):
        return _page(await call(service.list_files, purpose), limit, after)

    @router.get("/files/{file_id}", summary="A file's description", response_model=FileObject,
                operation_id="retrieveFile",
                responses=openapi.errors(401, 404, causes={404: FILE_404}))
    async def retrieve_file(file_id: str):
        return await call(service.get_file, file_id)

    @router.delete("/files/{file_id}", summary="Delete a file", response_model=FileDeleted,
                   operation_id="deleteFile",
                   responses=openapi.errors(401, 404, 409, causes={404: FILE_404,
                                                                   409: CONFLICT}))
    async def delete_file(file_id: str):
        return await call(service.delete_file, file_id)

    @router.get("/files/{file_id}/content", summary="A file's bytes", response_class=Response,
                operation_id="downloadFile",
                responses={200: {"description": "The file's bytes (JSONL).", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}},
                           **openapi.errors(401, 404, causes={404: FILE_404})})
    async def file_content(file_id: str):
        data = await call(service.file_content, file_id)
        return Response(data, media_type="application/octet-stream")

    @router.post("/batches", summary="Create a batch from an uploaded JSONL file",
                 response_model=BatchObject, operation_id="createBatch",
                 responses={200: {"description": "The batch, validating.",
                                  "links": BATCH_LINKS},
                            **openapi.errors(400, 401, 404, 413, causes={400: CREATE_400,
                                                                         404: FILE_404})})
    async def create_batch(body: CreateBatchRequest):
        return await call(service.create_batch, body.input_file_id, body.endpoint,
                         body.completion_window, body.metadata)

    @router.get("/batches", summary="Batches, newest first", response_model=BatchList,
                responses=openapi.errors(400, 401))
    async def list_batches(limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: str | None = None):
        return _page(await call(service.list_batches), limit, after)

    @router.get("/batches/{batch_id}", summary="A batch's status, counts and result files",
                response_model=BatchObject, operation_id="retrieveBatch",
                responses=openapi.errors(401, 404, causes={404: BATCH_404}))
    async def retrieve_batch(batch_id: str):
        return await call(service.get_batch, batch_id)

    @router.post("/batches/{batch_id}/cancel", summary="Cancel a batch (its finished results "
                 "are kept)", response_model=BatchObject, operation_id="cancelBatch",
                 responses=openapi.errors(401, 404, 409, causes={404: BATCH_404,
                                                                 409: CONFLICT}))
    async def cancel_batch(batch_id: str):
        return await call(service.cancel_batch, batch_id)

    return router


def _page(items: list[dict], limit: int, after: str | None) -> dict:
    """OpenAI's cursor pagination: the items after the one with id ``after``."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}
