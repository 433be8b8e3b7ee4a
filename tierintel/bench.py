"""``tierintel bench``: ingestion throughput at a chosen scale. It writes N CVEs in the NVD API 2.0
format (variants of the fixture records under new ids, with KEV and EPSS entries for them) into a
temporary mirror, ingests it twice (the second run must change nothing), then times retrieval on
the resulting index."""

from __future__ import annotations

import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from tierintel.fixtures import make_fixtures as fx


def write_mirror(root: Path, records: int, seed: int = 0, page_size: int = 2000) -> None:
    rng = random.Random(seed)
    table = fx.rows()
    rows = []
    for n in range(records):
        row = copy.deepcopy(table[n % len(table)])
        row["id"] = f"CVE-2027-{100000 + n}"
        row["published"] = f"2027-{1 + n % 12:02d}-{1 + n % 28:02d}T10:00:00.000"
        row["epss"] = round(rng.random() ** 3, 5)
        row["percentile"] = round(rng.random(), 5)
        row["description"] = f"{row['description']} (variant {n})"
        row["kev"] = ("2027-06-01", "2027-06-22", "Unknown") if rng.random() < 0.05 else None
        rows.append(row)
    for start in range(0, len(rows), page_size):
        page = rows[start:start + page_size]
        doc = {"resultsPerPage": len(page), "startIndex": start, "totalResults": len(rows),
               "format": "NVD_CVE", "version": "2.0", "timestamp": "2027-12-01T00:00:00.000",
               "vulnerabilities": [fx.api_cve(r) for r in page]}
        fx._write(root / "nvd" / "api" / f"page-{start // page_size:04d}.json",
                  json.dumps(doc).encode())
    fx._write(root / "kev" / "kev.json", json.dumps(fx.kev_catalog(rows)).encode())
    fx._write(root / "epss" / "epss_scores-2027-12-01.csv", fx.epss_csv(rows))
    fx._write(root / "cwe" / "cwec_excerpt.xml", fx.cwe_excerpt())


def run(records: int, embedding_model: str | None = None, queries: int = 200,
        embedder=None) -> dict:
    from tierintel.app import App, Settings
    from tierintel.fetch import Sources
    from tierintel.ingest import Ingestor

    with tempfile.TemporaryDirectory(prefix="tierintel-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_mirror(root / "mirror", records)
        written = time.perf_counter() - start
        settings = Settings(data=root / "data")
        if embedding_model:
            settings.embedding_model = embedding_model
        app = App(settings)
        app._embedder = embedder or app.embedder
        ingestor = Ingestor(app.catalog, app.index, app.embedder, progress=True)
        first = ingestor.run(Sources(mirror=root / "mirror"))
        start = time.perf_counter()
        again = Ingestor(app.catalog, app.index, app.embedder).run(Sources(mirror=root / "mirror"))
        rerun_s = time.perf_counter() - start
        retriever = app.retriever()
        rng = random.Random(1)
        asks = [rng.choice([f"What is CVE-2027-{100000 + rng.randrange(records)}?",
                            "Which KEV entries affect Northwind Gateway?",
                            "Top EPSS CVEs for CWE-79 in March 2027?",
                            "SQL injection in a file sharing web application"])
                for _ in range(queries)]
        latencies = []
        for question in asks:
            t = time.perf_counter()
            retriever.retrieve(question)
            latencies.append(time.perf_counter() - t)
        latencies.sort()
        return {"records": records, "mirror_write_s": round(written, 2),
                "first": first.summary(), "rerun": {**again.summary(), "seconds": round(rerun_s, 2)},
                "feed_records_per_s": round(sum(c.added + c.updated + c.unchanged
                                                for c in first.changes) / first.feed_seconds, 1),
                "retrieval": {"queries": queries,
                              "p50_ms": round(1000 * statistics.median(latencies), 1),
                              "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                              "queries_per_s": round(queries / sum(latencies), 1)}}
