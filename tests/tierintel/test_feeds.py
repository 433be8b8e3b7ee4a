"""The feed readers on the shipped fixtures, the official CWE catalog, malformed records and files,
and schema changes."""

from __future__ import annotations

import gzip
import json

import pytest

from tierintel.feeds import parse_cwe_xml, parse_epss_csv, parse_kev_json, parse_nvd_json
from tierintel.feeds.cwe import bundled_catalog
from tierintel.records import FeedError, SchemaError

from .conftest import MIRROR


def api_page() -> dict:
    return json.loads((MIRROR / "nvd/api/page-0.json").read_text())


def test_nvd_api_page_fields():
    batch = parse_nvd_json((MIRROR / "nvd/api/page-1.json").read_bytes(), "p1")
    assert batch.version == "2.0" and batch.skipped == 0
    record = {r.id: r for r in batch.records}["CVE-2026-41021"]
    assert record.cwes == ["CWE-287"] and record.products == ["northwind:gateway"]
    assert record.best_cvss.version == "3.1" and record.best_cvss.score == 9.8
    assert record.kev_date_added == "2026-11-05" and record.kev_due_date == "2026-11-26"
    assert record.description.startswith("Authentication bypass")  # the English one, not "es"


def test_nvd_api_prefers_v40_and_primary_metrics():
    page = api_page()
    cve = page["vulnerabilities"][0]["cve"]
    cve["metrics"]["cvssMetricV40"] = [
        {"source": "x", "type": "Secondary", "cvssData": {"version": "4.0", "baseScore": 1.0,
                                                          "baseSeverity": "LOW"}},
        {"source": "y", "type": "Primary", "cvssData": {"version": "4.0", "baseScore": 9.3,
                                                        "baseSeverity": "CRITICAL"}}]
    cve["metrics"]["cvssMetricV2"] = [{"type": "Primary", "baseSeverity": "HIGH",
                                       "cvssData": {"version": "2.0", "baseScore": 7.5}}]
    record = parse_nvd_json(page).records[0]
    assert [(c.version, c.score) for c in record.cvss] == [("4.0", 9.3), ("3.1", record.cvss[1].score),
                                                          ("2.0", 7.5)]
    assert record.cvss[-1].severity == "HIGH"


def test_nvd_legacy_feed_and_patrowl_file():
    feed = parse_nvd_json(gzip.decompress((MIRROR / "nvd/1.1/nvdcve-1.1-recent.json.gz").read_bytes()))
    assert feed.version == "1.1" and {r.id for r in feed.records} == {
        "CVE-2022-22965", "CVE-2023-34362", "CVE-2023-4966"}
    one = parse_nvd_json((MIRROR / "nvd/patrowl/CVE/data/2021/CVE-2021-44228.json").read_bytes())
    record = one.records[0]
    assert record.id == "CVE-2021-44228" and record.cwes == ["CWE-502", "CWE-400", "CWE-20"]
    assert record.products == ["apache:log4j"] and record.best_cvss.score == 10.0


def test_malformed_nvd_entry_is_skipped_with_a_count():
    page = api_page()
    del page["vulnerabilities"][2]["cve"]["id"]
    page["vulnerabilities"][4]["cve"]["id"] = "CVE-20X6-1"
    batch = parse_nvd_json(page, "page")
    assert batch.skipped == 2 and len(batch.records) == len(page["vulnerabilities"]) - 2
    assert "vulnerabilities[2]" in batch.problems[0]


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(version="3.0"), "version '3.0'"),
    (lambda d: d.update(format="CVE_RECORD"), "format 'CVE_RECORD'"),
])
def test_nvd_schema_change_is_a_clear_error(change, match):
    page = api_page()
    change(page)
    with pytest.raises(SchemaError, match=match):
        parse_nvd_json(page, "page")


def test_nvd_legacy_unknown_data_version():
    item = json.loads((MIRROR / "nvd/patrowl/CVE/data/2014/CVE-2014-0160.json").read_text())
    item["cve"]["data_version"] = "5.0"
    with pytest.raises(SchemaError, match="CVE_data_version '5.0'"):
        parse_nvd_json(item)


def test_not_json_is_a_feed_error():
    with pytest.raises(FeedError, match="not valid JSON"):
        parse_nvd_json(b'{"vulnerabilities": [', "broken.json")
    with pytest.raises(FeedError, match="not an NVD CVE document"):
        parse_nvd_json(b'{"hello": 1}', "other.json")


def test_kev_catalog_and_bad_entries():
    doc = json.loads((MIRROR / "kev/known_exploited_vulnerabilities.json").read_text())
    batch = parse_kev_json(json.dumps(doc))
    assert batch.version == "2026.11.28" and len(batch.records) == doc["count"] == 18
    log4j = next(e for e in batch.records if e.cve_id == "CVE-2021-44228")
    assert log4j.date_added == "2021-12-10" and log4j.ransomware == "Known"
    del doc["vulnerabilities"][0]["dueDate"]
    doc["vulnerabilities"][1]["cveID"] = "not-a-cve"
    batch = parse_kev_json(json.dumps(doc))
    assert batch.skipped == 2 and len(batch.records) == 16


def test_kev_schema_changes():
    doc = json.loads((MIRROR / "kev/known_exploited_vulnerabilities.json").read_text())
    renamed = {**doc, "vulnerabilities": [{("cve" if k == "cveID" else k): v for k, v in e.items()}
                                          for e in doc["vulnerabilities"]]}
    with pytest.raises(SchemaError, match="has the schema changed"):
        parse_kev_json(json.dumps(renamed))
    with pytest.raises(SchemaError, match="not a CISA KEV catalog"):
        parse_kev_json(json.dumps({"vulnerabilities": []}))


def test_epss_csv_lines():
    text = gzip.decompress((MIRROR / "epss/epss_scores-2026-11-29.csv.gz").read_bytes()).decode()
    batch = parse_epss_csv(text)
    assert batch.version == "v2025.03.14" and batch.feed_date.startswith("2026-11-29")
    assert {s.cve_id: s.epss for s in batch.records}["CVE-2026-41021"] == 0.8102
    lines = text.splitlines()
    lines[3] = "CVE-2026-41001,zero,0.5"
    lines[4] = "CVE-2026-41009,0.3"
    lines.insert(5, "CVE-2026-41017,1.7,0.9")
    batch = parse_epss_csv("\n".join(lines))
    assert batch.skipped == 3 and len(batch.records) == 42 - 2


def test_epss_header_change():
    with pytest.raises(SchemaError, match="EPSS header"):
        parse_epss_csv("#model_version:v2030.01.01,score_date:2030-01-01\ncve,score,pct,x\n")


def test_cwe_official_catalog_from_cwe2():
    batch = parse_cwe_xml(bundled_catalog().read_bytes(), "cwe2")
    assert batch.version == "4.14" and batch.skipped == 0
    entries = {e.id: e for e in batch.records}
    assert len(entries) > 1300
    assert ("ChildOf", "CWE-74") in entries["CWE-79"].related
    assert entries["CWE-89"].name.endswith("('SQL Injection')")
    assert entries["CWE-1019"].kind == "Category"


def test_cwe_namespace_change():
    xml = (MIRROR / "cwe/cwec_excerpt.xml").read_bytes().replace(b"cwe-7", b"cwe-8")
    with pytest.raises(SchemaError, match="cwe-8"):
        parse_cwe_xml(xml, "new.xml")
    with pytest.raises(FeedError, match="not well-formed"):
        parse_cwe_xml(b"<Weakness_Catalog", "cut.xml")
