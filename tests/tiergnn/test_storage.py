"""The storage tier reads exactly the rows asked for, counts its bytes, and refuses bad ids."""

from __future__ import annotations

import numpy as np
import pytest

from tiergnn.storage import FeatureStorage


@pytest.fixture(params=["native", "python"])
def reader(request, monkeypatch):
    """Both read paths: the C batch reader, and the Python thread pool (no compiler)."""
    from tiergnn import storage

    if request.param == "python":
        monkeypatch.setattr(storage, "_NATIVE", [None])
    elif storage._native_reader() is None:
        pytest.skip("no C compiler here")
    return request.param


def test_reads_equal_the_file_rows_in_any_order_with_duplicates(small_graph, reader):
    full = small_graph.load_features()
    storage = FeatureStorage(small_graph, io_threads=3)
    rng = np.random.default_rng(0)
    for ids in ([0], [2999], [5, 3, 4, 4, 2998], rng.integers(0, 3000, 700),
                np.arange(100, 400)):
        assert np.array_equal(storage.read(np.asarray(ids)), full[ids])
    storage.close()


def test_consecutive_rows_coalesce_into_one_read(small_graph, reader):
    storage = FeatureStorage(small_graph)
    storage.read(np.arange(10, 60))
    storage.read(np.array([1, 3, 5]))
    assert storage.stats.reads == 1 + 3
    assert storage.stats.bytes_read == 53 * small_graph.meta.row_bytes
    storage.close()


def test_out_of_range_ids_raise(small_graph):
    storage = FeatureStorage(small_graph)
    with pytest.raises(IndexError, match=r"\[0, 3000\)"):
        storage.read(np.array([1, 3000]))
    storage.close()


def test_drop_page_cache_keeps_reads_correct(small_graph):
    storage = FeatureStorage(small_graph)
    storage.drop_page_cache()
    assert np.array_equal(storage.read(np.array([7, 8])), small_graph.load_features()[[7, 8]])
    storage.close()


def test_rows_of_512_bytes_are_read_with_direct_io(tmp_path, reader):
    from tiergnn.data import generate

    ds = generate(tmp_path / "d", num_nodes=300, avg_degree=4, feat_dim=256, progress=False)
    storage = FeatureStorage(ds)
    if not storage.direct:                              # 256 float16 dims: 512-byte rows
        pytest.skip(f"the filesystem under {tmp_path} refuses O_DIRECT (tmpfs?)")
    ids = np.array([299, 0, 5, 6, 7, 150])
    assert np.array_equal(storage.read(ids), ds.load_features()[ids])
    storage.close()


def test_direct_io_on_unaligned_rows_is_refused(small_graph):
    from tiergnn.storage import StorageError

    with pytest.raises(StorageError, match="multiple of 512"):
        FeatureStorage(small_graph, direct=True)


def test_a_file_shortened_under_a_run_is_an_error_not_garbage(tmp_path, reader):
    from tiergnn.data import generate
    from tiergnn.storage import StorageError

    ds = generate(tmp_path / "s", num_nodes=200, avg_degree=4, feat_dim=8, progress=False)
    storage = FeatureStorage(ds)                        # opened while the file was whole
    with open(ds.feature_path, "r+b") as f:
        f.truncate(150 * ds.meta.row_bytes)
    with pytest.raises(StorageError, match="short read at row 150"):
        storage.read(np.arange(100, 200))
    storage.close()
