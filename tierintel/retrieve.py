"""Retrieval: read what a question asks (a CVE by id, KEV entries for a product, the highest-EPSS
CVEs of a weakness in a month, how two CWEs relate, or free text) and fetch the records that answer
it: exact lookups and Milvus filters where the question names ids, products or weaknesses, dense
search otherwise."""

from __future__ import annotations

import calendar
import json
import re
from collections import deque
from dataclasses import dataclass, field

from tierintel.index import quote

CVE_RE = re.compile(r"\bCVE-\d{4}-\d{4,}\b", re.IGNORECASE)
CWE_RE = re.compile(r"\bCWE[- ]?(\d{1,4})\b", re.IGNORECASE)
KEV_RE = re.compile(r"\bkev\b|known[- ]exploited|actively exploited|exploited in the wild",
                    re.IGNORECASE)
EPSS_RE = re.compile(r"\bepss\b|most likely to be exploited|exploit(ation)? probability",
                     re.IGNORECASE)
MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
MONTHS |= {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name} | {"sept": 9}
MIN_DENSE_SCORE = 0.35  # cosine; below it a free-text hit is not taken as a match (docs/benchmarks)
TOP_K = 5
MAX_ID_FILTER = 4096  # candidate ids passed to a vector search as `id in [...]`


@dataclass
class Retrieval:
    intent: str  # "cve", "kev_product", "top_epss", "cwe_relation", "search"
    docs: list[dict]  # ranked
    scores: list[float]
    asked: str  # what was looked for, in words
    missing: list[str] = field(default_factory=list)  # ids asked for that the index lacks
    path: list[str] = field(default_factory=list)  # CWE relation path (cwe_relation)

    @property
    def ids(self) -> list[str]:
        return [d["id"] for d in self.docs]


def _norm(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


class Retriever:
    def __init__(self, index, embedder, catalog, top_k: int = TOP_K,
                 min_score: float = MIN_DENSE_SCORE, max_listed: int = 20) -> None:
        self.index, self.embedder, self.catalog = index, embedder, catalog
        self.top_k, self.min_score = top_k, min_score
        self.max_listed = max_listed  # KEV entries listed for one product, newest first

    def retrieve(self, question: str, today: str | None = None) -> Retrieval:
        cves = list(dict.fromkeys(m.upper() for m in CVE_RE.findall(question)))
        cwes = list(dict.fromkeys(f"CWE-{n}" for n in CWE_RE.findall(question)))
        if len(cwes) >= 2 and not cves:
            return self.cwe_relation(cwes[0], cwes[1])
        if EPSS_RE.search(question) and cwes and not cves:
            return self.top_epss(cwes[0], self._month(question, today or self.catalog.as_of()))
        if cves:
            return self.lookup(cves)
        if KEV_RE.search(question):
            return self.kev_for_product(question)
        return self.search(question)

    # -- the question types ------------------------------------------------------------------------
    def lookup(self, ids: list[str]) -> Retrieval:
        docs = self._in_order(ids)
        held = {d["id"] for d in docs}
        return Retrieval("cve", docs, [1.0] * len(docs), ", ".join(ids),
                         missing=[i for i in ids if i not in held])

    def kev_for_product(self, question: str) -> Retrieval:
        labels = self.match_products(question)
        if not labels:
            return Retrieval("kev_product", [], [], "KEV entries for a product the index does not "
                             "know (no vendor or product name in the question matched)")
        ranked = self.catalog.kev_ids_for(labels)
        shown = ranked[: self.max_listed]
        docs = self._in_order([cve_id for cve_id, _ in shown])
        more = f" ({len(ranked)} in all; the {len(shown)} newest)" if len(ranked) > len(shown) else ""
        return Retrieval("kev_product", docs, [1.0] * len(docs),
                         f"KEV entries for {', '.join(labels)}{more}")

    def top_epss(self, cwe: str, month: str | None) -> Retrieval:
        ranked = self.catalog.top_epss_ids(cwe, month, self.top_k)
        docs = self._in_order([cve_id for cve_id, _ in ranked])
        when = f" published in {month}" if month else ""
        return Retrieval("top_epss", docs, [d["epss"] for d in docs],
                         f"the highest-EPSS CVEs with {cwe}{when}")

    def cwe_relation(self, a: str, b: str) -> Retrieval:
        path = self.relation_path(a, b)
        ids = list(dict.fromkeys([a, b] + path))
        docs = self._in_order(ids)
        held = {d["id"] for d in docs}
        return Retrieval("cwe_relation", docs, [1.0] * len(docs), f"how {a} and {b} relate",
                         missing=[i for i in (a, b) if i not in held], path=path)

    def search(self, question: str) -> Retrieval:
        """Dense search, narrowed by what the question names: a product (by its name, not just its
        vendor), a CWE id, KEV. A named product with no close match returns nothing rather than
        another product's CVEs."""
        filters, named = [], []
        labels = self.match_products(question, min_score=3)
        if labels:
            filters.append(_id_filter(self.catalog.ids_with_product(labels, MAX_ID_FILTER + 1),
                                      f"array_contains_any(product_names, {json.dumps(labels)})"))
            named.append(", ".join(labels))
        cwes = [f"CWE-{n}" for n in CWE_RE.findall(question)]
        if cwes:
            filters.append(_id_filter(self.catalog.ids_with_cwe(cwes[0], MAX_ID_FILTER + 1),
                                      f"array_contains(cwes, {quote(cwes[0])})"))
            named.append(cwes[0])
        if KEV_RE.search(question):
            filters.append("kev == true")
            named.append("KEV")
        vector = self.embedder.encode([question])[0]
        hits = [(d, s) for d, s in self.index.search(vector, "cve", " and ".join(filters),
                                                     limit=self.top_k) if s >= self.min_score]
        within = f" among {'; '.join(named)}" if named else ""
        return Retrieval("search", [d for d, _ in hits], [s for _, s in hits],
                         f"records like {question!r}{within}")

    # -- helpers -----------------------------------------------------------------------------------
    def _in_order(self, ids: list[str]) -> list[dict]:
        """The index's documents for ``ids``, in that order, leaving out ids it lacks."""
        found = self.index.get(ids)
        return [found[i] for i in ids if i in found]

    def match_products(self, question: str, min_score: int = 1) -> list[str]:
        """Product labels the question names: the product's name scores 3, its vendor's 2; the best
        score wins (so "Northwind Gateway" beats every other gateway)."""
        text, best, labels = _norm(question), min_score - 1, []
        for label, vendor, product in self.catalog.products():
            score = 3 * (_norm(product) in text) + 2 * (_norm(vendor) in text)
            if score > best:
                best, labels = score, [label]
            elif score == best and score:
                labels.append(label)
        return labels

    @staticmethod
    def _month(question: str, today: str) -> str | None:
        """"YYYY-MM" the question means ("this month", "last month", "in November 2026",
        "2026-11"), or None for no date limit."""
        text = question.lower()
        year, month = (int(today[:4]), int(today[5:7])) if len(today) >= 7 else (None, None)
        if (m := re.search(r"\b(\d{4})-(\d{2})\b", text)) is not None:
            return f"{m.group(1)}-{m.group(2)}"
        if "this month" in text and year:
            return f"{year:04d}-{month:02d}"
        if "last month" in text and year:
            year, month = (year, month - 1) if month > 1 else (year - 1, 12)
            return f"{year:04d}-{month:02d}"
        # A month name, with an optional year; "may" only with a year ("which may be" is a verb).
        for m in re.finditer(r"\b([a-z]+)\b(?:\s+(\d{4}))?", text):
            word, given_year = m.group(1), m.group(2)
            if word in MONTHS and (word != "may" or given_year) and (given_year or year):
                return f"{int(given_year or year):04d}-{MONTHS[word]:02d}"
        return None

    def relation_path(self, a: str, b: str, max_hops: int = 4) -> list[str]:
        """The shortest chain of CWE relations (any nature, either direction) from a to b, ends
        included; [] when none within max_hops or either is unknown."""
        if self.catalog.cwe(a) is None or self.catalog.cwe(b) is None:
            return []
        previous, frontier = {a: None}, deque([(a, 0)])
        while frontier:
            node, hops = frontier.popleft()
            if node == b:
                path = []
                while node is not None:
                    path.append(node)
                    node = previous[node]
                return path[::-1]
            if hops == max_hops:
                continue
            for other in self._neighbours(node):
                if other not in previous:
                    previous[other] = node
                    frontier.append((other, hops + 1))
        return []

    def _neighbours(self, cwe_id: str) -> list[str]:
        entry = self.catalog.cwe(cwe_id)
        out = [other for _, other in entry.related] if entry else []
        out += self.catalog.cwe_referrers(cwe_id)
        return out


def _id_filter(ids: list[str], array_filter: str) -> str:
    """``id in [...]`` over the catalog's candidates where they are few (Milvus Lite filters arrays
    row by row in Python), else the index's own array filter."""
    return f"id in {json.dumps(ids)}" if len(ids) <= MAX_ID_FILTER else array_filter
