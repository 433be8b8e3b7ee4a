"""CISA Known Exploited Vulnerabilities catalog JSON (known_exploited_vulnerabilities.json)."""

from __future__ import annotations

import json

from tierintel.records import FeedBatch, FeedError, KevEntry, SchemaError

_FIELDS = {"cveID": "cve_id", "vendorProject": "vendor", "product": "product",
           "vulnerabilityName": "name", "dateAdded": "date_added",
           "shortDescription": "short_description", "requiredAction": "required_action",
           "dueDate": "due_date"}


def parse_kev_json(data: bytes | str, source: str = "") -> FeedBatch:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FeedError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "vulnerabilities" not in doc or "catalogVersion" not in doc:
        raise SchemaError(f"{source}: not a CISA KEV catalog (needs 'catalogVersion' and "
                          "'vulnerabilities')")
    batch = FeedBatch(source, "kev", feed_date=doc.get("dateReleased", ""),
                      version=str(doc["catalogVersion"]))
    for i, item in enumerate(doc["vulnerabilities"] or []):
        try:
            values = {ours: str(item[theirs]) for theirs, ours in _FIELDS.items()}
            if not values["cve_id"].startswith("CVE-"):
                raise ValueError(f"cveID {values['cve_id']!r}")
            batch.records.append(KevEntry(
                **values, ransomware=str(item.get("knownRansomwareCampaignUse", "Unknown")),
                notes=str(item.get("notes", "")), cwes=list(item.get("cwes") or [])))
        except (KeyError, TypeError, ValueError) as e:
            batch.skip(f"vulnerabilities[{i}]: {type(e).__name__}: {e}")
    if batch.skipped and not batch.records:
        raise SchemaError(f"{source}: no KEV entry has the expected fields {sorted(_FIELDS)} "
                          f"(first problem: {batch.problems[0]}); has the schema changed?")
    return batch
