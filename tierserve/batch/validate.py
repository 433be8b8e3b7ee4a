"""The Batch API's input format check: the faults in a file's lines that fail a whole batch,
as OpenAI reports them (``errors.data``). No torch."""

from __future__ import annotations

import json


def format_faults(lines: list[tuple[int, str]], endpoint: str, limit: int = 100) -> list[dict]:
    """The faults in a batch file's (line number, text) lines that fail the whole batch, as
    OpenAI's ``errors.data``: not JSON, no or a repeated custom_id, method not POST, url not the
    batch's endpoint, body not an object (the first ``limit`` of them)."""
    errors, seen = [], set()
    for number, text in lines:
        def fault(code, message, param=None, number=number):
            errors.append({"code": code, "message": message, "param": param,
                           "line": number})
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            fault("invalid_json_line", f"line {number} is not JSON: {exc}")
            continue
        if not isinstance(record, dict):
            fault("invalid_request", f"line {number} is not a JSON object")
            continue
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            fault("missing_required_parameter", f"line {number} needs a string custom_id",
                  "custom_id")
        elif custom_id in seen:
            fault("duplicate_custom_id", f"line {number}: custom_id {custom_id!r} is used "
                  "by an earlier line; each must be unique", "custom_id")
        else:
            seen.add(custom_id)
        if record.get("method") != "POST":
            fault("invalid_method", f"line {number}: method must be POST", "method")
        if record.get("url") != endpoint:
            fault("mismatched_endpoint", f"line {number}: url {record.get('url')!r} is not "
                  f"the batch's endpoint {endpoint}", "url")
        if not isinstance(record.get("body"), dict):
            fault("invalid_request", f"line {number}: body must be a JSON object", "body")
        if len(errors) >= limit:
            break  # enough to act on
    return errors
