"""Import an OGB node-property dataset from its on-disk layout (as OGB downloads and unpacks it).

Two layouts exist, and both are read:

```
ogbn_arxiv/ (and products, ...)          ogbn_papers100M/
  raw/edge.csv.gz        src,dst          raw/data.npz        edge_index (2, E), node_feat (N, D),
  raw/node-feat.csv.gz   D floats/row                         num_nodes_list
  raw/node-label.csv.gz  one label/row    raw/node-label.npz  node_label (N, 1), NaN = unlabelled
  raw/num-node-list.csv.gz
  split/<scheme>/{train,valid,test}.csv.gz   (both: one node id per line)
```

Features are streamed in row chunks (papers100M's are 56 GB as float32), straight into the raw
feature file. The topology is built in memory: about 16 bytes per stored edge at peak (3.2 B
stored edges for papers100M made undirected: about 52 GB; use a machine that has it). Unlabelled
nodes get label -1 and are never in a split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tiergnn.data import FEATURE_FILE, Dataset, Meta, write_meta, write_topology

_CHUNK_ROWS = 1 << 18


def import_ogb(source: str | os.PathLike, out: str | os.PathLike, feat_dtype: str = "float32",
               undirected: bool = True, progress: bool = True) -> Dataset:
    """Convert `source` (an OGB dataset directory holding raw/ and split/) into `out`."""
    src, root = Path(source), Path(out)
    raw = src / "raw"
    if (raw / "data.npz").exists():
        reader = _NpzLayout(raw)
    elif (raw / "edge.csv.gz").exists():
        reader = _CsvLayout(raw)
    else:
        raise FileNotFoundError(f"{raw} holds neither data.npz (papers100M) nor edge.csv.gz "
                                f"(arxiv, products): is {src} an OGB node-property dataset?")
    root.mkdir(parents=True, exist_ok=True)
    num_nodes = reader.num_nodes()
    src_ids, dst_ids = reader.edges()
    if undirected:
        src_ids, dst_ids = np.concatenate([src_ids, dst_ids]), np.concatenate([dst_ids, src_ids])
    keep = src_ids != dst_ids
    num_edges = write_topology(root, src_ids[keep], dst_ids[keep], num_nodes)
    del src_ids, dst_ids, keep
    labels = reader.labels()
    np.save(root / "labels.npy", labels)
    feat_dim = 0
    np_dtype = np.dtype(feat_dtype)
    with open(root / FEATURE_FILE, "wb") as f:
        bar = tqdm(total=num_nodes, desc="features", unit="rows", disable=not progress)
        for chunk in reader.feature_chunks():
            feat_dim = chunk.shape[1]
            f.write(np.ascontiguousarray(chunk, dtype=np_dtype).tobytes())
            bar.update(len(chunk))
        bar.close()
    _write_split(src / "split", root)
    classes = int(labels.max()) + 1 if (labels >= 0).any() else 0
    write_meta(root, Meta(num_nodes=num_nodes, num_edges=num_edges, feat_dim=feat_dim,
                          feat_dtype=feat_dtype, num_classes=classes,
                          source=f"import_ogb({src.name}, undirected={undirected})"))
    return Dataset.open(root)


def _write_split(split_root: Path, root: Path) -> None:
    schemes = sorted(p for p in split_root.iterdir() if p.is_dir()) if split_root.exists() else []
    if not schemes:
        raise FileNotFoundError(f"{split_root} has no split scheme directory (time/, "
                                f"sales_ranking/, ...)")
    parts = {name: np.loadtxt(schemes[0] / f"{name}.csv.gz", dtype=np.int64, ndmin=1)
             for name in ("train", "valid", "test")}
    np.savez(root / "split.npz", **{k: np.sort(v) for k, v in parts.items()})


class _CsvLayout:
    def __init__(self, raw: Path):
        self.raw = raw

    def num_nodes(self) -> int:
        return int(np.loadtxt(self.raw / "num-node-list.csv.gz", dtype=np.int64, ndmin=1)[0])

    def edges(self):
        import pandas as pd
        table = pd.read_csv(self.raw / "edge.csv.gz", header=None, dtype=np.int64).to_numpy()
        return table[:, 0], table[:, 1]

    def labels(self) -> np.ndarray:
        import pandas as pd
        values = pd.read_csv(self.raw / "node-label.csv.gz", header=None).to_numpy()[:, 0]
        return _labels(values)

    def feature_chunks(self):
        import pandas as pd
        for chunk in pd.read_csv(self.raw / "node-feat.csv.gz", header=None, dtype=np.float32,
                                 chunksize=_CHUNK_ROWS):
            yield chunk.to_numpy()


class _NpzLayout:
    def __init__(self, raw: Path):
        self.path = raw / "data.npz"
        self.label_path = raw / "node-label.npz"

    def num_nodes(self) -> int:
        with np.load(self.path) as data:
            return int(np.asarray(data["num_nodes_list"]).reshape(-1)[0])

    def edges(self):
        with np.load(self.path) as data:
            edge_index = data["edge_index"]
        return edge_index[0], edge_index[1]

    def labels(self) -> np.ndarray:
        with np.load(self.label_path) as data:
            return _labels(data["node_label"].reshape(-1))

    def feature_chunks(self):
        """`node_feat` row chunks, read from the (possibly compressed) zip member as a stream."""
        with zipfile.ZipFile(self.path) as archive, archive.open("node_feat.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(member)
            if fortran:
                raise ValueError(f"{self.path}: node_feat is Fortran-ordered; re-save it in C order")
            rows, dim = shape
            row_bytes = dim * dtype.itemsize
            for begin in range(0, rows, _CHUNK_ROWS):
                count = min(_CHUNK_ROWS, rows - begin)
                data = member.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise ValueError(f"{self.path}: node_feat ends at row {begin}, short of "
                                     f"{rows}: the archive is truncated")
                yield np.frombuffer(data, dtype=dtype).reshape(count, dim)


def _labels(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    labels = np.full(len(values), -1, dtype=np.int64)
    known = ~np.isnan(values)
    labels[known] = values[known].astype(np.int64)
    return labels
