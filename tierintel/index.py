"""The vector index: Milvus (Milvus Lite in a local file by default, a Milvus server by URI), with a
``cve`` collection (one record per CVE: vector, CWE/product arrays, EPSS, KEV and dates as scalar
fields, the whole document as JSON) and a ``cwe`` collection."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("tierintel.index")

MAX_ARRAY = 64  # CPE-derived arrays are capped (Milvus arrays have a fixed capacity)


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(value)


class IndexError_(RuntimeError):
    """The index on disk does not fit the embedding model (size or name)."""


def drop_collections(uri: str, token: str | None = None, prefix: str = "tierintel") -> None:
    """Remove the index's collections without opening them (what --reindex needs when the old
    index does not fit the new model)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from pymilvus import MilvusClient

    client = MilvusClient(uri, token=token or "")
    for kind in ("cve", "cwe"):
        if client.has_collection(f"{prefix}_{kind}"):
            client.drop_collection(f"{prefix}_{kind}")
    client.close()


class Index:
    def __init__(self, uri: str, dim: int, embedding_name: str, token: str | None = None,
                 prefix: str = "tierintel") -> None:
        # grpc's C core prints "too_many_pings" GOAWAYs from Milvus Lite's server as errors; the
        # client reconnects by itself, and real failures still raise from pymilvus.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from pymilvus import MilvusClient

        # Milvus Lite answers pymilvus's AllocTimestamp probe with "not implemented" and the client
        # falls back; grpc logs that as an error with a traceback on every write.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        self.uri, self.dim, self.embedding_name = uri, dim, embedding_name
        self.client = MilvusClient(uri, token=token or "")
        self.cve, self.cwe = f"{prefix}_cve", f"{prefix}_cwe"
        for name in (self.cve, self.cwe):
            if not self.client.has_collection(name):
                self._create(name)
            else:
                self._check(name)
                self.client.load_collection(name)  # a reopened collection starts released

    def _create(self, name: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=f"embedding={self.embedding_name}")
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=32)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        if name == self.cve:
            for field in ("cwes", "products", "product_names"):
                schema.add_field(field, DataType.ARRAY, element_type=DataType.VARCHAR,
                                 max_capacity=MAX_ARRAY, max_length=256)
            schema.add_field("published", DataType.VARCHAR, max_length=10)
            schema.add_field("kev_date_added", DataType.VARCHAR, max_length=10)
            for field in ("epss", "percentile", "cvss"):
                schema.add_field(field, DataType.DOUBLE)
            schema.add_field("kev", DataType.BOOL)
        schema.add_field("doc", DataType.JSON)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="COSINE")
        self.client.create_collection(name, schema=schema, index_params=params)
        log.info("created Milvus collection %s at %s", name, self.uri)

    def _check(self, name: str) -> None:
        info = self.client.describe_collection(name)
        dims = [f.get("params", {}).get("dim") for f in info["fields"] if f["name"] == "vector"]
        if dims and int(dims[0]) != self.dim:
            raise IndexError_(f"collection {name} at {self.uri} holds {dims[0]}-dimensional vectors "
                              f"but the embedding model gives {self.dim}: ingest with --reindex")
        built_by = info.get("description", "")
        if built_by.startswith("embedding=") and built_by != f"embedding={self.embedding_name}":
            raise IndexError_(f"collection {name} at {self.uri} was built with "
                              f"{built_by[len('embedding='):]}, not {self.embedding_name}: ingest "
                              "with --reindex (vectors of two models do not compare)")

    def upsert(self, docs: list[dict], vectors: list[list[float]]) -> None:
        for kind, name in (("cve", self.cve), ("cwe", self.cwe)):
            rows = [self._row(d, v) for d, v in zip(docs, vectors) if d["kind"] == kind]
            if rows:
                self.client.upsert(name, rows)

    @staticmethod
    def _row(doc: dict, vector: list[float]) -> dict:
        doc = {k: v for k, v in doc.items() if k not in ("reuse_vector", "text_hash")}
        row = {"id": doc["id"], "vector": vector, "doc": doc}
        if doc["kind"] == "cve":
            row |= {k: doc[k][:MAX_ARRAY] for k in ("cwes", "products", "product_names")}
            row |= {k: doc[k] for k in ("published", "kev_date_added", "epss", "percentile",
                                        "cvss", "kev")}
        return row

    def flush(self) -> None:
        """Seal what was written (Milvus Lite searches freshly inserted rows 10x slower until then:
        190 ms against 16 ms at 5,000 CVEs)."""
        for name in (self.cve, self.cwe):
            self.client.flush(name)

    def _by_collection(self, ids: list[str]):
        """(collection, its ids) for the CVE and CWE ids among ``ids``, skipping empty ones."""
        for name, prefix in ((self.cve, "CVE-"), (self.cwe, "CWE-")):
            wanted = [i for i in ids if i.startswith(prefix)]
            if wanted:
                yield name, wanted

    def _fetch(self, ids: list[str], field: str) -> dict:
        return {r["id"]: r[field] for name, wanted in self._by_collection(ids)
                for r in self.client.get(name, ids=wanted, output_fields=[field])}

    def vectors(self, ids: list[str]) -> dict[str, list[float]]:
        """The stored vectors of these documents (those the index has)."""
        return {i: list(v) for i, v in self._fetch(ids, "vector").items()}

    def get(self, ids: list[str]) -> dict[str, dict]:
        return self._fetch(ids, "doc")

    def delete(self, ids: list[str]) -> None:
        for name, wanted in self._by_collection(ids):
            self.client.delete(name, ids=wanted)

    def query(self, expr: str, limit: int = 1000) -> list[dict]:
        rows = self.client.query(self.cve, filter=expr, output_fields=["doc"], limit=limit)
        return [r["doc"] for r in rows]

    def search(self, vector: list[float], kind: str = "cve", expr: str = "",
               limit: int = 5) -> list[tuple[dict, float]]:
        name = self.cve if kind == "cve" else self.cwe
        hits = self.client.search(name, data=[vector], filter=expr, limit=limit,
                                  output_fields=["doc"])[0]
        return [(h["entity"]["doc"], float(h["distance"])) for h in hits]

    def count(self) -> dict[str, int]:
        return {kind: int(self.client.get_collection_stats(name)["row_count"])
                for kind, name in (("cve", self.cve), ("cwe", self.cwe))}

    def close(self) -> None:
        self.client.close()
