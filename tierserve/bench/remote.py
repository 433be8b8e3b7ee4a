"""Online benchmark against a running OpenAI-compatible server (``tierserve bench online --url``).

The same seeded workload and Poisson arrivals as the in-process run, sent as streamed
``/v1/completions`` requests whose prompts are token ids (so every server sees exactly the
workload's lengths) with greedy ``ignore_eos`` sampling. tierserve's server takes both (tested);
vLLM, SGLang and llama.cpp's llama-server document both (not tested here). A server that ignores
``ignore_eos`` stops early: its output counts still come from ``usage``. Each request runs on its
own thread and its own connection.

Timing is the client's: TTFT runs from arrival (the scheduled send time, so a late send counts
against it, as a late client would) to the first streamed chunk with text; TBT is the gap between
consecutive chunks with text, so a server that sends several tokens in one chunk shows one longer
gap. Output token counts come from the final ``usage`` chunk. Preemptions and the server's own
mean TTFT are read from its Prometheus ``/metrics`` (``*preemptions_total``,
``*time_to_first_token_seconds``) before and after, where it has them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tierserve.bench.harness import RunRecord, fit_to_context
from tierserve.bench.workloads import BenchRequest
from tierserve.metrics import MetricsCollector

STREAM_TIMEOUT_S = 600.0  # one read on the socket; a stalled server fails the request
# Read from the server's /metrics before and after a run, to report its own view beside ours.
SERVER_COUNTERS = ("preemptions_total", "time_to_first_token_seconds_sum",
                   "time_to_first_token_seconds_count")


class RemoteError(RuntimeError):
    """The server could not be reached or answered with an error."""


@dataclass(slots=True)
class Target:
    """A named server to benchmark: ``name`` labels its row (e.g. the policy it runs)."""

    name: str
    url: str  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {self.url!r} is not an http(s) URL; give e.g. "
                             "http://127.0.0.1:8000 or NAME=http://127.0.0.1:8000")


def parse_targets(text: str) -> list[Target]:
    """``URL`` or ``NAME=URL``, comma-separated. An unnamed single server is called "server",
    several unnamed ones by host:port."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--url needs at least one URL")
    targets = []
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or "://" in name:
            name, url = "", item
        if not name:
            name = "server" if len(items) == 1 else host_port(url)
        targets.append(Target(name.strip(), url.strip()))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"--url names must differ, got {names}")
    return targets


def host_port(url: str) -> str:
    """``host:port`` of ``url``, without any user:password in it."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


class ServerClient:
    """A minimal HTTP/1.1 client for one OpenAI-compatible server (standard library only)."""

    def __init__(self, url: str, api_key: str | None = None,
                 timeout: float = STREAM_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout = api_key, timeout
        self.url = url

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def get(self, path: str) -> str:
        """GET ``path`` (below the base URL); the body as text."""
        connection = self._connect()
        try:
            connection.request("GET", self.prefix + path, headers=self._headers())
            response = connection.getresponse()
            body = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteError(f"cannot reach {self.url}{path}: {exc!r}; is the server running "
                              "(tierserve serve ...)?") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise RemoteError(f"GET {self.url}{path}: HTTP {response.status}: {body[:300]}")
        return body

    def served_model(self) -> tuple[str, int | None]:
        """The first model in ``/v1/models`` and its ``max_model_len`` where the server says."""
        data = json.loads(self.get("/v1/models")).get("data") or []
        if not data:
            raise RemoteError(f"{self.url}/v1/models lists no model")
        return data[0]["id"], data[0].get("max_model_len")

    def server_counters(self) -> dict[str, float]:
        """Sums of the server's Prometheus series whose names end with one of
        ``SERVER_COUNTERS`` (tierserve's ``tierserve_*`` and vLLM's ``vllm:*`` alike); empty
        when it has no ``/metrics``."""
        try:
            text = self.get("/metrics")
        except RemoteError:
            return {}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            name = name.split("{")[0]
            suffix = next((s for s in SERVER_COUNTERS if name.endswith(s)), None)
            if line.startswith("#") or suffix is None:
                continue
            totals[suffix] = totals.get(suffix, 0.0) + float(value)
        return totals

    def stream_completion(self, body: dict, on_text) -> dict:
        """POST a streamed completion; ``on_text(monotonic_time)`` for each chunk with text.
        Returns ``{"usage": ..., "finish_reason": ...}`` from the last chunks."""
        connection = self._connect()
        usage, reason = None, None
        try:
            connection.request("POST", self.prefix + "/v1/completions",
                               body=json.dumps(body).encode(), headers=self._headers())
            response = connection.getresponse()
            if response.status != 200:
                raise RemoteError(f"HTTP {response.status}: "
                                  f"{response.read().decode('utf-8', 'replace')[:300]}")
            while line := response.readline():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise RemoteError(f"not a completion chunk: {data[:200]!r}")
                if "error" in chunk:
                    raise RemoteError(f"server error mid-stream: {chunk['error']}")
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    on_text(time.monotonic())
                for choice in chunk.get("choices") or []:
                    reason = choice.get("finish_reason") or reason
                usage = chunk.get("usage") or usage
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut mid-chunk
            raise RemoteError(f"connection to {self.url} failed: {exc!r}") from exc
        finally:
            connection.close()
        if reason is None:
            raise RemoteError("the stream ended before the request finished (no finish_reason)")
        return {"usage": usage, "finish_reason": reason}


def completion_body(model: str, request: BenchRequest) -> dict:
    """The streamed, greedy, ``ignore_eos`` completion request for one workload request."""
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if request.client_id is not None:
        body["user"] = request.client_id  # tierserve's fair policy keys on it
    return body


def drive_remote(client: ServerClient, requests: list[BenchRequest], model: str,
                 max_model_len: int | None, progress: str | None = None) -> RunRecord:
    """Send ``requests`` to ``model`` at their arrival offsets (None: at once), each on its own
    thread, and wait for all; the timelines are the client's (see the module docstring)."""
    from tqdm.auto import tqdm

    clipped = 0
    if max_model_len:
        requests, clipped = fit_to_context(requests, int(max_model_len))
    metrics = MetricsCollector()
    errors: list[str] = []
    lock = threading.Lock()
    counters0 = client.server_counters()
    bar = tqdm(total=len(requests), desc=progress or "bench", unit="req",
               disable=progress is None, leave=False)

    def send(request_id: str, request: BenchRequest, arrival: float) -> None:
        metrics.on_arrival(request_id, request.client_id or request_id,
                           len(request.prompt_token_ids), now=arrival)
        try:
            done = client.stream_completion(completion_body(model, request),
                                            lambda at: metrics.on_tokens(request_id, 1, now=at))
            finished = time.monotonic()
            timeline = metrics.get(request_id)
            counted = (done["usage"] or {}).get("completion_tokens")
            if timeline is not None and counted is not None:
                timeline.num_output_tokens = counted  # chunks may carry several tokens
            metrics.on_finished(request_id, done["finish_reason"], now=finished)
        except Exception as exc:  # noqa: BLE001 - any failure is that request's, and counted
            with lock:
                errors.append(f"{request_id}: {exc}")
        finally:
            bar.update(1)

    threads = []
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s or 0.0)
    start = time.monotonic()
    with bar:
        for index in order:
            arrival = start + (requests[index].arrival_s or 0.0)
            time.sleep(max(0.0, arrival - time.monotonic()))
            thread = threading.Thread(target=send, args=(f"r{index}", requests[index], arrival),
                                      name=f"bench-r{index}", daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    counters1 = client.server_counters()
    served = {key: counters1[key] - counters0[key] for key in counters1 if key in counters0}
    timelines = metrics.finished_timelines()
    end = max((t.finished_time for t in timelines), default=start)
    first = min((t.arrival_time for t in timelines), default=start)
    preempted = served.get("preemptions_total")
    ttft_count = served.get("time_to_first_token_seconds_count")
    summary = metrics.summary()
    summary["prefix_cache_hit_rate"] = None  # the server's, which the client does not see
    return RunRecord(timelines=timelines, outputs={}, summary=summary, start=start,
                     wall_s=end - first, num_steps=None,
                     preemptions=None if preempted is None else int(preempted),
                     swap_preemptions=None, clipped=clipped, errors=errors,
                     server_ttft_mean_s=(served["time_to_first_token_seconds_sum"] / ttft_count
                                         if ttft_count else None))
