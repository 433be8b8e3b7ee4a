"""OGB's two on-disk layouts import into the same dataset."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from tiergnn.ogb import import_ogb


def _ogb_graph(seed=0, n=50, e=200, d=6):
    rng = np.random.default_rng(seed)
    edges = rng.integers(0, n, (e, 2))
    feats = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(np.float64)
    labels[::7] = np.nan                                  # unlabelled, as in papers100M
    split = {"train": np.arange(0, 20), "valid": np.arange(20, 30), "test": np.arange(30, 45)}
    return edges, feats, labels, split


def _write_split(root, split):
    (root / "split" / "time").mkdir(parents=True)
    for name, ids in split.items():
        with gzip.open(root / "split" / "time" / f"{name}.csv.gz", "wt") as f:
            f.write("".join(f"{i}\n" for i in ids))


def _write_csv_layout(root, edges, feats, labels, split):
    raw = root / "raw"
    raw.mkdir(parents=True)
    for name, rows in (("edge", edges), ("node-feat", feats)):
        with gzip.open(raw / f"{name}.csv.gz", "wt") as f:
            f.write("".join(",".join(map(repr if name == "node-feat" else str, r.tolist())) + "\n"
                            for r in rows))
    with gzip.open(raw / "node-label.csv.gz", "wt") as f:
        f.write("".join(("nan" if np.isnan(v) else str(int(v))) + "\n" for v in labels))
    with gzip.open(raw / "num-node-list.csv.gz", "wt") as f:
        f.write(f"{len(feats)}\n")
    _write_split(root, split)


def _write_npz_layout(root, edges, feats, labels, split):
    raw = root / "raw"
    raw.mkdir(parents=True)
    np.savez_compressed(raw / "data.npz", edge_index=edges.T.copy(), node_feat=feats,
                        num_nodes_list=np.array([len(feats)]), num_edges_list=np.array([len(edges)]))
    np.savez_compressed(raw / "node-label.npz", node_label=labels.reshape(-1, 1))
    _write_split(root, split)


@pytest.mark.parametrize("layout", [_write_csv_layout, _write_npz_layout])
def test_both_layouts_import_to_the_same_graph(tmp_path, layout):
    edges, feats, labels, split = _ogb_graph()
    layout(tmp_path / "ogb", edges, feats, labels, split)
    ds = import_ogb(tmp_path / "ogb", tmp_path / "out", progress=False)
    n = len(feats)
    assert np.array_equal(ds.load_features(), feats)
    expected = {(int(s), int(d)) for s, d in edges if s != d}
    expected |= {(d, s) for s, d in expected}                  # made undirected
    dst = np.repeat(np.arange(n), ds.degrees())
    assert set(zip(np.asarray(ds.indices).tolist(), dst.tolist())) == expected
    assert np.array_equal(ds.labels, np.where(np.isnan(labels), -1, labels).astype(np.int64))
    assert np.array_equal(ds.split("valid"), split["valid"])
    assert ds.meta.num_classes == 3 and ds.meta.feat_dim == 6


def test_a_directory_without_ogb_files_is_named(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="data.npz.*edge.csv.gz"):
        import_ogb(tmp_path, tmp_path / "out")
