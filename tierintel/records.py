"""The records the feeds produce and the catalog stores: CVEs, KEV entries, EPSS scores, CWEs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class FeedError(Exception):
    """A feed could not be read at all (missing, not JSON/CSV/XML, or an unknown schema)."""


class SchemaError(FeedError):
    """A feed declares a schema or format version this reader does not know."""


@dataclass
class Cvss:
    version: str  # "4.0", "3.1", "3.0", "2.0"
    score: float
    severity: str
    vector: str


@dataclass
class CveRecord:
    id: str  # "CVE-2021-44228"
    published: str  # ISO date-time as the feed gives it
    last_modified: str
    description: str
    cwes: list[str] = field(default_factory=list)  # ["CWE-502", ...]
    cvss: list[Cvss] = field(default_factory=list)  # newest version first
    cpes: list[str] = field(default_factory=list)  # vulnerable cpe:2.3 criteria
    references: list[str] = field(default_factory=list)
    status: str = ""  # NVD's vulnStatus (API 2.0 only)
    # CISA KEV fields as NVD's API 2.0 carries them (cisaExploitAdd and the rest); may be empty.
    kev_date_added: str = ""
    kev_due_date: str = ""
    kev_required_action: str = ""
    kev_name: str = ""

    @property
    def products(self) -> list[str]:
        """"vendor:product" of each vulnerable CPE, in first-seen order."""
        seen: dict[str, None] = {}
        for cpe in self.cpes:
            parts = cpe.split(":")
            if len(parts) > 5:
                seen[f"{parts[3]}:{parts[4]}"] = None
        return list(seen)

    @property
    def best_cvss(self) -> Cvss | None:
        return self.cvss[0] if self.cvss else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CveRecord:
        data = dict(data)
        data["cvss"] = [Cvss(**c) for c in data.get("cvss", [])]
        return cls(**data)


@dataclass
class KevEntry:
    cve_id: str
    vendor: str
    product: str
    name: str
    date_added: str
    short_description: str
    required_action: str
    due_date: str
    ransomware: str  # "Known" or "Unknown"
    notes: str = ""
    cwes: list[str] = field(default_factory=list)


@dataclass
class EpssScore:
    cve_id: str
    epss: float  # probability of exploitation activity in the next 30 days
    percentile: float


@dataclass
class CweEntry:
    id: str  # "CWE-79"
    name: str
    kind: str  # "Weakness" or "Category"
    abstraction: str  # Pillar, Class, Base, Variant, Compound ("" for categories)
    status: str
    description: str
    # (nature, "CWE-n") pairs: ChildOf, ParentOf, CanPrecede, CanFollow, PeerOf, CanAlsoBe, Requires,
    # StartsWith; categories list their members as ("HasMember", id).
    related: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FeedBatch:
    """What one feed file (or API page) gave: its records, plus what was skipped and why."""

    source: str  # path or URL
    kind: str  # "nvd", "kev", "epss", "cwe"
    records: list = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few reasons for skips
    feed_date: str = ""  # the feed's own date (NVD timestamp, KEV dateReleased, EPSS score_date)
    version: str = ""  # NVD format version, KEV catalogVersion, EPSS model_version, CWE version

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < 10:
            self.problems.append(reason)
