"""`tierserve bench batch-api`: what a batch does to online latency, through a real server.

Each scenario starts its own `tierserve serve` (same flags, a fresh data directory) and sends
probes: online streamed completions, one after another, timing their TTFT and end-to-end
latency on the client. Beside a batch, only the probes sent while it runs count (up to
``--probes``; at least one). The scenarios:

- ``online-alone``: the probes on an idle server (the floor);
- ``batch-api``: the probes while a batch runs through ``/v1/batches`` (background priority,
  ``--batch-share`` of the slack; several shares: one run each, ``batch-api@SHARE``);
- ``online-flood``: the probes while the same batch's requests are sent as ordinary online
  requests, all at once (what a user without a Batch API does);
- ``batch-alone``: the batch through ``/v1/batches`` with no probes (its own speed).

The batch is many-groups: ``--num-prefixes`` shared prefixes of ``--prefix-len`` tokens, each
followed by ``--question-len`` tokens of its own, in random order; prompts are token ids, greedy
with ``ignore_eos``, so every scenario computes the same tokens.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from tierserve.bench.remote import ServerClient

SCENARIOS = ("online-alone", "batch-api", "online-flood", "batch-alone")
COLUMNS = ("probes", "probe_ttft_p50_s", "probe_ttft_max_s", "probe_e2e_p50_s",
           "probe_e2e_max_s", "batch_wall_s", "batch_output_tokens_per_s", "preemptions")


def add_batch_api_subcommand(sub) -> None:
    parser = sub.add_parser(
        "batch-api", help="online latency beside a batch: Batch API vs the same requests online",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="as for tierserve serve")
    parser.add_argument("--dtype", default="auto", help="as for tierserve serve")
    parser.add_argument("--serve-args", default="",
                        help='more flags for each tierserve serve, e.g. "--max-num-seqs 64"')
    parser.add_argument("--batch-share", default="0.5",
                        help="the server's --batch-share; several (comma-separated) run the "
                        "Batch API scenarios once each (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS))
    parser.add_argument("--num-requests", type=int, default=64, help="batch requests")
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64, help="batch output tokens each")
    parser.add_argument("--probes", type=int, default=8, help="online probe requests")
    parser.add_argument("--probe-prompt-len", type=int, default=64)
    parser.add_argument("--probe-output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write {machine, config, results} here")
    parser.add_argument("--plot", default=None, help="bars of probe latency and batch speed")
    parser.set_defaults(func=cmd_batch_api)


def cmd_batch_api(args) -> int:
    from tierserve.bench import cli
    scenarios = cli._names(args.scenarios)
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown --scenarios {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(SCENARIOS)}")
    shares = [float(x) for x in cli._names(args.batch_share)]
    results = {}
    for name in scenarios:
        # Without online traffic a batch takes 0.95 whatever the share: batch-alone runs once.
        for share in (shares if name == "batch-api" else shares[:1]):
            label = f"{name}@{share:g}" if name == "batch-api" and len(shares) > 1 else name
            results[label] = run_scenario(name, args, share)
    cli._finish(args, {key: getattr(args, key) for key in (
        "model", "serve_args", "batch_share", "num_requests", "num_prefixes", "prefix_len",
        "question_len", "output_len", "probes", "probe_prompt_len", "probe_output_len",
        "seed")}, results, COLUMNS)
    if args.plot:
        _plot(results, args.plot, f"online probes beside a batch ({args.model})")
        print(f"wrote {args.plot}")
    return 0


def _plot(results: dict, path: str, title: str) -> None:
    """Probe TTFT (median and worst, log scale: a probe stuck behind a flood waits seconds),
    probe end-to-end median, batch output tokens/s."""
    from tierserve.bench.report import _pyplot, _save, _suptitle

    plt = _pyplot()
    names = list(results)
    figure, axes = plt.subplots(1, 3, figsize=(max(12.0, 2.6 * len(names)), 4.2))
    x = range(len(names))
    for offset, key, label in ((-0.2, "probe_ttft_p50_s", "median"),
                               (0.2, "probe_ttft_max_s", "worst")):
        values = [results[n].get(key) or 0.0 for n in names]
        bars = axes[0].bar([i + offset for i in x], values, width=0.4, label=label)
        axes[0].bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values],
                          fontsize="x-small")
    axes[0].set_yscale("log")
    axes[0].set_title("probe TTFT (s, log)", fontsize="medium")
    axes[0].legend(fontsize="small")
    for axis, key, label in ((axes[1], "probe_e2e_p50_s", "probe end-to-end median (s)"),
                             (axes[2], "batch_output_tokens_per_s", "batch output tok/s")):
        values = [results[n].get(key) or 0.0 for n in names]
        bars = axis.bar(list(x), values, color=[f"C{i}" for i in x])
        axis.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values],
                       fontsize="x-small")
        axis.set_title(label, fontsize="medium")
    for axis in axes:
        axis.set_xticks(list(x))
        axis.set_xticklabels(names, rotation=25, ha="right", fontsize="small")
    _suptitle(figure, title)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def _workload(args, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(args.seed)
    ids = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
    prefixes = [ids(args.prefix_len) for _ in range(args.num_prefixes)]
    batch = [prefixes[rng.randrange(args.num_prefixes)] + ids(args.question_len)
             for _ in range(args.num_requests)]
    probes = [ids(args.probe_prompt_len) for _ in range(args.probes)]
    return batch, probes


class _Server:
    def __init__(self, args, data_dir: str, share: float) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "tierserve.cli", "serve", "--model", args.model,
               "--dtype", args.dtype, "--port", str(self.port), "--data-dir", data_dir,
               "--batch-share", str(share), *shlex.split(args.serve_args)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"tierserve serve exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("tierserve serve did not become healthy in 300 s")
            time.sleep(0.3)

    def metric(self, name: str) -> float:
        total = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name):
                total += float(line.rpartition(" ")[2])
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _body(model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def run_scenario(name: str, args, share: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-data-") as data_dir:
        print(f"[{name}, --batch-share {share:g}] starting tierserve serve ...", flush=True)
        server = _Server(args, data_dir, share)
        try:
            return _run(name, args, server)
        finally:
            server.stop()


def _run(name: str, args, server: _Server) -> dict:
    client = ServerClient(server.url)
    model, _ = client.served_model()
    vocab = httpx.get(server.url + "/tokenizer_info", timeout=10).json()["vocab_size"]
    batch, probes = _workload(args, vocab)
    client.stream_completion(_body(model, probes[0][:8], 2, True), lambda t: None)  # warm up
    started = time.monotonic()
    background = None
    if name in ("batch-api", "batch-alone"):
        background = _BatchJob(server.url, model, batch, args.output_len)
    elif name == "online-flood":
        background = _Flood(client, model, batch, args.output_len)
    if background is not None:
        background.wait_running(server)
    result = {}
    if name != "batch-alone":
        # Beside a batch, only probes sent while it runs count: sent one after another until
        # --probes are done or the batch ends.
        ttft, e2e = [], []
        for prompt in probes:
            if background is not None and ttft and background.done():
                break
            sent, first = time.monotonic(), []
            client.stream_completion(_body(model, prompt, args.probe_output_len, True),
                                     lambda t, first=first: first or first.append(t))
            ttft.append(first[0] - sent)
            e2e.append(time.monotonic() - sent)
        result.update(probes=len(ttft), probe_ttft_p50_s=round(statistics.median(ttft), 3),
                      probe_ttft_max_s=round(max(ttft), 3),
                      probe_e2e_p50_s=round(statistics.median(e2e), 3),
                      probe_e2e_max_s=round(max(e2e), 3))
    if background is not None:
        tokens = background.join()
        wall = time.monotonic() - started
        result.update(batch_wall_s=round(wall, 2), batch_output_tokens=tokens,
                      batch_output_tokens_per_s=round(tokens / wall, 2))
    result["preemptions"] = int(server.metric("tierserve_preemptions_total"))
    print(f"[{name}] {result}", flush=True)
    return result


class _BatchJob:
    """The batch through the official client's calls (files.create, batches.create)."""

    def __init__(self, url: str, model: str, prompts: list[list[int]], output_len: int) -> None:
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                  "body": _body(model, prompt, output_len, False)}
                 for i, prompt in enumerate(prompts)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = self.client.files.create(file=("batch.jsonl", io.BytesIO(data)),
                                            purpose="batch")
        self.batch = self.client.batches.create(input_file_id=uploaded.id,
                                                endpoint="/v1/completions",
                                                completion_window="24h")
        self.total = len(prompts)

    def wait_running(self, server: _Server) -> None:
        while server.metric("tierserve_num_requests_running") == 0 and not self.done():
            time.sleep(0.05)

    def done(self) -> bool:
        self.batch = self.client.batches.retrieve(self.batch.id)
        return self.batch.status in ("completed", "failed", "cancelled", "expired")

    def join(self) -> int:
        while not self.done():
            time.sleep(0.1)
        if self.batch.status != "completed" or self.batch.request_counts.completed != self.total:
            raise RuntimeError(f"the batch ended {self.batch.status}: {self.batch}")
        text = self.client.files.content(self.batch.output_file_id).text
        return sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                   for line in text.splitlines())


class _Flood:
    """The same requests as ordinary online requests, all sent at once, one thread each."""

    def __init__(self, client: ServerClient, model: str, prompts: list[list[int]],
                 output_len: int) -> None:
        self.tokens, self.errors = [], []

        def send(prompt):
            try:
                out = client.stream_completion(_body(model, prompt, output_len, True),
                                               lambda t: None)
                self.tokens.append(out["usage"]["completion_tokens"])
            except Exception as exc:  # noqa: BLE001 - reported after the run
                self.errors.append(exc)

        self.threads = [threading.Thread(target=send, args=(p,), daemon=True) for p in prompts]
        for thread in self.threads:
            thread.start()

    def wait_running(self, server: _Server) -> None:
        while server.metric("tierserve_num_requests_running") == 0 and not self.done():
            time.sleep(0.05)

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def join(self) -> int:
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} flood requests failed: {self.errors[0]}")
        return sum(self.tokens)
