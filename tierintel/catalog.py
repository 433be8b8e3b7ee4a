"""The catalog: a SQLite database of every record the feeds gave (CVEs, KEV, EPSS, CWEs), the state
of each feed, and a change log. It merges the feeds into one document per CVE and per CWE and knows
which documents changed since they were last indexed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from tierintel.documents import cve_document, cwe_document, product_label
from tierintel.records import CveRecord, CweEntry, EpssScore, FeedBatch, KevEntry

SCHEMA = """
CREATE TABLE IF NOT EXISTS cves (id TEXT PRIMARY KEY, last_modified TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS kev (cve_id TEXT PRIMARY KEY, data TEXT);
CREATE TABLE IF NOT EXISTS epss (cve_id TEXT PRIMARY KEY, epss REAL, percentile REAL);
CREATE TABLE IF NOT EXISTS cwes (id TEXT PRIMARY KEY, data TEXT);
CREATE TABLE IF NOT EXISTS feeds (source TEXT PRIMARY KEY, kind TEXT, feed_date TEXT,
    version TEXT, content_hash TEXT, ingested_at REAL);
CREATE TABLE IF NOT EXISTS products (label TEXT PRIMARY KEY, vendor TEXT, product TEXT);
CREATE TABLE IF NOT EXISTS indexed (id TEXT PRIMARY KEY, kind TEXT, doc_hash TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS text_hashes (id TEXT PRIMARY KEY, text_hash TEXT);
CREATE TABLE IF NOT EXISTS doc_facts (id TEXT PRIMARY KEY, published TEXT, epss REAL,
    kev INTEGER, kev_date_added TEXT);
CREATE TABLE IF NOT EXISTS doc_cwe (id TEXT, cwe TEXT, PRIMARY KEY (cwe, id));
CREATE TABLE IF NOT EXISTS doc_product (id TEXT, label TEXT, PRIMARY KEY (label, id));
CREATE INDEX IF NOT EXISTS doc_facts_published ON doc_facts (published);
CREATE TABLE IF NOT EXISTS changes (at REAL, kind TEXT, source TEXT, added INTEGER,
    updated INTEGER, unchanged INTEGER, removed INTEGER, skipped INTEGER, note TEXT);
"""


@dataclass
class Change:
    """What one feed file did to the catalog."""

    kind: str
    source: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    changed_ids: set[str] = field(default_factory=set)


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


class Catalog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Version 1 added the ranking tables (doc_facts, doc_cwe, doc_product): fill them from the
        documents already indexed by an older catalog."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            held = self.db.execute("SELECT id, doc_hash FROM indexed WHERE kind='cve'").fetchall()
            self.mark_indexed([d | {"hash": doc_hash} for doc_id, doc_hash in held
                               if (d := self.document(doc_id)) is not None])
            self.db.execute("PRAGMA user_version = 1")
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    # -- feed state ------------------------------------------------------------------------------
    def seen_unchanged(self, source: str, data: bytes) -> bool:
        """True when this exact file was ingested before (an idempotent re-run skips it)."""
        row = self.db.execute("SELECT content_hash FROM feeds WHERE source=?", (source,)).fetchone()
        return row is not None and row[0] == hashlib.sha256(data).hexdigest()

    def feed_state(self, kind: str) -> list[dict]:
        rows = self.db.execute("SELECT source, feed_date, version, ingested_at FROM feeds WHERE "
                               "kind=? ORDER BY feed_date", (kind,)).fetchall()
        return [dict(source=s, feed_date=d, version=v, ingested_at=t) for s, d, v, t in rows]

    def apply(self, batch: FeedBatch, data: bytes) -> Change:
        """Merge one parsed feed file; records its state and a change-log line, in one transaction."""
        change = Change(batch.kind, batch.source, skipped=batch.skipped,
                        notes=[f"skipped: {p}" for p in batch.problems])
        with self.db:
            getattr(self, f"_apply_{batch.kind}")(batch, change)
            self.db.execute("INSERT OR REPLACE INTO feeds VALUES (?,?,?,?,?,?)",
                            (batch.source, batch.kind, batch.feed_date, batch.version,
                             hashlib.sha256(data).hexdigest(), time.time()))
            self.log(change)
        return change

    def log(self, change: Change) -> None:
        self.db.execute("INSERT INTO changes VALUES (?,?,?,?,?,?,?,?,?)",
                        (time.time(), change.kind, change.source, change.added, change.updated,
                         change.unchanged, change.removed, change.skipped,
                         "; ".join(change.notes)[:2000]))

    def _apply_nvd(self, batch: FeedBatch, change: Change) -> None:
        for record in batch.records:
            row = self.db.execute("SELECT last_modified FROM cves WHERE id=?",
                                  (record.id,)).fetchone()
            if row is not None and row[0] >= record.last_modified:
                change.unchanged += 1  # same or older than what we hold
                continue
            self.db.execute("INSERT OR REPLACE INTO cves VALUES (?,?,?)",
                            (record.id, record.last_modified, json.dumps(record.to_dict())))
            change.added += row is None
            change.updated += row is not None
            change.changed_ids.add(record.id)
            for key in record.products:
                vendor, _, product = key.partition(":")
                self._add_product(product_label(key), vendor, product)

    def _add_product(self, label: str, vendor: str, product: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO products VALUES (?,?,?)",
                        (label.lower(), vendor.replace("_", " ").lower(),
                         product.replace("_", " ").lower()))

    def _apply_kev(self, batch: FeedBatch, change: Change) -> None:
        newest = self.db.execute("SELECT MAX(feed_date) FROM feeds WHERE kind='kev'").fetchone()[0]
        if newest and batch.feed_date and batch.feed_date < newest:
            change.notes.append(f"older than the held catalog ({newest}): not applied")
            change.unchanged = len(batch.records)
            return
        incoming = {entry.cve_id: json.dumps(entry.__dict__, sort_keys=True)
                    for entry in batch.records}
        held = dict(self.db.execute("SELECT cve_id, data FROM kev").fetchall())
        for cve_id, data in incoming.items():
            if held.get(cve_id) == data:
                change.unchanged += 1
                continue
            self.db.execute("INSERT OR REPLACE INTO kev VALUES (?,?)", (cve_id, data))
            entry = json.loads(data)
            self._add_product(f"{entry['vendor']} {entry['product']}", entry["vendor"],
                              entry["product"])
            change.added += cve_id not in held
            change.updated += cve_id in held
            change.changed_ids.add(cve_id)
        if not batch.skipped:  # the catalog is a full snapshot: what left it was removed
            for cve_id in set(held) - set(incoming):
                self.db.execute("DELETE FROM kev WHERE cve_id=?", (cve_id,))
                change.removed += 1
                change.changed_ids.add(cve_id)

    def _apply_epss(self, batch: FeedBatch, change: Change) -> None:
        newest = self.db.execute("SELECT MAX(feed_date), version FROM feeds WHERE kind='epss'"
                                 ).fetchone()
        if newest[0] and batch.feed_date and batch.feed_date < newest[0]:
            change.notes.append(f"older than the held scores ({newest[0]}): not applied")
            change.unchanged = len(batch.records)
            return
        if newest[1] and batch.version and newest[1] != batch.version:
            change.notes.append(f"EPSS model changed {newest[1]} -> {batch.version}")
        held = {c: (e, p) for c, e, p in self.db.execute("SELECT * FROM epss").fetchall()}
        for score in batch.records:
            old = held.get(score.cve_id)
            if old == (score.epss, score.percentile):
                change.unchanged += 1
                continue
            self.db.execute("INSERT OR REPLACE INTO epss VALUES (?,?,?)",
                            (score.cve_id, score.epss, score.percentile))
            change.added += old is None
            change.updated += old is not None
            change.changed_ids.add(score.cve_id)

    def _apply_cwe(self, batch: FeedBatch, change: Change) -> None:
        for entry in batch.records:
            data = json.dumps(entry.__dict__, sort_keys=True)
            row = self.db.execute("SELECT data FROM cwes WHERE id=?", (entry.id,)).fetchone()
            if row is not None and row[0] == data:
                change.unchanged += 1
                continue
            self.db.execute("INSERT OR REPLACE INTO cwes VALUES (?,?)", (entry.id, data))
            self.__dict__.pop("_referrers", None)
            change.added += row is None
            change.updated += row is not None
            change.changed_ids.add(entry.id)

    # -- reads -------------------------------------------------------------------------------------
    def cve(self, cve_id: str) -> CveRecord | None:
        row = self.db.execute("SELECT data FROM cves WHERE id=?", (cve_id,)).fetchone()
        return CveRecord.from_dict(json.loads(row[0])) if row else None

    def kev(self, cve_id: str) -> KevEntry | None:
        row = self.db.execute("SELECT data FROM kev WHERE cve_id=?", (cve_id,)).fetchone()
        return KevEntry(**json.loads(row[0])) if row else None

    def epss(self, cve_id: str) -> EpssScore | None:
        row = self.db.execute("SELECT epss, percentile FROM epss WHERE cve_id=?",
                              (cve_id,)).fetchone()
        return EpssScore(cve_id, *row) if row else None

    def cwe(self, cwe_id: str) -> CweEntry | None:
        row = self.db.execute("SELECT data FROM cwes WHERE id=?", (cwe_id,)).fetchone()
        if not row:
            return None
        data = json.loads(row[0])
        data["related"] = [tuple(r) for r in data["related"]]
        return CweEntry(**data)

    def cwe_referrers(self, cwe_id: str) -> list[str]:
        """CWEs whose relations name cwe_id (the reverse edges of the relation graph)."""
        referrers = self.__dict__.get("_referrers")
        if referrers is None:  # built whole, then published: readers never see half of it
            referrers = {}
            for other, data in self.db.execute("SELECT id, data FROM cwes"):
                for _, target in json.loads(data)["related"]:
                    referrers.setdefault(target, []).append(other)
            self._referrers = referrers
        return referrers.get(cwe_id, [])

    def cve_ids(self) -> list[str]:
        """Every CVE with a document: NVD records, and KEV entries NVD has not given us yet."""
        ids = {r[0] for r in self.db.execute("SELECT id FROM cves UNION SELECT cve_id FROM kev")}
        return sorted(ids)

    def cwe_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM cwes ORDER BY id")]

    def products(self) -> list[tuple[str, str, str]]:
        """(label, vendor, product) of every product a CPE or KEV entry named, lower case."""
        return self.db.execute("SELECT label, vendor, product FROM products").fetchall()

    def counts(self) -> dict[str, int]:
        return {table: self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("cves", "kev", "epss", "cwes", "indexed")}

    def recent_changes(self, limit: int = 20) -> list[dict]:
        rows = self.db.execute("SELECT * FROM changes ORDER BY at DESC LIMIT ?", (limit,))
        names = ["at", "kind", "source", "added", "updated", "unchanged", "removed", "skipped",
                 "note"]
        return [dict(zip(names, row)) for row in rows.fetchall()]

    # -- documents ---------------------------------------------------------------------------------
    def document(self, doc_id: str) -> dict | None:
        if doc_id.startswith("CWE-"):
            entry = self.cwe(doc_id)
            return cwe_document(entry, self.cwe) if entry else None
        record, kev = self.cve(doc_id), self.kev(doc_id)
        if record is None and kev is None:
            return None
        return cve_document(doc_id, record, kev, self.epss(doc_id), self.cwe)

    def stale_documents(self) -> list[dict]:
        """Documents whose content differs from what was last indexed (new ones included). A
        document whose embedded text is unchanged (a new EPSS score, say) is marked
        ``reuse_vector``: it is upserted with its stored vector, not embedded again."""
        held = dict(self.db.execute("SELECT id, doc_hash FROM indexed").fetchall())
        texts = dict(self.db.execute("SELECT id, text_hash FROM text_hashes").fetchall())
        out = []
        for doc_id in self.cwe_ids() + self.cve_ids():
            doc = self.document(doc_id)
            doc["hash"] = _hash(doc)
            doc["text_hash"] = _hash(doc["text"])
            if held.get(doc_id) != doc["hash"]:
                doc["reuse_vector"] = doc_id in held and texts.get(doc_id) == doc["text_hash"]
                out.append(doc)
        return out

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def indexed_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM indexed")]

    def vanished_ids(self) -> list[str]:
        """Indexed documents whose records are gone (a KEV-only CVE that left the catalog)."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM indexed WHERE id NOT IN (SELECT id FROM cves UNION SELECT cve_id FROM "
            "kev UNION SELECT id FROM cwes)")]

    def forget(self, ids: list[str]) -> None:
        """Drop documents from the indexed and ranking tables."""
        with self.db:
            for table in ("indexed", "doc_facts", "doc_cwe", "doc_product", "text_hashes"):
                self.db.executemany(f"DELETE FROM {table} WHERE id=?", [(i,) for i in ids])

    def mark_indexed(self, docs: list[dict]) -> None:
        """Record documents as indexed, and their scalar fields in indexed tables: the structured
        questions rank here (Milvus Lite filters arrays row by row in Python: 240 ms at 5,000
        CVEs, docs/benchmarks.md), then fetch the documents from the index by id."""
        cves = [d for d in docs if d["kind"] == "cve"]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO indexed VALUES (?,?,?)",
                                [(d["id"], d["kind"], d["hash"]) for d in docs])
            self.db.executemany("INSERT OR REPLACE INTO text_hashes VALUES (?,?)",
                                [(d["id"], d["text_hash"]) for d in docs if "text_hash" in d])
            self.db.executemany("DELETE FROM doc_cwe WHERE id=?", [(d["id"],) for d in cves])
            self.db.executemany("DELETE FROM doc_product WHERE id=?", [(d["id"],) for d in cves])
            self.db.executemany("INSERT OR REPLACE INTO doc_facts VALUES (?,?,?,?,?)",
                                [(d["id"], d["published"], d["epss"], int(d["kev"]),
                                  d["kev_date_added"]) for d in cves])
            self.db.executemany("INSERT OR IGNORE INTO doc_cwe VALUES (?,?)",
                                [(d["id"], c) for d in cves for c in d["cwes"]])
            self.db.executemany("INSERT OR IGNORE INTO doc_product VALUES (?,?)",
                                [(d["id"], n) for d in cves for n in d["product_names"]])

    def kev_ids_for(self, labels: list[str]) -> list[tuple[str, str]]:
        """(id, KEV date added) of indexed KEV CVEs of these products, newest first."""
        marks = ",".join("?" * len(labels))
        return self.db.execute(
            "SELECT DISTINCT f.id, f.kev_date_added FROM doc_facts f JOIN doc_product p ON "
            f"p.id = f.id WHERE f.kev = 1 AND p.label IN ({marks}) ORDER BY f.kev_date_added "
            "DESC, f.id DESC", labels).fetchall()

    def top_epss_ids(self, cwe: str, month: str | None, limit: int) -> list[tuple[str, float]]:
        """(id, EPSS) of indexed CVEs with this CWE (published in month "YYYY-MM" if given), by
        EPSS, highest first."""
        sql = ("SELECT f.id, f.epss FROM doc_facts f JOIN doc_cwe c ON c.id = f.id WHERE c.cwe = ?"
               " AND f.epss >= 0")
        args: list = [cwe]
        if month:
            sql += " AND f.published LIKE ?"
            args.append(month + "%")
        return self.db.execute(sql + " ORDER BY f.epss DESC, f.id LIMIT ?", [*args, limit]).fetchall()

    def ids_with_cwe(self, cwe: str, limit: int) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM doc_cwe WHERE cwe = ? LIMIT ?",
                                              (cwe, limit))]

    def ids_with_product(self, labels: list[str], limit: int) -> list[str]:
        marks = ",".join("?" * len(labels))
        return [r[0] for r in self.db.execute(
            f"SELECT DISTINCT id FROM doc_product WHERE label IN ({marks}) LIMIT ?",
            [*labels, limit])]

    def as_of(self) -> str:
        """The catalog's date: the newest EPSS score date, else the newest feed date."""
        row = self.db.execute("SELECT MAX(feed_date) FROM feeds WHERE kind='epss'").fetchone()
        if not row[0]:
            row = self.db.execute("SELECT MAX(feed_date) FROM feeds").fetchone()
        return (row[0] or "")[:10]
