"""``tierintel bench`` at a small scale: every generated CVE is indexed, a re-run changes nothing,
and the retrieval timings come back."""

from __future__ import annotations

from tierintel.bench import run

from .conftest import HashEmbedder


def test_bench_ingests_everything_once_and_times_retrieval():
    result = run(250, queries=20, embedder=HashEmbedder())
    assert result["first"]["docs_indexed"] == 250 + 21  # the CVEs and the CWE excerpt
    assert result["first"]["added"] >= 250 * 2  # NVD records and their EPSS scores
    assert result["rerun"]["docs_indexed"] == 0 and result["rerun"]["files_unchanged"] == 4
    assert result["retrieval"]["queries"] == 20 and result["retrieval"]["p50_ms"] > 0
