"""The generator and the on-disk format: determinism, CSC shape, learnable labels, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiergnn.data import Dataset, generate
from tiergnn.storage import FeatureStorage, StorageError


def test_generate_is_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", num_nodes=500, avg_degree=6, feat_dim=8, seed=3, progress=False)
    b = generate(tmp_path / "b", num_nodes=500, avg_degree=6, feat_dim=8, seed=3, progress=False)
    c = generate(tmp_path / "c", num_nodes=500, avg_degree=6, feat_dim=8, seed=4, progress=False)
    assert a.feature_path.read_bytes() == b.feature_path.read_bytes()
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.labels, c.labels)


def test_csc_is_sorted_deduplicated_and_symmetric(small_graph):
    indptr, indices = np.asarray(small_graph.indptr), np.asarray(small_graph.indices)
    n = small_graph.meta.num_nodes
    dst = np.repeat(np.arange(n), np.diff(indptr))
    key = dst.astype(np.int64) * n + indices
    assert np.all(np.diff(key) > 0)                       # sorted by (dst, src), no duplicates
    assert not np.any(dst == indices)                     # no self loops
    reverse = np.sort(indices.astype(np.int64) * n + dst)
    assert np.array_equal(reverse, key)                   # every edge has its reverse
    assert small_graph.meta.num_edges == len(indices)


def test_labels_follow_communities_and_degrees_are_skewed(small_graph):
    labels = np.asarray(small_graph.labels)
    dst = np.repeat(np.arange(len(labels)), small_graph.degrees())
    same = np.mean(labels[dst] == labels[np.asarray(small_graph.indices)])
    assert same > 0.6                  # homophily 0.8 by construction; 1/4 at random
    degree = small_graph.degrees()
    assert degree.max() > 8 * np.median(degree)


def test_split_is_disjoint(small_graph):
    parts = [set(small_graph.split(name)) for name in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts))
    with pytest.raises(KeyError, match="no split 'dev'"):
        small_graph.split("dev")


def test_truncated_feature_file_is_refused_with_the_fix(tmp_path):
    ds = generate(tmp_path / "t", num_nodes=100, avg_degree=4, feat_dim=8, progress=False)
    data = ds.feature_path.read_bytes()
    ds.feature_path.write_bytes(data[:-7])
    with pytest.raises(StorageError, match="truncated.*tiergnn gen"):
        FeatureStorage(Dataset.open(ds.root))


def test_missing_or_mismatched_metadata_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiergnn gen"):
        Dataset.open(tmp_path / "nothing")
    ds = generate(tmp_path / "m", num_nodes=100, avg_degree=4, feat_dim=8, progress=False)
    meta = json.loads((ds.root / "meta.json").read_text())
    meta["num_nodes"] = 101
    (ds.root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match meta.json"):
        Dataset.open(ds.root)
