"""The application object the CLI and the web page share: a data directory (catalog + Milvus Lite
file, or a Milvus server by URI), the embedder, the retriever and the answerer."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tierintel.answer import Answer, Answerer
from tierintel.catalog import Catalog
from tierintel.embed import DEFAULT_MODEL

DEFAULT_DATA = Path(os.environ.get("TIERINTEL_DATA", Path.home() / ".cache" / "tierintel"))
DEFAULT_BASE_URL = os.environ.get("TIERINTEL_BASE_URL", "http://127.0.0.1:8000/v1")


@dataclass
class Settings:
    data: Path = DEFAULT_DATA
    index_uri: str | None = None  # default: <data>/milvus.db (Milvus Lite)
    index_token: str | None = None
    embedding_model: str = DEFAULT_MODEL
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # default: the endpoint's first model
    api_key: str = os.environ.get("OPENAI_API_KEY", "none")
    structured: bool = True
    max_tokens: int = 160
    max_answer_chars: int | None = 500
    max_prompt_chars: int = 6000


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(settings.data / "catalog.sqlite")
        self._index = self._embedder = self._answerer = None
        self._lock = threading.Lock()  # the index and embedder are built once, on first use

    @property
    def index_uri(self) -> str:
        return self.settings.index_uri or str(self.settings.data / "milvus.db")

    @property
    def embedder(self):
        with self._lock:
            if self._embedder is None:
                from tierintel.embed import Embedder

                self._embedder = Embedder(self.settings.embedding_model)
            return self._embedder

    @property
    def index(self):
        embedder = self.embedder
        with self._lock:
            if self._index is None:
                from tierintel.index import Index, IndexError_

                built_by = self.catalog.meta("embedding_model")
                if built_by is not None and built_by != embedder.name:
                    raise IndexError_(f"the index in {self.settings.data} was built with "
                                      f"{built_by}, not {embedder.name}: ingest with --reindex "
                                      "(vectors of two models do not compare)")
                self._index = Index(self.index_uri, embedder.dim, embedder.name,
                                    token=self.settings.index_token)
                self.catalog.set_meta("embedding_model", embedder.name)
            return self._index

    @property
    def answerer(self) -> Answerer:
        with self._lock:
            if self._answerer is None:
                s = self.settings
                answerer = Answerer(s.base_url, s.model or "", s.api_key, s.max_tokens,
                                    s.structured, max_answer_chars=s.max_answer_chars,
                                    max_prompt_chars=s.max_prompt_chars)
                if not s.model:
                    answerer.model = answerer.first_model()
                self._answerer = answerer
            return self._answerer

    def retriever(self):
        from tierintel.retrieve import Retriever

        return Retriever(self.index, self.embedder, self.catalog)

    def ask(self, question: str, today: str | None = None) -> Answer:
        question = question.strip()
        if not question:
            raise ValueError("the question is empty")
        if len(question) > 2000:
            raise ValueError(f"the question is {len(question)} characters; the limit is 2000")
        retrieval = self.retriever().retrieve(question, today=today)
        return self.answerer.answer(question, retrieval)

    def status(self) -> dict:
        counts = self.catalog.counts()
        feeds = {kind: self.catalog.feed_state(kind) for kind in ("nvd", "kev", "epss", "cwe")}
        freshness = {kind: {"files": len(rows), "newest_feed_date": max(
            (r["feed_date"] for r in rows), default=""), "last_ingested": max(
            (r["ingested_at"] for r in rows), default=None), "version": rows[-1]["version"]
            if rows else ""} for kind, rows in feeds.items()}
        return {"data": str(self.settings.data), "index_uri": self.index_uri, "as_of":
                self.catalog.as_of(), "records": counts, "feeds": freshness,
                "recent_changes": self.catalog.recent_changes(10)}

