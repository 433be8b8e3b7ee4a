"""The ``tierintel`` command: help, ingest, status, ask, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

from tierintel.cli import main

from .conftest import DEAD, MIRROR


def test_help_explains_the_commands():
    out = subprocess.run([sys.executable, "-m", "tierintel.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("ingest", "ask", "status", "web", "eval", "--base-url", "make serve"):
        assert word in out
    ask = subprocess.run([sys.executable, "-m", "tierintel.cli", "ask", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--no-structured" in ask and "--max-prompt-chars" in ask


def test_ingest_status_and_ask(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert main(["ingest", "--data", data]) == 2
    assert "nothing to ingest" in capsys.readouterr().err
    assert main(["ingest", "--data", data, "--mirror", str(MIRROR)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["docs_indexed"] == 63 and summary["files_read"] == 8
    assert main(["ingest", "--data", data, "--mirror", str(MIRROR), "--reindex"]) == 0
    assert json.loads(capsys.readouterr().out)["docs_indexed"] == 63  # all again, nothing read
    assert main(["status", "--data", data, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["records"]["kev"] == 18 and status["as_of"] == "2026-11-29"
    assert main(["ask", "--data", data, "--base-url", DEAD, "--model", "m",
                 "What is CVE-2031-00001?"]) == 0
    assert "The index has no records for CVE-2031-00001" in capsys.readouterr().out
    assert main(["ask", "--data", data, "--base-url", DEAD, "What is CVE-2026-41021?"]) == 3
    assert "http://127.0.0.1:9/v1 is unreachable" in capsys.readouterr().err
    assert main(["ask", "--data", data, "--base-url", DEAD, "   "]) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_schema_error_exits_2_and_says_which_file(tmp_path, mirror_copy, capsys):
    kev = mirror_copy / "kev/known_exploited_vulnerabilities.json"
    kev.write_text(kev.read_text().replace('"catalogVersion"', '"catalog_version"'))
    assert main(["ingest", "--data", str(tmp_path / "d"), "--mirror", str(mirror_copy)]) == 2
    err = capsys.readouterr().err
    assert "known_exploited_vulnerabilities.json: not a CISA KEV catalog" in err


def test_a_failed_download_exits_1(tmp_path, capsys):
    assert main(["ingest", "--data", str(tmp_path / "d"), "--kev-url",
                 "http://127.0.0.1:9/known_exploited_vulnerabilities.json"]) == 1
    assert "skipped unreadable file http://127.0.0.1:9/" in capsys.readouterr().err
