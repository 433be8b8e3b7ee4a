"""A real tierserve server (uvicorn, in a subprocess) on a free loopback port, per test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if "--data-dir" not in extra:  # never the user's own (~/.local/share/tierserve)
            self._data_dir = tempfile.TemporaryDirectory(prefix="tierserve-test-data-")
            extra = (*extra, "--data-dir", self._data_dir.name)
        cmd = [sys.executable, "-m", "tierserve.cli", "serve", "--model", str(model_dir),
               "--served-model-name", "tiny", "--port", str(self.port),
               "--kv-cache-memory", "16MiB", "--swap-space", "16MiB", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, **(env or {})))
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not become healthy in 120 s")

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir)
    yield proc
    proc.stop()


def wait_until_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once nothing runs and no KV block is held (or the last reading at timeout)."""
    deadline = time.time() + timeout
    while True:
        values = server.metrics()
        idle = (values.get("tierserve_kv_blocks_in_use") == 0
                and values.get("tierserve_num_requests_running") == 0
                and values.get("tierserve_num_requests_waiting") == 0)
        if idle or time.time() > deadline:
            return values
        time.sleep(0.1)


class InProcessServer:
    """The real app under uvicorn on a loopback port, in a thread of the test process: tests
    can reach into its engine (inject a fault) and still talk to it over HTTP."""

    def __init__(self, model_dir, **settings) -> None:
        import threading

        import uvicorn

        from tierserve.config import EngineConfig
        from tierserve.engine.async_engine import AsyncEngine
        from tierserve.engine.loading import build_engine
        from tierserve.server.api import ServerSettings, build_app

        self.engine = AsyncEngine(build_engine(EngineConfig.from_kwargs(
            model=str(model_dir), num_blocks=128, max_model_len=512)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = build_app(self.engine, ServerSettings(model_name="tiny", **settings))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
