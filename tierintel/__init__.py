"""tierintel: threat intelligence with retrieval-augmented generation. It owns the feeds (NVD, CISA
KEV, FIRST EPSS, CWE), the catalog and Milvus index built from them, and grounded answers written by
any OpenAI-compatible endpoint (tierserve by default); it talks to tierserve over HTTP only and
imports nothing from it."""

__version__ = "0.1.0"
