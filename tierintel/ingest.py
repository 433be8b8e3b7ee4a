"""Ingestion: read the feeds into the catalog (incremental and idempotent), then bring the index up
to date with the three-call step: ``schedule`` (which stale documents), ``execute`` (embed them and
upsert into Milvus) and ``update`` (record them as indexed)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from tierintel.catalog import Catalog, Change
from tierintel.feeds import parse_cwe_xml, parse_epss_csv, parse_kev_json, parse_nvd_json
from tierintel.fetch import FeedFile, Sources
from tierintel.records import FeedError, SchemaError

log = logging.getLogger("tierintel.ingest")
PARSERS = {"nvd": parse_nvd_json, "kev": parse_kev_json, "epss": parse_epss_csv,
           "cwe": parse_cwe_xml}


@dataclass
class IngestPlan:
    docs: list[dict]  # documents to embed and upsert in this step


@dataclass
class IngestResult:
    vectors: list[list[float]]
    seconds: float
    embedded: int = 0  # documents run through the model (the rest reused their vectors)


@dataclass
class IngestReport:
    changes: list[Change] = field(default_factory=list)
    files_unchanged: int = 0  # byte-identical to a file already ingested
    files_failed: list[tuple[str, str]] = field(default_factory=list)  # unreadable: skipped
    schema_errors: list[tuple[str, str]] = field(default_factory=list)  # not applied
    records_skipped: int = 0  # malformed records inside otherwise good files
    docs_indexed: int = 0
    docs_embedded: int = 0
    feed_seconds: float = 0.0
    index_seconds: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.docs_indexed / self.index_seconds if self.index_seconds else 0.0

    def summary(self) -> dict:
        total = {k: sum(getattr(c, k) for c in self.changes)
                 for k in ("added", "updated", "unchanged", "removed")}
        return {**total, "files_read": len(self.changes), "files_unchanged": self.files_unchanged,
                "files_failed": len(self.files_failed), "schema_errors": len(self.schema_errors),
                "records_skipped": self.records_skipped, "docs_indexed": self.docs_indexed,
                "docs_embedded": self.docs_embedded,
                "feed_seconds": round(self.feed_seconds, 3),
                "index_seconds": round(self.index_seconds, 3),
                "docs_per_s": round(self.docs_per_s, 1)}


class Ingestor:
    def __init__(self, catalog: Catalog, index, embedder, batch_size: int = 128,
                 progress: bool = False) -> None:
        self.catalog, self.index, self.embedder = catalog, index, embedder
        self.batch_size, self.progress = batch_size, progress
        self._pending: list[dict] = []
        self._bar = None

    # -- feeds -> catalog --------------------------------------------------------------------------
    def read_feeds(self, sources: Sources, report: IngestReport) -> None:
        start = time.perf_counter()
        for feed in sources.files():
            self._read_one(feed, report)
        report.feed_seconds += time.perf_counter() - start

    def _read_one(self, feed: FeedFile, report: IngestReport) -> None:
        if feed.data is None:
            report.files_failed.append((feed.source, feed.error))
            log.warning("skipped %s: %s", feed.source, feed.error)
            return
        if self.catalog.seen_unchanged(feed.source, feed.data):
            report.files_unchanged += 1
            return
        try:
            batch = PARSERS[feed.kind](feed.data, feed.source)
        except SchemaError as e:
            report.schema_errors.append((feed.source, str(e)))
            self.catalog.log(Change(feed.kind, feed.source, notes=[f"schema error: {e}"]))
            log.error("%s", e)
            return
        except FeedError as e:
            report.files_failed.append((feed.source, str(e)))
            self.catalog.log(Change(feed.kind, feed.source, skipped=1, notes=[f"unreadable: {e}"]))
            log.warning("skipped %s", e)
            return
        change = self.catalog.apply(batch, feed.data)
        report.records_skipped += batch.skipped
        report.changes.append(change)
        log.info("%s %s: +%d ~%d =%d -%d, %d skipped", feed.kind, feed.source, change.added,
                 change.updated, change.unchanged, change.removed, change.skipped)

    # -- catalog -> index: the step ----------------------------------------------------------------
    def plan_all(self) -> int:
        vanished = self.catalog.vanished_ids()
        if vanished:  # e.g. a CVE known only from KEV that left the KEV catalog
            self.index.delete(vanished)
            self.catalog.forget(vanished)
            log.info("removed %d documents whose records are gone", len(vanished))
        self._pending = self.catalog.stale_documents()
        if self.progress and self._pending:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self._pending), desc="embedding", unit="doc")
        return len(self._pending)

    def schedule(self) -> IngestPlan | None:
        if not self._pending:
            return None
        docs, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size:]
        return IngestPlan(docs)

    def execute(self, plan: IngestPlan) -> IngestResult:
        """Embed the documents whose text changed; the others keep their stored vectors."""
        start = time.perf_counter()
        stored = self.index.vectors([d["id"] for d in plan.docs if d.get("reuse_vector")])
        fresh = [d for d in plan.docs if d["id"] not in stored]
        encoded = dict(zip((d["id"] for d in fresh),
                           self.embedder.encode([d["text"] for d in fresh]) if fresh else []))
        vectors = [stored.get(d["id"]) or encoded[d["id"]] for d in plan.docs]
        self.index.upsert(plan.docs, vectors)
        return IngestResult(vectors, time.perf_counter() - start, embedded=len(fresh))

    def update(self, plan: IngestPlan, result: IngestResult, report: IngestReport) -> None:
        self.catalog.mark_indexed(plan.docs)
        report.docs_indexed += len(plan.docs)
        report.docs_embedded += result.embedded
        report.index_seconds += result.seconds
        if self._bar is not None:
            self._bar.update(len(plan.docs))

    def run(self, sources: Sources) -> IngestReport:
        report = IngestReport()
        self.read_feeds(sources, report)
        self.plan_all()
        while (plan := self.schedule()) is not None:
            self.update(plan, self.execute(plan), report)
        if self._bar is not None:
            self._bar.close()
        if report.docs_indexed:
            self.index.flush()
        return report
