"""`tierserve bench online --url`: the workload sent to a real tierserve server over HTTP."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from tests.server.conftest import ServerProcess, free_port, wait_until_idle
from tierserve.bench.cli import main
from tierserve.bench.remote import RemoteError, ServerClient, Target, parse_targets


# -- pure parts --------------------------------------------------------------------------------
def test_targets_are_named_server_host_port_or_as_given():
    assert parse_targets("http://127.0.0.1:8000") == [Target("server", "http://127.0.0.1:8000")]
    assert [t.name for t in parse_targets("http://a:1,http://u:pw@b/v1")] == ["a:1", "b"]
    named = parse_targets("sarathi=http://a:1, fcfs=https://b:2")
    assert named == [Target("sarathi", "http://a:1"), Target("fcfs", "https://b:2")]


@pytest.mark.parametrize("text, message", [("", "at least one"), ("ftp://a:1", "http"),
                                           ("x=http://a:1,x=http://b:2", "must differ")])
def test_bad_targets_say_what_to_give(text, message):
    with pytest.raises(ValueError, match=message):
        parse_targets(text)


def test_a_base_url_with_or_without_v1_reaches_the_same_paths():
    assert ServerClient("http://h:1/v1/").prefix == ServerClient("http://h:1").prefix == ""
    assert ServerClient("https://h/proxy/v1").prefix == "/proxy"


class _BrokenServer(http.server.BaseHTTPRequestHandler):
    """Lists a model, then cuts every completion stream off mid-body."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = json.dumps({"data": [{"id": "broken"}]}).encode()
        status = 200 if self.path == "/v1/models" else 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "100000")  # promises more than it sends
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_stream_cut_off_mid_body_counts_as_a_failed_request(tiny_llama_dir, tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BrokenServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, document = _bench(tmp_path, "--url", f"http://127.0.0.1:{server.server_port}",
                                "--model", str(tiny_llama_dir), "--workload", "random",
                                "--input-len", "8", "--output-len", "4", "--request-rate", "inf",
                                "--num-requests", "3")
    finally:
        server.shutdown()
    row = document["results"]["server"]
    assert code == 1 and row["failed_requests"] == 3 and row["num_finished"] == 0
    out = capsys.readouterr().out
    assert "the stream ended before the request finished" in out
    assert "no request finished" in out and not (tmp_path / "cdf.png").exists()
    assert row["preemptions"] is None  # no /metrics there: not reported, not zero


# -- against a real server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fair_server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, "--scheduling-policy", "fair")
    yield proc
    proc.stop()


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "online.json"
    code = main(["online", *args, "--json", str(out), "--plot", str(tmp_path / "cdf.png"),
                 "--no-progress"])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_online_over_http_counts_what_the_server_generated(fair_server, tiny_llama_dir,
                                                           tmp_path):
    before = wait_until_idle(fair_server)["tierserve_generation_tokens_total"]
    code, document = _bench(tmp_path, "--url", f"fair={fair_server.url}/v1", "--model",
                            str(tiny_llama_dir), "--workload", "random", "--input-len", "24",
                            "--output-len", "9", "--request-rate", "40", "--num-requests", "8")
    assert code == 0
    (row,) = document["results"].values()
    after = wait_until_idle(fair_server)["tierserve_generation_tokens_total"]
    assert row["num_finished"] == 8 and row["failed_requests"] == 0
    assert row["output_tokens"] == 8 * 9 == after - before  # ignore_eos: exactly max_tokens
    assert row["ttft_p99_s"] >= row["ttft_p50_s"] > 0 and row["e2e_p99_s"] >= row["ttft_p99_s"]
    assert row["tbt_p50_s"] > 0 and row["throughput_tokens_per_s"] > 0
    assert row["preemptions"] == 0  # read from the server's /metrics: it reports them
    # the server stamps arrival after the request reached it and the token before it left
    assert 0 < row["server_ttft_mean_s"] <= row["ttft_mean_s"]
    assert document["config"]["servers"]["fair"]["model"] == "tiny"
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_several_servers_run_the_same_workload_one_after_the_other(fair_server, tiny_llama_dir,
                                                                   tmp_path):
    url = fair_server.url
    code, document = _bench(tmp_path, "--url", f"first={url},second={url}", "--model",
                            str(tiny_llama_dir), "--scale", "0.05", "--request-rate", "inf",
                            "--num-requests", "5")
    assert code == 0 and list(document["results"]) == ["first", "second"]
    first, second = document["results"].values()
    assert first["output_tokens"] == second["output_tokens"] > 0
    assert first["num_finished"] == second["num_finished"] == 5


def test_an_unreachable_server_is_a_clear_error(tiny_llama_dir, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["online", "--url", url, "--model", str(tiny_llama_dir), "--num-requests", "1",
                 "--no-progress"]) == 2
    assert f"cannot reach {url}/v1/models" in capsys.readouterr().err
    with pytest.raises(RemoteError, match="is the server running"):
        ServerClient(url).served_model()


def test_policies_with_url_name_the_way_to_compare_servers(tiny_llama_dir, capsys):
    assert main(["online", "--url", "http://127.0.0.1:1", "--policies", "fair",
                 "--model", str(tiny_llama_dir)]) == 2
    assert "start one server per policy" in capsys.readouterr().err


def test_refused_requests_are_counted_and_fail_the_command(tiny_llama_dir, tmp_path, capsys):
    server = ServerProcess(tiny_llama_dir, "--api-key", "secret", "--max-num-seqs", "1",
                           "--max-waiting-requests", "1")
    try:  # six at once into one running slot and one waiting place: some get HTTP 503
        code, document = _bench(tmp_path, "--url", server.url, "--api-key", "secret",
                                "--model", str(tiny_llama_dir), "--workload", "random",
                                "--input-len", "8", "--output-len", "30", "--request-rate",
                                "inf", "--num-requests", "6")
        row = document["results"]["server"]
        assert code == 1 and row["failed_requests"] >= 1 and row["num_finished"] >= 1
        assert row["failed_requests"] + row["num_finished"] == 6
        assert "HTTP 503" in capsys.readouterr().out
        assert main(["online", "--url", server.url, "--api-key", "wrong", "--model",
                     str(tiny_llama_dir), "--num-requests", "1", "--no-progress"]) == 2
        assert "HTTP 401" in capsys.readouterr().err
        assert wait_until_idle(server)["tierserve_kv_blocks_in_use"] == 0
    finally:
        server.stop()
