"""Ingestion: the fixture mirror into the catalog and Milvus Lite; idempotent re-runs; incremental
updates that re-embed only what changed; bad files skipped with a count; schema changes reported;
the NVD API's paging over real HTTP."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tierintel.app import App, Settings
from tierintel.fetch import Sources
from tierintel.ingest import Ingestor

from .conftest import MIRROR, HashEmbedder


@pytest.fixture
def fresh(tmp_path):
    app = App(Settings(data=tmp_path / "data"))
    app._embedder = HashEmbedder()
    return app


def ingest(app: App, **sources):
    return Ingestor(app.catalog, app.index, app.embedder).run(Sources(**sources))


def test_fixture_mirror_is_indexed(intel):
    assert intel.catalog.counts() == {"cves": 42, "kev": 18, "epss": 42, "cwes": 21,
                                      "indexed": 63}
    assert intel.index.count() == {"cve": 42, "cwe": 21}
    doc = intel.index.get(["CVE-2026-41021"])["CVE-2026-41021"]
    assert doc["kev"] and doc["epss"] == 0.8102 and doc["kev_date_added"] == "2026-11-05"
    assert doc["priority"] == "patch now" and "northwind gateway" in doc["product_names"]
    assert intel.catalog.as_of() == "2026-11-29"


def test_rerun_is_idempotent(fresh):
    first = ingest(fresh, mirror=MIRROR)
    again = ingest(fresh, mirror=MIRROR)
    assert first.docs_indexed == first.docs_embedded == 63
    assert first.summary()["added"] == 42 + 18 + 42 + 21
    assert again.files_unchanged == 8 and again.docs_indexed == 0 and not again.changes
    assert fresh.index.count() == {"cve": 42, "cwe": 21}


def test_incremental_update_reembeds_only_changed_documents(fresh, mirror_copy):
    ingest(fresh, mirror=mirror_copy)
    # NVD: one CVE modified later, one new; EPSS: a newer file where one score moved.
    page = json.loads((mirror_copy / "nvd/api/page-1.json").read_text())
    changed = page["vulnerabilities"][0]["cve"]
    changed["lastModified"] = "2026-12-01T10:00:00.000"
    changed["descriptions"][0]["value"] += " Version 9.9 fixes it."
    added = json.loads(json.dumps(page["vulnerabilities"][1]))
    added["cve"]["id"] = "CVE-2026-49999"
    update = {**page, "vulnerabilities": [page["vulnerabilities"][0], added],
              "timestamp": "2026-12-01T12:00:00.000"}
    (mirror_copy / "nvd/api/update-2026-12-01.json").write_text(json.dumps(update))
    epss = gzip.decompress((mirror_copy / "epss/epss_scores-2026-11-29.csv.gz").read_bytes())
    epss = epss.decode().replace("2026-11-29", "2026-11-30").replace(
        "CVE-2026-41001,0.02130", "CVE-2026-41001,0.41000")
    (mirror_copy / "epss/epss_scores-2026-11-30.csv").write_text(epss)
    report = ingest(fresh, mirror=mirror_copy)
    by_kind = {c.kind: c for c in report.changes}
    assert (by_kind["nvd"].added, by_kind["nvd"].updated) == (1, 1)
    assert (by_kind["epss"].updated, by_kind["epss"].unchanged) == (1, 41)
    assert report.files_unchanged == 8 and report.docs_indexed == 3  # 2 NVD + 1 EPSS
    assert report.docs_embedded == 2  # the EPSS-only change kept its stored vector
    doc = fresh.index.get([changed["id"], "CVE-2026-41001"])
    assert doc[changed["id"]]["description"].endswith("Version 9.9 fixes it.")
    assert doc["CVE-2026-41001"]["epss"] == 0.41
    log = fresh.catalog.recent_changes()
    assert any(c["kind"] == "epss" and c["updated"] == 1 for c in log)


def test_older_epss_file_is_not_applied(fresh, mirror_copy):
    ingest(fresh, mirror=mirror_copy)
    old = gzip.decompress((mirror_copy / "epss/epss_scores-2026-11-29.csv.gz").read_bytes()).decode()
    old = old.replace("2026-11-29", "2026-10-01").replace("CVE-2026-41001,0.02130",
                                                          "CVE-2026-41001,0.99000")
    (mirror_copy / "epss/epss_scores-2026-10-01.csv").write_text(old)
    report = ingest(fresh, mirror=mirror_copy)
    assert report.docs_indexed == 0
    assert "older than the held scores" in report.changes[0].notes[0]
    assert fresh.catalog.epss("CVE-2026-41001").epss == 0.0213


def test_bad_files_and_lines_are_skipped_and_counted(fresh, mirror_copy):
    (mirror_copy / "nvd/api/truncated.json").write_text('{"format": "NVD_CVE", "vulnerab')
    (mirror_copy / "nvd/1.1/broken.json.gz").write_bytes(b"\x1f\x8b not gzip at all")
    epss = mirror_copy / "epss/epss_scores-2026-11-29.csv.gz"
    lines = gzip.decompress(epss.read_bytes()).decode().splitlines()
    lines[2] = "CVE-2014-0160,not-a-number,0.9"
    epss.write_bytes(gzip.compress("\n".join(lines).encode()))
    report = ingest(fresh, mirror=mirror_copy)
    assert len(report.files_failed) == 2 and report.records_skipped == 1
    assert {s for s, _ in report.files_failed} == {str(mirror_copy / "nvd/api/truncated.json"),
                                                   str(mirror_copy / "nvd/1.1/broken.json.gz")}
    counts = fresh.catalog.counts()
    assert counts["cves"] == 42 and counts["epss"] == 41  # nothing else lost


def test_schema_change_is_reported_and_the_rest_ingested(fresh, mirror_copy):
    kev = mirror_copy / "kev/known_exploited_vulnerabilities.json"
    doc = json.loads(kev.read_text())
    kev.write_text(json.dumps({k: v for k, v in doc.items() if k != "catalogVersion"}))
    report = ingest(fresh, mirror=mirror_copy)
    assert len(report.schema_errors) == 1 and "not a CISA KEV catalog" in report.schema_errors[0][1]
    assert fresh.catalog.counts()["kev"] == 0 and fresh.catalog.counts()["cves"] == 42
    assert any("schema error" in c["note"] for c in fresh.catalog.recent_changes())


class NvdApi(BaseHTTPRequestHandler):
    """NVD's CVE API 2.0 paging, over the fixture's vulnerabilities."""

    requests: list[dict] = []

    def do_GET(self):  # noqa: N802
        params = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
        NvdApi.requests.append(params)
        items = []
        for name in ("page-0.json", "page-1.json"):
            items += json.loads((MIRROR / "nvd/api" / name).read_text())["vulnerabilities"]
        start, size = int(params["startIndex"]), int(params["resultsPerPage"])
        body = json.dumps({"resultsPerPage": size, "startIndex": start, "totalResults": len(items),
                           "format": "NVD_CVE", "version": "2.0", "timestamp": "2026-11-29T06:00",
                           "vulnerabilities": items[start:start + size]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_nvd_api_paging_over_http(fresh):
    server = ThreadingHTTPServer(("127.0.0.1", 0), NvdApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    NvdApi.requests = []
    try:
        url = f"http://127.0.0.1:{server.server_port}/rest/json/cves/2.0"
        report = ingest(fresh, nvd_url=url, page_size=15, last_mod_start="2026-11-01T00:00:00.000",
                        last_mod_end="2026-11-30T00:00:00.000", page_pause_s=0.0)
    finally:
        server.shutdown()
    assert [r["startIndex"] for r in NvdApi.requests] == ["0", "15", "30"]
    assert all(r["lastModStartDate"] == "2026-11-01T00:00:00.000" for r in NvdApi.requests)
    assert sum(c.added for c in report.changes) == 37 and fresh.catalog.counts()["cves"] == 37


def test_reopened_index_answers_queries(intel):
    from tierintel.index import Index

    reopened = Index(intel.index_uri, intel.embedder.dim, intel.embedder.name)
    assert reopened.count() == {"cve": 42, "cwe": 21}
    assert [d["id"] for d in reopened.query('kev == true and array_contains(cwes, "CWE-89")')]


def test_an_older_catalog_gets_its_ranking_tables_filled(fresh):
    ingest(fresh, mirror=MIRROR)
    db = fresh.catalog.db
    for table in ("doc_facts", "doc_cwe", "doc_product"):
        db.execute(f"DELETE FROM {table}")
    db.execute("PRAGMA user_version = 0")
    db.commit()
    from tierintel.catalog import Catalog

    reopened = Catalog(fresh.catalog.path)
    assert [i for i, _ in reopened.kev_ids_for(["northwind gateway"])] == [
        "CVE-2026-41033", "CVE-2026-41021", "CVE-2026-38901"]
    assert reopened.top_epss_ids("CWE-79", "2026-11", 1) == [("CVE-2026-41017", 0.1672)]


def test_times_of_both_generations_compare():
    from tierintel.feeds.nvd import iso_time

    assert iso_time("2023-11-07T03:39Z") == "2023-11-07T03:39:00.000"
    assert iso_time("2023-11-07T03:39:36.747") == "2023-11-07T03:39:36.747"
    assert iso_time("2023-11-07T03:39Z") < iso_time("2023-11-07T03:39:36.747")


def test_a_damaged_gzip_stream_is_skipped(fresh, mirror_copy):
    good = gzip.compress(b'{"CVE_data_version": "4.0", "CVE_Items": []}' * 50)
    (mirror_copy / "nvd/1.1/damaged.json.gz").write_bytes(good[:30] + b"\x00" * 20 + good[50:])
    report = ingest(fresh, mirror=mirror_copy)
    assert len(report.files_failed) == 1 and fresh.catalog.counts()["cves"] == 42


def test_an_older_kev_snapshot_is_not_applied(fresh, mirror_copy):
    ingest(fresh, mirror=mirror_copy)
    kev = json.loads((mirror_copy / "kev/known_exploited_vulnerabilities.json").read_text())
    old = {**kev, "dateReleased": "2026-01-01T00:00:00.000Z", "vulnerabilities": []}
    (mirror_copy / "kev/old.json").write_text(json.dumps(old))
    report = ingest(fresh, mirror=mirror_copy)
    assert "older than the held catalog" in report.changes[0].notes[0]
    assert fresh.catalog.counts()["kev"] == 18 and report.docs_indexed == 0


def test_a_kev_only_cve_that_leaves_kev_leaves_the_index(fresh, mirror_copy):
    path = mirror_copy / "kev/known_exploited_vulnerabilities.json"
    kev = json.loads(path.read_text())
    extra = dict(kev["vulnerabilities"][0], cveID="CVE-2026-55555")
    path.write_text(json.dumps({**kev, "vulnerabilities": kev["vulnerabilities"] + [extra]}))
    ingest(fresh, mirror=mirror_copy)
    assert "CVE-2026-55555" in fresh.index.get(["CVE-2026-55555"])
    path.write_text(json.dumps({**kev, "dateReleased": "2026-11-30T00:00:00.000Z"}))
    ingest(fresh, mirror=mirror_copy)
    assert fresh.index.get(["CVE-2026-55555"]) == {}
    assert "CVE-2026-55555" not in fresh.catalog.indexed_ids()


def test_an_index_built_by_another_model_is_refused(fresh):
    from tierintel.index import IndexError_

    ingest(fresh, mirror=MIRROR)
    other = App(fresh.settings)
    other._embedder = HashEmbedder()
    other._embedder.name = "another 384-dimension model"
    with pytest.raises(IndexError_, match="built with hashed-words"):
        assert other.index is None


def test_long_update_windows_are_cut_to_nvds_limit():
    from tierintel.fetch import windows

    cut = windows("2026-01-01T00:00:00.000", "2026-12-07T10:00:00.000")
    assert cut[0] == ("2026-01-01T00:00:00.000", "2026-05-01T00:00:00.000")
    assert cut[-1][1] == "2026-12-07T10:00:00.000" and len(cut) == 3
    assert all(a[1] == b[0] for a, b in zip(cut, cut[1:]))  # no gap, no overlap
