"""Shared fixtures: the shipped fixture mirror ingested once into a temporary data directory (real
MiniLM embeddings, a real Milvus Lite file), and a copy of the mirror tests may edit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tierintel.app import App, Settings
from tierintel.fetch import Sources
from tierintel.ingest import Ingestor

MIRROR = Path(__file__).parents[2] / "tierintel" / "fixtures" / "mirror"
DEAD = "http://127.0.0.1:9/v1"  # nothing listens on the discard port


@pytest.fixture(scope="session")
def tierserve(tiny_llama_dir):
    """A real tierserve server on a tiny random Llama, served as "tiny"."""
    from tests.server.conftest import ServerProcess

    server = ServerProcess(tiny_llama_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedder():
    from tierintel.embed import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def intel(tmp_path_factory, embedder):
    """An App over the fixture mirror, ingested; base_url points nowhere until a test sets it."""
    app = App(Settings(data=tmp_path_factory.mktemp("intel"), base_url=DEAD))
    app._embedder = embedder
    report = Ingestor(app.catalog, app.index, embedder).run(Sources(mirror=MIRROR))
    assert report.docs_indexed == 42 + 21 and not report.files_failed
    return app


@pytest.fixture
def mirror_copy(tmp_path) -> Path:
    return Path(shutil.copytree(MIRROR, tmp_path / "mirror"))


class HashEmbedder:
    """A bag of hashed words (384 dimensions, unit length): a fast stand-in where a test checks
    ingestion bookkeeping, not retrieval quality (those tests use the real MiniLM)."""

    name, dim = "hashed-words (tests)", 384

    def encode(self, texts: list[str], progress: bool = False) -> list[list[float]]:
        import hashlib
        import math

        out = []
        for text in texts:
            vector = [0.0] * self.dim
            for word in text.lower().split():
                vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            out.append([v / norm for v in vector])
        return out
