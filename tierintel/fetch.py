"""Where feed bytes come from: a local mirror directory (no network) or the feeds' URLs, including the
NVD CVE API 2.0's paging (startIndex/resultsPerPage) and its lastModified window for updates."""

from __future__ import annotations

import gzip
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tierintel.fetch")

NVD_API = "https://services.nvd.nist.gov/rest/json/cves/2.0"
KEV_URL = "https://www.cisa.gov/sites/default/files/feeds/known_exploited_vulnerabilities.json"
EPSS_URL = "https://epss.empiricalsecurity.com/epss_scores-current.csv.gz"
KINDS = ("cwe", "nvd", "kev", "epss")  # ingestion order: CVEs before the feeds that annotate them


@dataclass
class FeedFile:
    kind: str  # one of KINDS
    source: str  # path or URL, as the change log names it
    data: bytes | None  # None: the file could not be read (error says why)
    error: str = ""
    status: int = 0  # the HTTP status of a failed request, when there was one


@dataclass
class Sources:
    """What to ingest: a mirror directory, and/or URLs per feed (a URL wins over the mirror)."""

    mirror: Path | None = None
    nvd_url: str | None = None
    kev_url: str | None = None
    epss_url: str | None = None
    cwe_path: Path | None = None  # a cwec_v*.xml; "bundled" in the CLI means cwe2's copy
    nvd_api_key: str | None = None
    last_mod_start: str | None = None  # NVD API window (ISO), for an incremental pull
    last_mod_end: str | None = None  # split into NVD's 120-day maximum windows
    page_size: int = 2000
    timeout_s: float = 60.0
    # NVD allows 5 requests per 30 s without an API key and 50 with one; 403/429/503 are retried.
    page_pause_s: float | None = None  # default: 6.5 s without a key, 0.7 s with one
    retries: int = 4
    _client: object | None = field(default=None, repr=False)

    def files(self) -> Iterator[FeedFile]:
        """Every feed file to read, CWE first, then NVD, KEV and EPSS."""
        for kind in KINDS:
            url = {"nvd": self.nvd_url, "kev": self.kev_url, "epss": self.epss_url}.get(kind)
            if kind == "cwe" and self.cwe_path is not None:
                yield _read_file("cwe", self.cwe_path)
            elif kind == "nvd" and url:
                yield from self._nvd_pages(url)
            elif url:
                yield self._get(kind, url)
            elif self.mirror is not None:
                for path in _mirror_files(self.mirror / kind, kind):
                    yield _read_file(kind, path)

    def _http(self):
        if self._client is None:
            import httpx

            headers = {"apiKey": self.nvd_api_key} if self.nvd_api_key else {}
            self._client = httpx.Client(timeout=self.timeout_s, headers=headers,
                                        follow_redirects=True)
        return self._client

    def _get(self, kind: str, url: str, params: dict | None = None) -> FeedFile:
        import httpx

        try:
            response = self._http().get(url, params=params)
            response.raise_for_status()
        except httpx.HTTPStatusError as e:
            return FeedFile(kind, url, None, f"HTTP {e.response.status_code}: {e}",
                            e.response.status_code)
        except httpx.HTTPError as e:
            return FeedFile(kind, url, None, f"{type(e).__name__}: {e}")
        data = response.content
        try:
            return FeedFile(kind, str(response.url), _gunzip(data) if url.endswith(".gz") else data)
        except (OSError, EOFError, zlib.error) as e:
            return FeedFile(kind, str(response.url), None, f"{type(e).__name__}: {e}")

    def _nvd_pages(self, url: str) -> Iterator[FeedFile]:
        if self.last_mod_start and self.last_mod_end:
            for n, (first, last) in enumerate(windows(self.last_mod_start, self.last_mod_end)):
                yield from self._nvd_window(url, {"lastModStartDate": first,
                                                  "lastModEndDate": last}, paced=n > 0)
        else:
            yield from self._nvd_window(url, {})

    def _nvd_window(self, url: str, window: dict, paced: bool = False) -> Iterator[FeedFile]:
        """The pages of one lastModified window; ``paced``: a request came before this window."""
        import json

        start, total = 0, None
        while total is None or start < total:
            params = {"startIndex": start, "resultsPerPage": self.page_size} | window
            if start or paced:
                time.sleep(self.page_pause_s if self.page_pause_s is not None else
                           (0.7 if self.nvd_api_key else 6.5))
            for attempt in range(self.retries + 1):
                page = self._get("nvd", url, params)
                if page.status not in (403, 429, 503) or attempt == self.retries:
                    break
                log.warning("NVD API refused page %d (%s); retry %d", start, page.error,
                            attempt + 1)
                time.sleep(min(60.0, 6.0 * 2 ** attempt))
            yield page
            if page.data is None:
                return
            try:
                doc = json.loads(page.data)
                total, got = int(doc["totalResults"]), len(doc["vulnerabilities"])
            except (ValueError, KeyError, TypeError):
                return  # the reader reports what is wrong with this page
            log.info("NVD API: %d-%d of %d", start, start + got, total)
            if got == 0:
                return
            start += got


def windows(first: str, last: str, days: int = 120) -> list[tuple[str, str]]:
    """[first, last] cut into consecutive windows of at most ``days`` (the NVD API refuses a
    lastModified range over 120 days)."""
    from datetime import datetime, timedelta

    form = "%Y-%m-%dT%H:%M:%S.%f"
    begin, end = datetime.strptime(first, form), datetime.strptime(last, form)
    out = []
    while begin < end:
        stop = min(end, begin + timedelta(days=days))
        out.append((begin.strftime(form)[:-3], stop.strftime(form)[:-3]))
        begin = stop
    return out


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _mirror_files(folder: Path, kind: str) -> list[Path]:
    suffixes = {"nvd": (".json", ".json.gz"), "kev": (".json",), "epss": (".csv", ".csv.gz"),
                "cwe": (".xml",)}[kind]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def _read_file(kind: str, path: Path) -> FeedFile:
    try:
        return FeedFile(kind, str(path), _gunzip(Path(path).read_bytes()))
    except (OSError, EOFError, zlib.error) as e:
        return FeedFile(kind, str(path), None, f"{type(e).__name__}: {e}")
