"""`tierserve serve`: load the engine, start the HTTP server, shut down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model value)")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes "
                       "(default: $TIERSERVE_API_KEY, else no key)")
    group.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 503 with Retry-After once this many requests wait "
                       "(default: unlimited)")
    group.add_argument("--max-body-size", default="4MiB",
                       help="larger request bodies get 413 (default: %(default)s)")
    group.add_argument("--request-timeout", type=float, default=None,
                       help="seconds before a non-streamed request is aborted with 504 "
                       "(default: none)")
    group.add_argument("--unhealthy-after-step-failures", type=int, default=3, metavar="N",
                       help="/health answers 503 (restart me) once N engine steps in a row have "
                       "failed as a whole; a failure pinned on one request fails only that "
                       "request and never counts (default: %(default)s)")
    batch = parser.add_argument_group("batch API (/v1/files, /v1/batches)")
    batch.add_argument("--data-dir", default=None,
                       help="where uploaded files, batches and their results persist; a server "
                       "restarted with the same folder resumes unfinished batches (default: "
                       "$XDG_DATA_HOME/tierserve, else ~/.local/share/tierserve)")
    batch.add_argument("--batch-share", type=float, default=0.5,
                       help="while online requests are in flight, a batch's requests reserve at "
                       "most this share of the KV pool and of --max-num-seqs, and their prompt "
                       "chunks this share of each step's token budget; with none in flight, up "
                       "to 0.95 of the pool and the whole budget. Online requests always go "
                       "first and preempt batch requests (default: %(default)s)")
    batch.add_argument("--max-batch-file-size", default="200MiB",
                       help="larger uploads are refused (default: %(default)s)")
    batch.add_argument("--max-batch-requests", type=int, default=50_000,
                       help="a batch takes at most this many request lines (default: "
                       "%(default)s)")
    group.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds to let in-flight requests finish on SIGTERM/SIGINT before "
                       "aborting them (default: %(default)s)")


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from tierserve.batch.store import default_data_dir
    from tierserve.cli import engine_config_from_args
    from tierserve.config import parse_size
    from tierserve.engine.async_engine import AsyncEngine
    from tierserve.engine.loading import build_engine
    from tierserve.server.api import ServerSettings, build_app

    config = engine_config_from_args(args)
    config.scheduler.max_waiting_requests = args.max_waiting_requests
    config.scheduler.background_token_share = min(1.0, max(args.batch_share, 1e-6))
    engine = AsyncEngine(build_engine(config), args.max_waiting_requests)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or os.environ.get("TIERSERVE_API_KEY") or None,
        max_body_bytes=parse_size(args.max_body_size), request_timeout=args.request_timeout,
        max_consecutive_step_failures=args.unhealthy_after_step_failures,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        batch_share=args.batch_share, max_batch_file_bytes=parse_size(args.max_batch_file_size),
        max_batch_requests=args.max_batch_requests)
    app = build_app(engine, settings)
    print(_banner(args.host, args.port, settings), flush=True)
    server = _graceful_server_class()(uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=args.shutdown_timeout))
    server.run()  # returns after SIGTERM/SIGINT once in-flight work is done or aborted
    print("tierserve stopped", flush=True)
    return 0


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after shutting down, so the process dies of the
        signal; a clean stop should exit 0. First signal: stop accepting and let in-flight
        requests finish (up to --shutdown-timeout); second signal: stop now."""

        @contextlib.contextmanager
        def capture_signals(self):
            def handle(signum, frame):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


def _banner(host: str, port: int, settings) -> str:
    url = f"http://{host}:{port}"
    key = settings.api_key and "YOUR_KEY" or "none"
    auth = f' -H "Authorization: Bearer {key}"' if settings.api_key else ""
    return f"""tierserve is serving '{settings.model_name}' at {url}/v1  (docs: {url}/docs)

  curl {url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "{settings.model_name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='{settings.model_name}', \\
messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)"
"""
