"""The on-disk graph format (CSC topology, a raw feature file) and its seeded power-law generator.

A dataset is a directory::

    meta.json       num_nodes, num_edges, feat_dim, feat_dtype, num_classes, format version
    indptr.npy      (num_nodes + 1,) int64: in-edges of node v are indices[indptr[v]:indptr[v+1]]
    indices.npy     (num_edges,) int32/int64: source node of each in-edge, grouped by destination
    labels.npy      (num_nodes,) int64
    split.npz       train / valid / test node ids (int64)
    features.bin    (num_nodes, feat_dim) rows, row-major, no header: the storage tier, read by row

The topology is small next to the features and is memory-mapped whole; the features are what does
not fit and are read through `tiergnn.storage`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

FORMAT_VERSION = 1
FEATURE_FILE = "features.bin"
_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(slots=True)
class Meta:
    """What `meta.json` records about a dataset."""

    num_nodes: int
    num_edges: int
    feat_dim: int
    feat_dtype: str
    num_classes: int
    version: int = FORMAT_VERSION
    source: str = ""

    def __post_init__(self) -> None:
        if self.feat_dtype not in _DTYPES:
            raise ValueError(f"feat_dtype {self.feat_dtype!r}: expected one of {sorted(_DTYPES)}")
        if self.num_nodes <= 0 or self.feat_dim <= 0:
            raise ValueError("a dataset needs at least one node and one feature dimension")

    @property
    def row_bytes(self) -> int:
        return self.feat_dim * np.dtype(_DTYPES[self.feat_dtype]).itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.feat_dtype])


class Dataset:
    """An opened dataset directory: topology memory-mapped, features left on storage."""

    def __init__(self, root: Path, meta: Meta):
        self.root = root
        self.meta = meta
        self.indptr = np.load(root / "indptr.npy", mmap_mode="r")
        self.indices = np.load(root / "indices.npy", mmap_mode="r")
        self.labels = np.load(root / "labels.npy", mmap_mode="r")
        if len(self.indptr) != meta.num_nodes + 1 or len(self.indices) != meta.num_edges:
            raise ValueError(f"{root}: indptr/indices do not match meta.json "
                             f"({len(self.indptr) - 1} nodes, {len(self.indices)} edges on disk; "
                             f"{meta.num_nodes} and {meta.num_edges} recorded)")

    @classmethod
    def open(cls, root: str | os.PathLike) -> Dataset:
        """Open a dataset written by `generate` or `tiergnn.ogb.import_ogb`; checks the sizes."""
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{root} has no meta.json: make one with `tiergnn gen {root}` "
                                    f"or `tiergnn import-ogb <ogb dir> {root}`")
        meta = Meta(**json.loads(meta_path.read_text()))
        if meta.version != FORMAT_VERSION:
            raise ValueError(f"{root}: format version {meta.version}; this tiergnn reads "
                             f"{FORMAT_VERSION} (regenerate it)")
        return cls(root, meta)

    @property
    def feature_path(self) -> Path:
        return self.root / FEATURE_FILE

    def split(self, name: str) -> np.ndarray:
        """Node ids of the 'train', 'valid' or 'test' split."""
        with np.load(self.root / "split.npz") as splits:
            if name not in splits:
                raise KeyError(f"no split {name!r}; this dataset has {sorted(splits.files)}")
            return splits[name]

    def degrees(self) -> np.ndarray:
        """In-degree of every node (the static importance score's default)."""
        return np.diff(np.asarray(self.indptr))

    def load_features(self) -> np.ndarray:
        """All features in memory (for small graphs and reference runs only)."""
        return np.fromfile(self.feature_path, dtype=self.meta.np_dtype).reshape(
            self.meta.num_nodes, self.meta.feat_dim)


def write_topology(root: Path, src: np.ndarray, dst: np.ndarray, num_nodes: int) -> int:
    """Write CSC (grouped by destination, sources sorted, duplicates dropped); returns #edges."""
    key = dst.astype(np.int64) * num_nodes + src
    key.sort()                                  # by (dst, src); numpy's SIMD sort, in place
    # NOTE: not np.unique: numpy 2.4's hash-based unique took 66 s on 40M keys here, sort 0.7 s.
    keep = np.empty(len(key), dtype=bool)
    keep[:1] = True
    np.not_equal(key[1:], key[:-1], out=keep[1:])
    key = key[keep]
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(key // num_nodes, minlength=num_nodes), out=indptr[1:])
    index_dtype = np.int32 if num_nodes < 2**31 else np.int64
    np.save(root / "indptr.npy", indptr)
    np.save(root / "indices.npy", (key % num_nodes).astype(index_dtype))
    return len(key)


def write_meta(root: Path, meta: Meta) -> None:
    (root / "meta.json").write_text(json.dumps(asdict(meta), indent=1) + "\n")


def _power_law_index(rng: np.random.Generator, sizes: np.ndarray, gamma: float) -> np.ndarray:
    # floor(size * u**gamma): the head of each community is hot, a power-law-like degree tail.
    u = rng.random(len(sizes), dtype=np.float64)
    return np.minimum((sizes * u**gamma).astype(np.int64), sizes - 1)


def generate(out_dir: str | os.PathLike, num_nodes: int = 100_000, avg_degree: float = 20.0,
             feat_dim: int = 128, feat_dtype: str = "float16", num_classes: int = 16,
             homophily: float = 0.8, gamma: float = 2.5, signal: float = 1.5,
             train_frac: float = 0.1, valid_frac: float = 0.05, test_frac: float = 0.05,
             seed: int = 0, progress: bool = True) -> Dataset:
    """Write a seeded power-law graph with community-correlated features and labels.

    Each node belongs to one of `num_classes` communities (its label). An undirected edge picks a
    source community uniformly, a node in it with power-law skew (`gamma`: larger is more skewed),
    and a destination in the same community with probability `homophily`, else anywhere. Features
    are the community's random centroid scaled so that centroids sit `signal` noise-standard
    deviations apart, plus unit Gaussian noise: one node's features say little about its label, its
    neighbourhood says much, so a GNN beats an MLP. Node ids are shuffled, so ids carry no locality.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    classes = num_classes
    starts = (np.arange(classes + 1, dtype=np.int64) * num_nodes + classes - 1) // classes
    sizes = np.diff(starts)
    members = rng.permutation(num_nodes)            # position in community order -> node id
    labels = np.empty(num_nodes, dtype=np.int64)
    labels[members] = np.repeat(np.arange(classes), sizes)

    num_undirected = int(num_nodes * avg_degree / 2)
    chunk = 4_000_000
    src_parts, dst_parts = [], []
    bar = tqdm(total=num_undirected, desc="edges", unit="e", unit_scale=True, disable=not progress)
    for begin in range(0, num_undirected, chunk):
        count = min(chunk, num_undirected - begin)
        src_comm = rng.integers(0, classes, count)
        same = rng.random(count) < homophily
        dst_comm = np.where(same, src_comm, rng.integers(0, classes, count))
        src = members[starts[src_comm] + _power_law_index(rng, sizes[src_comm], gamma)]
        dst = members[starts[dst_comm] + _power_law_index(rng, sizes[dst_comm], gamma)]
        keep = src != dst
        src_parts.append(src[keep])
        dst_parts.append(dst[keep])
        bar.update(count)
    bar.close()
    src = np.concatenate(src_parts)
    dst = np.concatenate(dst_parts)
    del src_parts, dst_parts
    num_edges = write_topology(root, np.concatenate([src, dst]), np.concatenate([dst, src]),
                               num_nodes)
    del src, dst
    np.save(root / "labels.npy", labels)
    _write_split(root, rng, num_nodes, train_frac, valid_frac, test_frac)

    _write_features(root, labels, classes, feat_dim, feat_dtype, signal, seed, progress)
    meta = Meta(num_nodes=num_nodes, num_edges=num_edges, feat_dim=feat_dim, feat_dtype=feat_dtype,
                num_classes=classes,
                source=f"generate(seed={seed}, avg_degree={avg_degree}, homophily={homophily}, "
                       f"gamma={gamma}, signal={signal}) in {time.perf_counter() - started:.1f} s")
    write_meta(root, meta)
    return Dataset.open(root)


def _write_features(root: Path, labels: np.ndarray, classes: int, feat_dim: int, feat_dtype: str,
                    signal: float, seed: int, progress: bool) -> None:
    import torch  # torch's multithreaded randn and casts are ~4x numpy's here

    gen = torch.Generator().manual_seed(seed)
    centroids = torch.randn(classes, feat_dim, generator=gen) * (signal / math.sqrt(2 * feat_dim))
    torch_dtype = getattr(torch, feat_dtype)
    labels_t = torch.from_numpy(np.ascontiguousarray(labels))
    rows_per_chunk = max(1, (64 << 20) // (feat_dim * 4))
    with open(root / FEATURE_FILE, "wb") as f:
        for begin in tqdm(range(0, len(labels), rows_per_chunk), desc="features",
                          disable=not progress):
            end = min(len(labels), begin + rows_per_chunk)
            x = torch.randn(end - begin, feat_dim, generator=gen)   # (rows, feat_dim) noise
            x += centroids[labels_t[begin:end]]
            f.write(x.to(torch_dtype).numpy().tobytes())


def _write_split(root: Path, rng: np.random.Generator, num_nodes: int, train: float,
                 valid: float, test: float) -> None:
    if train + valid + test > 1 or min(train, valid, test) < 0:
        raise ValueError("split fractions must be non-negative and sum to at most 1")
    order = rng.permutation(num_nodes)
    n_train, n_valid, n_test = (int(num_nodes * f) for f in (train, valid, test))
    np.savez(root / "split.npz", train=np.sort(order[:n_train]),
             valid=np.sort(order[n_train:n_train + n_valid]),
             test=np.sort(order[n_train + n_valid:n_train + n_valid + n_test]))
