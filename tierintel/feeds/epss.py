"""FIRST EPSS scores CSV (epss_scores-YYYY-MM-DD.csv[.gz]): a ``#model_version:...,score_date:...``
line, then ``cve,epss,percentile``."""

from __future__ import annotations

from tierintel.records import EpssScore, FeedBatch, FeedError, SchemaError

HEADER = ["cve", "epss", "percentile"]


def parse_epss_csv(data: bytes | str, source: str = "") -> FeedBatch:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise FeedError(f"{source}: not UTF-8 text ({e})") from None
    lines = text.splitlines()
    meta = {}
    while lines and lines[0].startswith("#"):
        for part in lines.pop(0)[1:].split(","):
            key, _, value = part.partition(":")
            meta[key.strip()] = value.strip()
    if not lines:
        raise FeedError(f"{source}: empty EPSS file")
    header = [h.strip() for h in lines[0].split(",")]
    if header != HEADER:
        raise SchemaError(f"{source}: EPSS header is {header}; this reader knows {HEADER}")
    batch = FeedBatch(source, "epss", feed_date=meta.get("score_date", ""),
                      version=meta.get("model_version", ""))
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            cve, epss, percentile = line.split(",")
            score = EpssScore(cve.strip(), float(epss), float(percentile))
            if not score.cve_id.startswith("CVE-") or not (0 <= score.epss <= 1
                                                          and 0 <= score.percentile <= 1):
                raise ValueError("id or score out of range")
            batch.records.append(score)
        except ValueError as e:
            batch.skip(f"line {number}: {line[:60]!r}: {e}")
    return batch
