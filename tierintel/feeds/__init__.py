"""Feed readers: NVD CVE API 2.0 pages and NVD 1.1 JSON feeds, CISA KEV JSON, FIRST EPSS CSV and the
CWE catalog XML, each turning a file's bytes into a ``FeedBatch`` of records."""

from tierintel.feeds.cwe import parse_cwe_xml
from tierintel.feeds.epss import parse_epss_csv
from tierintel.feeds.kev import parse_kev_json
from tierintel.feeds.nvd import parse_nvd_json

__all__ = ["parse_cwe_xml", "parse_epss_csv", "parse_kev_json", "parse_nvd_json"]
