"""`tierserve batch`: the OpenAI Batch API file format, run offline with the BatchLLM planner.

Input: one JSON object a line, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions"
| "/v1/completions", "body": {...}}``. Output: one line per input line, in input order:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A malformed
line gets ``response: null`` and an ``error``; an invalid body gets ``status_code: 400`` and an
OpenAI error body; the rest of the batch runs either way.

Lines are written in input order as soon as every earlier line is done, and flushed one by one,
so an interrupted run leaves a valid prefix of the output; ``resume`` keeps it (dropping a torn
last line) and computes only what is missing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tqdm.auto import tqdm

from tierserve.batch.runner import BatchRunner
from tierserve.engine.output import OutputProcessor
from tierserve.errors import InvalidRequestError
from tierserve.outputs import RequestOutput
from tierserve.request import SamplingParams
from tierserve.server import convert, protocol
from tierserve.server.schemas import ChatCompletionRequest, CompletionRequest, error_body
from tierserve.structured.tools import CallSyntax

ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


@dataclass(slots=True)
class Job:
    line: int
    custom_id: str | None
    url: str = ""
    body: ChatCompletionRequest | CompletionRequest | None = None
    prompt: tuple[str | None, list[int]] | None = None
    params: SamplingParams | None = None
    result: dict | None = None  # the finished output line
    syntax: CallSyntax | None = None  # tool-call syntax the answer is parsed with (chat, tools)
    id_prefix: str = "batch_req_"

    @property
    def line_id(self) -> str:
        return f"{self.id_prefix}{self.line}"


@dataclass(slots=True)
class BatchFileSummary:
    lines: int = 0
    skipped_done: int = 0  # already in the output (resume)
    succeeded: int = 0
    failed: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    stats: object | None = None
    errors: list[str] = field(default_factory=list)


def run_batch_file(llm, input_path: str | Path, output_path: str | Path, resume: bool = False,
                   show_progress: bool = True) -> BatchFileSummary:
    """Run a whole batch file through ``llm`` (a tierserve LLM)."""
    started = time.perf_counter()
    lines = jsonl_lines(Path(input_path).read_bytes())
    summary = BatchFileSummary(lines=len(lines))
    done = _existing_output(Path(output_path), lines, resume)
    summary.skipped_done = done
    jobs = [parse_line(i, text, llm.tokenizer, llm.core) for i, text in enumerate(lines)
            if i >= done]
    runnable = [job for job in jobs if job.result is None]
    summary.failed = len(jobs) - len(runnable)
    with open(output_path, "a", encoding="utf-8") as out, tqdm(
            total=len(lines), initial=done, unit="req", desc="batch",
            disable=not show_progress) as bar:
        writer = _OrderedWriter(out, jobs, bar)
        writer.flush_ready()
        started_run = time.perf_counter()

        def finished(index: int, output: RequestOutput) -> None:
            job = runnable[index]
            if output.error:
                job.result = failed_response(job, output.error, None, status=500)
                summary.failed += 1
                summary.errors.append(f"line {job.line + 1}: {output.error}")
            else:
                job.result = success_line(job, output, llm.config.model.model)
                summary.succeeded += 1
            summary.output_tokens += sum(len(c.token_ids) for c in output.outputs)
            elapsed = time.perf_counter() - started_run
            bar.set_postfix_str(f"{summary.output_tokens} tok, "
                                f"{summary.output_tokens / max(elapsed, 1e-9):.1f} tok/s",
                                refresh=False)
            writer.flush_ready()

        if runnable:
            runner = BatchRunner(llm.core, OutputProcessor(llm.tokenizer))
            summary.stats = runner.run([job.prompt for job in runnable],
                                       [job.params for job in runnable], on_output=finished,
                                       id_prefix=f"file{os.getpid()}")
        writer.flush_ready()
    summary.wall_s = time.perf_counter() - started
    return summary


class _OrderedWriter:
    """Writes finished lines in input order, flushing each, as soon as their turn comes."""

    def __init__(self, out, jobs: list[Job], bar) -> None:
        self.out, self.jobs, self.bar, self.next = out, jobs, bar, 0

    def flush_ready(self) -> None:
        while self.next < len(self.jobs) and self.jobs[self.next].result is not None:
            self.out.write(json.dumps(self.jobs[self.next].result, ensure_ascii=False) + "\n")
            self.out.flush()
            self.next += 1
            self.bar.update(1)


def jsonl_lines(data: bytes) -> list[str]:
    """A JSONL file's lines: split on newlines only (str.splitlines also splits on U+2028 and
    other characters a JSON string may hold unescaped), a trailing CR dropped."""
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _existing_output(path: Path, lines: list[str], resume: bool) -> int:
    """Lines already done. Without ``resume`` an existing non-empty output is an error."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    if not resume:
        raise FileExistsError(f"{path} already has results; pass --resume to continue it, or "
                              "remove it to start over")
    kept: list[str] = []
    for text in path.read_text(encoding="utf-8").split("\n"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            break  # a torn last line from an interrupted run
        if len(kept) >= len(lines) or record.get("custom_id") != _custom_id(lines[len(kept)]):
            raise ValueError(f"{path} does not match the input at line {len(kept) + 1}; it is "
                             "not an output of this input file")
        kept.append(text)
    path.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
    return len(kept)


def _custom_id(text: str) -> str | None:
    try:
        value = json.loads(text).get("custom_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def parse_line(line: int, text: str, tokenizer, core, endpoint: str | None = None,
               model_name: str | None = None) -> Job:
    """A job ready to run, or one whose ``result`` is already its error line.

    ``endpoint``: the one url every line must name (the HTTP Batch API's batch endpoint);
    ``model_name``: the served model, which a line's ``model`` must equal when given."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(line, None, result=_error_line(line, None, "invalid_json_line",
                                                   f"line {line + 1} is not JSON: {exc}"))
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return Job(line, None, result=_error_line(
            line, None, "missing_custom_id", f"line {line + 1} needs a string custom_id"))
    job = Job(line, record["custom_id"], url=record.get("url", ""))
    urls = (endpoint,) if endpoint else tuple(ROUTES)
    if record.get("method", "POST") != "POST" or job.url not in urls:
        job.result = _error_line(line, job.custom_id, "invalid_url",
                                 f"url must be {' or '.join(urls)} with method POST")
        return job
    try:
        job.body = ROUTES[job.url].model_validate(record.get("body") or {})
        if model_name and job.body.model and job.body.model != model_name:
            job.result = failed_response(job, f"The model '{job.body.model}' does not exist; "
                                         f"this server serves '{model_name}'", "model",
                                         status=404)
            return job
        if job.body.stream:
            raise InvalidRequestError("a batch line cannot stream; drop stream", "stream")
        job.prompt, job.params = _engine_input(job, tokenizer)
        core.make_request("check", job.prompt[1], job.params)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        job.result = failed_response(job, f"{loc}: {first['msg']}", str(first["loc"][0]))
    except (InvalidRequestError, ValueError) as exc:
        job.result = failed_response(job, str(exc), getattr(exc, "param", None))
    return job


def _engine_input(job: Job, tokenizer) -> tuple[tuple[str | None, list[int]], SamplingParams]:
    body = job.body
    if isinstance(body, ChatCompletionRequest):
        messages, template_args = convert.chat_inputs(body, tokenizer)
        job.syntax = convert.tool_syntax(body, tokenizer)
        return (tokenizer.chat_prompt(messages, **template_args),
                convert.chat_params(body, job.syntax))
    prompts = convert.encode_prompts(tokenizer, body.prompt)
    if len(prompts) != 1:
        raise InvalidRequestError("a batch line takes one prompt; split the list into lines",
                                  "prompt")
    return prompts[0], convert.completion_params(body)


def success_line(job: Job, output: RequestOutput, model_name: str) -> dict:
    body = job.body
    model = body.model or model_name
    counts = protocol.usage(*protocol.count_tokens([output]))
    if isinstance(body, ChatCompletionRequest):
        choices = [protocol.chat_choice(c.index, c, body.top_logprobs or 0, job.syntax,
                                        body.parallel_tool_calls) for c in output.outputs]
        response = protocol.envelope(f"chatcmpl-batch-{job.line}", "chat.completion", model,
                                     choices, usage_=counts)
    else:
        prefix = (job.prompt[0] or "") if body.echo else ""
        choices = [protocol.completion_choice(c.index, c, body.logprobs or 0, prefix)
                   for c in output.outputs]
        response = protocol.envelope(f"cmpl-batch-{job.line}", "text_completion", model, choices,
                                     usage_=counts)
    return {"id": job.line_id, "custom_id": job.custom_id,
            "response": {"status_code": 200, "request_id": response["id"], "body": response},
            "error": None}


def failed_response(job: Job, message: str, param: str | None, status: int = 400) -> dict:
    """A line whose request was refused (400, 404) or failed inside the engine (500, as the
    server's own answer would be)."""
    body = (error_body(message, "server_error") if status >= 500 else
            error_body(message, param=param, code="model_not_found" if status == 404 else None))
    return {"id": job.line_id, "custom_id": job.custom_id,
            "response": {"status_code": status, "request_id": f"batch-{job.line}",
                         "body": body},
            "error": None}


def _error_line(line: int, custom_id: str | None, code: str, message: str) -> dict:
    return {"id": f"batch_req_{line}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
