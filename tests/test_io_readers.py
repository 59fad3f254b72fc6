"""Streaming readers (embcomp._readers) and seeded sampling (embcomp.batch.sample_vectors)."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcomp.batch import iter_blocks, open_sources, sample_vectors
from embcomp.cli import main, sample_rows
from embcomp.exceptions import DimensionMismatchError, InputError
from embcomp.io import write_fvecs


def fixed_list(X: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])


def write_inputs(directory, X: np.ndarray) -> dict[str, object]:
    """The same vectors in every supported format."""
    paths = {
        "npy": directory / "x.npy",
        "npy16": directory / "x16.npy",
        "fvecs": directory / "x.fvecs",
        "parquet": directory / "x.parquet",
        "parquet_list": directory / "xl.parquet",
        "hdf5": directory / "x.hdf5",
    }
    np.save(paths["npy"], X)
    np.save(paths["npy16"], X.astype(np.float64))
    write_fvecs(paths["fvecs"], X)
    ids = pa.array([f"doc-{i}" for i in range(X.shape[0])])
    pq.write_table(
        pa.table({"doc": ids, "emb": fixed_list(X)}), paths["parquet"], row_group_size=111
    )
    pq.write_table(
        pa.table({"doc": ids, "emb": pa.array(list(X), type=pa.list_(pa.float32()))}),
        paths["parquet_list"],
        row_group_size=250,
    )
    with h5py.File(paths["hdf5"], "w") as handle:
        handle["train"] = X
        handle["test"] = X[:5]
    return paths


@pytest.fixture()
def X(rng_data):
    return rng_data


@pytest.fixture()
def inputs(tmp_path, X):
    return write_inputs(tmp_path, X)


@pytest.mark.parametrize("fmt", ["npy", "npy16", "fvecs", "parquet", "parquet_list", "hdf5"])
@pytest.mark.parametrize("block_rows", [7, 100, 10_000])
def test_every_format_streams_the_same_rows(inputs, X, fmt, block_rows):
    id_column = "doc" if fmt.startswith("parquet") else None
    blocks = list(
        iter_blocks(inputs[fmt], block_rows=block_rows, column="emb", id_column=id_column)
    )
    data = np.concatenate([b.data for b in blocks])
    assert data.dtype == np.float32 and data.shape == X.shape
    np.testing.assert_array_equal(data, X)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in blocks]), np.arange(len(X)))
    assert all(b.data.shape[0] <= block_rows for b in blocks)
    if fmt.startswith("parquet"):
        ids = pa.concat_arrays([b.ids for b in blocks]).to_pylist()
        assert ids == [f"doc-{i}" for i in range(len(X))]
    else:
        assert all(b.ids is None for b in blocks)


def test_directory_of_shards_has_global_rows_in_name_order(tmp_path, X):
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "b.npy", X[200:])
    np.save(shards / "a.npy", X[:200])
    (shards / "_SUCCESS").write_text("")
    (shards / ".a.npy.tmp").write_text("junk")
    sources = open_sources(shards)
    assert [s.path.name for s in sources] == ["a.npy", "b.npy"]
    assert [s.offset for s in sources] == [0, 200]
    blocks = list(iter_blocks(shards, block_rows=64))
    np.testing.assert_array_equal(np.concatenate([b.data for b in blocks]), X)
    np.testing.assert_array_equal(
        np.concatenate([b.global_rows for b in blocks]), np.arange(len(X))
    )


def test_row_range_of_a_parquet_file_follows_row_groups(inputs, X):
    (source,) = open_sources(inputs["parquet"], column="emb")
    ranges = source.split(300)
    assert ranges[0] == (0, 333) and ranges[-1][1] == len(X)  # groups of 111 rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    part = np.concatenate([b.data for b in source.iter_blocks(50, 333, 555)])
    np.testing.assert_array_equal(part, X[333:555])


def test_bad_parquet_rows_fail_with_file_and_row_or_are_skipped(tmp_path, X):
    rows = [list(map(float, x)) for x in X[:10]]
    rows[3] = None
    rows[6] = rows[6][:-1]
    rows[8] = [float("nan")] + rows[8][1:]
    path = tmp_path / "bad.parquet"
    table = pa.table(
        {"id": pa.array(range(10)), "emb": pa.array(rows, type=pa.list_(pa.float32()))}
    )
    pq.write_table(table, path)
    with pytest.raises(InputError, match=r"bad.parquet: row 3 \(id 3\) is null"):
        list(iter_blocks(path, id_column="id"))
    blocks = list(iter_blocks(path, id_column="id", on_bad_row="skip"))
    bad = [b for block in blocks for b in block.bad]
    assert [(b.row, b.reason) for b in bad] == [
        (3, "is null (no vector)"),
        (6, "has 47 values, expected 48"),
        (8, "contains NaN, inf or null values"),
    ]
    kept = np.concatenate([b.data for b in blocks])
    np.testing.assert_array_equal(kept, X[[0, 1, 2, 4, 5, 7, 9]])
    assert pa.concat_arrays([b.ids for b in blocks]).to_pylist() == [0, 1, 2, 4, 5, 7, 9]


def test_null_values_inside_a_fixed_size_list_count_as_bad(tmp_path, X):
    values = pa.array(
        [None if i == 48 * 2 + 5 else float(v) for i, v in enumerate(X[:4].reshape(-1))],
        type=pa.float32(),
    )
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"emb": pa.FixedSizeListArray.from_arrays(values, 48)}), path)
    with pytest.raises(InputError, match="nulls.parquet: row 2 contains NaN, inf or null"):
        list(iter_blocks(path))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p, X: p.write_bytes(b""), "not a readable .npy"),
        (lambda p, X: np.save(p, X.astype(np.int32)), "expected float16/32/64"),
        (lambda p, X: np.save(p, X[0]), "expected a 2-D"),
    ],
)
def test_unusable_npy_files_are_clear_errors(tmp_path, X, make, message):
    path = tmp_path / "v.npy"
    make(path, X)
    with pytest.raises(InputError, match=message):
        open_sources(path)


def test_truncated_npy_names_the_first_incomplete_row(tmp_path, X):
    path = tmp_path / "cut.npy"
    np.save(path, X)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 48 * 4 * 10 - 7])
    with pytest.raises(InputError, match=r"cut.npy is truncated.*row 589 is the first incomplete"):
        open_sources(path)


def test_missing_column_dataset_and_file_are_clear_errors(inputs, tmp_path):
    with pytest.raises(InputError, match=r"no column 'vec'; columns are \['doc', 'emb'\]"):
        open_sources(inputs["parquet"], column="vec")
    with pytest.raises(InputError, match=r"no dataset 'base'; it has \['test', 'train'\]"):
        open_sources(inputs["hdf5"], dataset="base")
    with pytest.raises(InputError, match="does not exist"):
        open_sources(tmp_path / "nope.npy")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        open_sources(tmp_path / "a.txt")
    with pytest.raises(InputError, match="no id column 'key'"):
        open_sources(inputs["parquet"], id_column="key")


def _failing(original, exc):
    """``original`` (a generator method) raising ``exc`` at its first item."""

    def method(self, *args, **kwargs):
        for _ in original(self, *args, **kwargs):
            raise exc
        yield  # pragma: no cover

    return method


@pytest.mark.parametrize(
    "exc,message,corrupt",
    [
        (pa.ArrowInvalid("Couldn't deserialize thrift"), "cannot read rows 0-", True),
        (OSError("Unexpected end of stream"), "cannot read rows 0-", True),
        (pa.ArrowNotImplementedError("Unsupported encoding: LZ9"), "does not support", False),
        (FileNotFoundError(2, "No such file"), "cannot read .*: No such file or directory", False),
        (PermissionError(13, "denied"), "cannot read .*: Permission denied", False),
    ],
    ids=["invalid", "io", "not-implemented", "missing", "permission"],
)
def test_only_data_that_does_not_decode_is_called_corrupt(
    inputs, monkeypatch, exc, message, corrupt
):
    """Every pyarrow error and OSError was 'the file is corrupt or truncated': a missing
    or unreadable file, or a feature this pyarrow lacks, was reported as damage."""
    (source,) = open_sources(inputs["parquet"], column="emb")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", _failing(pq.ParquetFile.iter_batches, exc))
    with pytest.raises(InputError, match=message) as caught:
        list(source.iter_blocks(100))
    text = str(caught.value)
    assert str(inputs["parquet"]) in text and "\n" not in text
    assert ("corrupt or truncated" in text) == corrupt


def test_out_of_memory_while_reading_keeps_its_own_error(inputs, monkeypatch):
    (source,) = open_sources(inputs["parquet"], column="emb")
    oom = pa.ArrowMemoryError("malloc of size 1073741824 failed")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", _failing(pq.ParquetFile.iter_batches, oom))
    with pytest.raises(MemoryError, match="malloc of size 1073741824 failed") as caught:
        list(source.iter_blocks(100))
    assert not isinstance(caught.value, InputError)
    monkeypatch.setattr(pq, "read_metadata", lambda path: (_ for _ in ()).throw(oom))
    with pytest.raises(MemoryError, match="malloc"):
        open_sources(inputs["parquet"], column="emb")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_a_file_gone_before_it_is_read_is_named_missing_not_corrupt(inputs, fmt):
    (source,) = open_sources(inputs[fmt], column="emb")
    inputs[fmt].unlink()
    with pytest.raises(InputError) as caught:
        list(source.iter_blocks(100))
    assert str(caught.value) == f"cannot read {inputs[fmt]}: No such file or directory"


def test_ambiguous_embedding_column_asks_for_column(tmp_path, X):
    path = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": fixed_list(X), "b": fixed_list(X[:, :8])}), path)
    with pytest.raises(InputError, match="pass --column"):
        open_sources(path)
    (source,) = open_sources(path, column="b")
    assert source.width == 8
    with pytest.raises(DimensionMismatchError, match="column 'b': rows have 8 dims"):
        source.check_width(48, "the codec")


def test_missing_pyarrow_names_the_extra(inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InputError, match=r"pip install 'embcomp\[parquet\]'"):
        open_sources(inputs["parquet"])


# -- sampling --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "fvecs", "parquet", "parquet_list", "hdf5"])
def test_sample_is_the_same_uniform_sample_in_every_format(inputs, X, fmt):
    sample, total = sample_vectors(inputs[fmt], 50, seed=3, column="emb")
    assert total == len(X) and sample.shape == (50, 48) and sample.dtype == np.float32
    # Same rows as the in-memory sampler embcomp fit has always used.
    np.testing.assert_array_equal(sample, sample_rows(X, 50, seed=3))


def test_sample_across_shards_equals_sample_of_the_whole(tmp_path, X):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, start in enumerate(range(0, len(X), 170)):
        np.save(shards / f"part-{i}.npy", X[start : start + 170])
    sample, total = sample_vectors(shards, 77, seed=11)
    assert total == len(X)
    np.testing.assert_array_equal(sample, sample_rows(X, 77, seed=11))
    assert not np.array_equal(sample, sample_vectors(shards, 77, seed=12)[0])


def test_sample_larger_than_input_returns_everything(inputs, X):
    sample, total = sample_vectors(inputs["parquet"], 10_000, column="emb")
    np.testing.assert_array_equal(sample, X)
    sample, _ = sample_vectors(inputs["npy"], None)
    np.testing.assert_array_equal(sample, X)


def test_sample_rejects_bad_sampled_rows_and_bad_sizes(tmp_path, X):
    bad = X.copy()
    bad[:, 0] = np.nan  # every row bad, so any sample hits one
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match=r"nan.npy: row \d+ contains NaN"):
        sample_vectors(tmp_path / "nan.npy", 10)
    with pytest.raises(InputError, match="--sample must be >= 1"):
        sample_vectors(tmp_path / "nan.npy", 0)


def test_fit_reads_parquet_and_hdf5_with_a_streamed_sample(inputs, tmp_path, X, capsys):
    out = tmp_path / "p.codec"
    args = ["fit", "--spec", "pca8,int8", "--train", str(inputs["parquet"]), "-o", str(out)]
    assert main([*args, "--column", "emb", "--sample", "200", "--seed", "5"]) == 0
    assert "on 200 x 48 (sampled from 600)" in capsys.readouterr().out
    h5_codec = tmp_path / "h.codec"
    assert (
        main(
            ["fit", "--spec", "pca8,int8", "--train", str(inputs["hdf5"]), "-o", str(h5_codec)]
            + ["--sample", "200", "--seed", "5"]
        )
        == 0
    )
    assert out.read_bytes() == h5_codec.read_bytes()  # same rows, same fit, same bytes
    assert main([*args[:-2], "-o", str(tmp_path / "x.codec"), "--column", "doc"]) == 2
    assert "column 'doc' has type string" in capsys.readouterr().err


def test_sampled_rows_read_without_whole_row_groups_or_mapped_files(tmp_path, monkeypatch):
    """fit --sample: .npy rows come by positioned reads (a memory map kept 64 KiB per
    touched row resident: 3.6 GB for a 4 GB file) and a Parquet row group of 1M rows
    is read in blocks, not as one 1.5 GB batch."""
    from embcomp import _readers

    X = np.random.default_rng(0).standard_normal((5000, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 24)
    pq.write_table(pa.table({"emb": emb}), tmp_path / "x.parquet", row_group_size=5000)
    rows = np.array([0, 7, 4095, 4096, 4999])
    monkeypatch.setattr(_readers, "block_rows_for", lambda width, *a: 1024)
    sizes = spy_parquet_block_rows(monkeypatch)
    monkeypatch.setattr(np, "memmap", None)  # no memory map for the .npy
    for name in ("x.npy", "x.parquet"):
        (source,) = open_sources(tmp_path / name)
        np.testing.assert_array_equal(source.read_rows(rows), X[rows])
    assert sizes == [1024]


def test_a_list_column_is_read_in_bounded_blocks_without_a_width_given(tmp_path, monkeypatch):
    """fit --sample and iter_blocks give no width: a list<float> column's width was
    unknown, blocks were sized for 1-float rows (~8M rows) and a whole row group was
    one block (peak memory grew with the row group: 611/942/1151 MB for 50k/100k/200k
    rows of 384-d). Now the usual row length is read when the file is opened."""
    from embcomp import _readers

    X = np.random.default_rng(0).standard_normal((5000, 24)).astype(np.float32)
    emb = pa.array(list(X), type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": emb}), tmp_path / "x.parquet", row_group_size=5000)
    # blocks of 64 Ki floats, so that the test's row group is many blocks
    monkeypatch.setattr(_readers, "block_rows_for", lambda width, *a: max(1, 65536 // width))
    sizes = spy_parquet_block_rows(monkeypatch)
    sample, total = sample_vectors(tmp_path / "x.parquet", 100, seed=3)
    assert total == 5000 and sample.shape == (100, 24)
    blocks = list(iter_blocks(tmp_path / "x.parquet"))
    assert max(b.data.shape[0] for b in blocks) <= 65536 // 24
    np.testing.assert_array_equal(np.concatenate([b.data for b in blocks]), X)
    assert sizes and max(sizes) <= 65536 // 24


def spy_parquet_block_rows(monkeypatch):
    """A list that collects the block_rows of every Parquet read."""
    from embcomp import _readers

    sizes = []
    real_read = _readers.ParquetSource._read

    def read(self, start, stop, block_rows):
        sizes.append(block_rows)
        return real_read(self, start, stop, block_rows)

    monkeypatch.setattr(_readers.ParquetSource, "_read", read)
    return sizes
