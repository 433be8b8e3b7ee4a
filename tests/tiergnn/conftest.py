"""Fixtures: small generated graphs on disk (seeded, a second or less to write)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_graph(tmp_path_factory):
    """3,000 nodes, 32 float16 dims: big enough for skew and caching, small enough for a dense
    reference."""
    from tiergnn.data import generate

    return generate(tmp_path_factory.mktemp("g3k"), num_nodes=3000, avg_degree=8, feat_dim=32,
                    num_classes=4, train_frac=0.5, valid_frac=0.1, test_frac=0.4, seed=1,
                    progress=False)
