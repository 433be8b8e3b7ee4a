"""NVD readers: CVE API 2.0 pages (``vulnerabilities[].cve``) and the 1.1 JSON feeds, either whole
(``CVE_Items``, as nvdcve-1.1-YYYY.json) or one item per file (PatrowlHearsData's CVE/data layout)."""

from __future__ import annotations

import json

from tierintel.records import CveRecord, Cvss, FeedBatch, FeedError, SchemaError

API_VERSIONS = {"2.0"}
LEGACY_DATA_VERSIONS = {"4.0"}
_CVSS_KEYS = [("cvssMetricV40", "4.0"), ("cvssMetricV31", "3.1"), ("cvssMetricV30", "3.0"),
              ("cvssMetricV2", "2.0")]


def parse_nvd_json(data: bytes | str | dict, source: str = "") -> FeedBatch:
    """Read one NVD document of either generation; an unknown layout or version raises."""
    doc = data if isinstance(data, dict) else _load(data, source)
    if "vulnerabilities" in doc or doc.get("format") == "NVD_CVE":
        return _parse_api(doc, source)
    if "CVE_Items" in doc or "cve" in doc:
        return _parse_legacy(doc, source)
    raise FeedError(f"{source}: not an NVD CVE document (no 'vulnerabilities', 'CVE_Items' or 'cve')")


def _load(data: bytes | str, source: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FeedError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FeedError(f"{source}: expected a JSON object at the top level")
    return doc


def _parse_api(doc: dict, source: str) -> FeedBatch:
    version = str(doc.get("version", ""))
    if doc.get("format") != "NVD_CVE" or version not in API_VERSIONS:
        raise SchemaError(f"{source}: NVD CVE API feed has format {doc.get('format')!r} version "
                          f"{version!r}; this reader knows NVD_CVE {sorted(API_VERSIONS)}")
    batch = FeedBatch(source, "nvd", feed_date=doc.get("timestamp", ""), version=version)
    for i, item in enumerate(doc.get("vulnerabilities") or []):
        try:
            batch.records.append(_api_cve(item["cve"]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            batch.skip(f"vulnerabilities[{i}]: {type(e).__name__}: {e}")
    return batch


def _english(entries: list[dict]) -> str:
    for entry in entries or []:
        if entry.get("lang", "en").startswith("en"):
            return entry["value"]
    return entries[0]["value"] if entries else ""


def _api_cve(cve: dict) -> CveRecord:
    cvss = []
    for key, version in _CVSS_KEYS:
        metrics = cve.get("metrics", {}).get(key) or []
        primary = [m for m in metrics if m.get("type") == "Primary"] or metrics
        if primary:
            data = primary[0]["cvssData"]
            severity = data.get("baseSeverity") or primary[0].get("baseSeverity", "")
            cvss.append(Cvss(version, float(data["baseScore"]), severity, data.get("vectorString", "")))
    cwes = [d["value"] for w in cve.get("weaknesses") or [] for d in w.get("description") or []
            if d.get("value", "").startswith("CWE-")]
    cpes = [m["criteria"] for conf in cve.get("configurations") or []
            for node in conf.get("nodes") or [] for m in node.get("cpeMatch") or []
            if m.get("vulnerable")]
    return CveRecord(
        id=_checked_id(cve["id"]), published=iso_time(cve["published"]),
        last_modified=iso_time(cve["lastModified"]),
        description=_english(cve["descriptions"]), cwes=list(dict.fromkeys(cwes)), cvss=cvss,
        cpes=list(dict.fromkeys(cpes)), references=[r["url"] for r in cve.get("references") or []],
        status=cve.get("vulnStatus", ""), kev_date_added=cve.get("cisaExploitAdd", ""),
        kev_due_date=cve.get("cisaActionDue", ""),
        kev_required_action=cve.get("cisaRequiredAction", ""),
        kev_name=cve.get("cisaVulnerabilityName", ""))


def iso_time(value: str) -> str:
    """One comparable form for both generations' times: "2023-11-07T03:39Z" (1.1) and
    "2023-11-07T03:39:36.747" (API 2.0) become "YYYY-MM-DDTHH:MM:SS.fff" (UTC, as NVD gives them),
    so that catalog comparisons across formats order by time, not by characters."""
    from datetime import datetime

    text = value.strip().rstrip("Z")
    for pattern in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            parsed = datetime.strptime(text, pattern)
        except ValueError:
            continue
        return parsed.strftime("%Y-%m-%dT%H:%M:%S.") + f"{parsed.microsecond // 1000:03d}"
    raise ValueError(f"unreadable time {value!r}")


def _checked_id(cve_id: str) -> str:
    parts = cve_id.split("-")
    if len(parts) != 3 or parts[0] != "CVE" or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"malformed CVE id {cve_id!r}")
    return cve_id


def _parse_legacy(doc: dict, source: str) -> FeedBatch:
    items = doc["CVE_Items"] if "CVE_Items" in doc else [doc]
    version = str(doc.get("CVE_data_version", "") or (items[0].get("cve", {}).get("data_version", "")
                                                        if items else ""))
    if version not in LEGACY_DATA_VERSIONS:
        raise SchemaError(f"{source}: NVD 1.1 feed has CVE_data_version {version!r}; this reader "
                          f"knows {sorted(LEGACY_DATA_VERSIONS)}")
    batch = FeedBatch(source, "nvd", feed_date=doc.get("CVE_data_timestamp", ""), version="1.1")
    for i, item in enumerate(items):
        try:
            batch.records.append(_legacy_cve(item))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            batch.skip(f"CVE_Items[{i}]: {type(e).__name__}: {e}")
    return batch


def _legacy_cve(item: dict) -> CveRecord:
    cve = item["cve"]
    impact = item.get("impact") or {}
    cvss = []
    if "baseMetricV3" in impact:
        data = impact["baseMetricV3"]["cvssV3"]
        cvss.append(Cvss(data["version"], float(data["baseScore"]), data.get("baseSeverity", ""),
                         data.get("vectorString", "")))
    if "baseMetricV2" in impact:
        metric = impact["baseMetricV2"]
        cvss.append(Cvss("2.0", float(metric["cvssV2"]["baseScore"]), metric.get("severity", ""),
                         metric["cvssV2"].get("vectorString", "")))
    cwes = [d["value"] for p in cve.get("problemtype", {}).get("problemtype_data") or []
            for d in p.get("description") or [] if d.get("value", "").startswith("CWE-")]
    cpes = []
    stack = list((item.get("configurations") or {}).get("nodes") or [])
    while stack:
        node = stack.pop(0)
        stack.extend(node.get("children") or [])
        cpes += [m["cpe23Uri"] for m in node.get("cpe_match") or [] if m.get("vulnerable")]
    return CveRecord(
        id=_checked_id(cve["CVE_data_meta"]["ID"]), published=iso_time(item["publishedDate"]),
        last_modified=iso_time(item["lastModifiedDate"]),
        description=_english(cve["description"]["description_data"]),
        cwes=list(dict.fromkeys(cwes)), cvss=cvss, cpes=list(dict.fromkeys(cpes)),
        references=[r["url"] for r in cve.get("references", {}).get("reference_data") or []])
