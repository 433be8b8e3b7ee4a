"""One document per CVE (its NVD record merged with its KEV entry and EPSS score) and per CWE: the
text that is embedded, the scalar fields that filter, and the facts an answer may quote."""

from __future__ import annotations

from collections.abc import Callable

from tierintel.records import CveRecord, CweEntry, EpssScore, KevEntry

# The patch rule quoted in answers (an SSVC-like reading of the three feeds; see docs/design.md).
PATCH_NOW_EPSS, PATCH_SOON_EPSS, PATCH_SOON_CVSS = 0.5, 0.1, 9.0


def patch_priority(kev: bool, epss: float | None, cvss: float | None) -> tuple[str, str]:
    if kev:
        return "patch now", "it is in CISA's Known Exploited Vulnerabilities catalog"
    if epss is not None and epss >= PATCH_NOW_EPSS:
        return "patch now", f"its EPSS score is {epss:.5f} (at least {PATCH_NOW_EPSS})"
    if epss is not None and epss >= PATCH_SOON_EPSS:
        return "patch soon", f"its EPSS score is {epss:.5f} (at least {PATCH_SOON_EPSS})"
    if cvss is not None and cvss >= PATCH_SOON_CVSS:
        return "patch soon", f"its CVSS base score is {cvss} (critical)"
    return "patch in the normal cycle", "it is not in KEV and its EPSS and CVSS scores are lower"


def product_label(vendor_product: str) -> str:
    vendor, _, product = vendor_product.partition(":")
    return f"{vendor} {product}".replace("_", " ")


def cve_document(cve_id: str, record: CveRecord | None, kev: KevEntry | None,
                 epss: EpssScore | None, cwe_lookup: Callable[[str], CweEntry | None]) -> dict:
    description = record.description if record else kev.short_description
    cwes = list(record.cwes if record else kev.cwes)
    products = record.products if record else []
    names = [product_label(p) for p in products]
    if kev is not None:
        names.append(f"{kev.vendor} {kev.product}")
    cvss = record.best_cvss if record else None
    in_kev = kev is not None or bool(record and record.kev_date_added)
    priority, reason = patch_priority(in_kev, epss.epss if epss else None,
                                      cvss.score if cvss else None)
    cwe_names = [f"{c} {e.name}" for c in cwes if (e := cwe_lookup(c)) is not None]
    text = (f"{cve_id}: {description} Affects {', '.join(dict.fromkeys(names)) or 'unknown'}. "
            f"Weakness: {'; '.join(cwe_names) or ', '.join(cwes) or 'unknown'}.")
    return {
        "id": cve_id, "kind": "cve", "text": text[:4000], "description": description,
        "published": (record.published if record else kev.date_added)[:10],
        "last_modified": record.last_modified if record else "",
        "cwes": cwes, "products": products,
        "product_names": [n.lower() for n in dict.fromkeys(names)],
        "epss": epss.epss if epss else -1.0, "percentile": epss.percentile if epss else -1.0,
        "kev": in_kev,
        "kev_date_added": kev.date_added if kev else (record.kev_date_added if record else ""),
        "kev_due_date": kev.due_date if kev else (record.kev_due_date if record else ""),
        "kev_required_action": (kev.required_action if kev else
                                (record.kev_required_action if record else "")),
        "kev_ransomware": kev.ransomware if kev else "",
        "kev_name": kev.name if kev else (record.kev_name if record else ""),
        "cvss": cvss.score if cvss else -1.0, "cvss_version": cvss.version if cvss else "",
        "severity": cvss.severity if cvss else "", "vector": cvss.vector if cvss else "",
        "references": (record.references if record else [])[:5],
        "priority": priority, "priority_reason": reason,
    }


def cwe_document(entry: CweEntry, cwe_lookup: Callable[[str], CweEntry | None]) -> dict:
    related = [{"nature": nature, "id": other,
                "name": (e.name if (e := cwe_lookup(other)) is not None else "")}
               for nature, other in entry.related]
    return {"id": entry.id, "kind": "cwe", "name": entry.name, "abstraction": entry.abstraction,
            "cwe_kind": entry.kind, "description": entry.description, "related": related,
            "text": f"{entry.id} {entry.name}: {entry.description}"[:4000]}
