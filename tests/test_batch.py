"""The offline batch compressor, local engine: embcomp compress / decompress end to end."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matching import assert_codes_match, assert_vectors_match

import embcomp
from embcomp._blocks import rows_per_block
from embcomp.artifacts import codec_id
from embcomp.batch import compress, decode_rows, decompress, encode_rows, sample_vectors
from embcomp.cli import main
from embcomp.exceptions import ArtifactError, DimensionMismatchError, InputError
from embcomp.io import write_fvecs
from embcomp.sample import load_sample

SPEC = "pca64,int8"


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    """(3000, 384) float32 real all-MiniLM-L6-v2 embeddings (bundled sample)."""
    return load_sample()[0]


@pytest.fixture(scope="module")
def codec(X):
    return embcomp.make_codec(SPEC).fit(X[:1000])


@pytest.fixture()
def codec_file(tmp_path, codec):
    return str(embcomp.save_codec(codec, tmp_path / "c.codec"))


def fixed_list(X: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])


def write_parquet(path, X, *, ids=None, list_type=False, row_group_size=500, **extra):
    emb = pa.array(list(X), type=pa.list_(pa.float32())) if list_type else fixed_list(X)
    columns = {} if ids is None else {"doc_id": pa.array(ids)}
    columns.update(extra)
    columns["emb"] = emb
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def parquet_codes(path) -> tuple[list, np.ndarray]:
    table = pq.read_table(path)
    code = table.column("code").combine_chunks()
    width = code.type.byte_width
    codes = np.frombuffer(code.buffers()[1], np.uint8)[: len(code) * width].reshape(-1, width)
    return table.column(0).to_pylist(), codes


def leftovers(directory) -> list[str]:
    """Temporary files an interrupted write would leave (hidden names)."""
    return sorted(p.name for p in directory.rglob(".*"))


def run(*argv) -> int:
    return main([str(a) for a in argv])


# -- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "fvecs", "hdf5", "parquet", "parquet-list"])
def test_round_trip_per_input_format(tmp_path, X, codec, codec_file, fmt, capsys):
    ids = [f"doc-{i}" for i in range(len(X))]
    if fmt == "npy":
        source, extra = tmp_path / "in.npy", []
        np.save(source, X)
    elif fmt == "fvecs":
        source, extra = tmp_path / "in.fvecs", []
        write_fvecs(source, X)
    elif fmt == "hdf5":
        source, extra = tmp_path / "in.hdf5", ["--dataset", "train"]
        with h5py.File(source, "w") as handle:
            handle["train"], handle["test"] = X, X[:10]
    else:
        source, extra = tmp_path / "in.parquet", ["--column", "emb", "--id-column", "doc_id"]
        write_parquet(source, X, ids=ids, list_type=fmt == "parquet-list")
    parquet = fmt.startswith("parquet")
    codes_path = tmp_path / ("codes.parquet" if parquet else "codes.npy")
    assert run("compress", "-c", codec_file, source, codes_path, "-q", *extra) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"compress: {len(X):,} vectors from 1 file(s)")
    if fmt == "hdf5":  # the dataset read, not the whole file (it holds "test" too)
        assert f"{X.nbytes / 1e6:.2f} MB in" in line
    expected = codec.encode(X)
    if parquet:
        out_ids, codes = parquet_codes(codes_path)
        assert out_ids == ids  # ids carried through
        record = json.loads(pq.read_metadata(codes_path).metadata[b"embcomp"])
    else:
        codes = np.load(codes_path)
        record = json.loads(codes_path.with_name("codes.npy.json").read_text())
    np.testing.assert_array_equal(codes, expected)  # byte-identical to Codec.encode
    assert record["codec_id"] == codec_id(codec) and record["spec"] == SPEC
    assert record["input"]["rows"] == len(X)

    back = tmp_path / ("back.parquet" if parquet else "back.npy")
    assert run("decompress", "-c", codec_file, codes_path, back, "-q") == 0
    if parquet:
        table = pq.read_table(back)
        assert table.schema.names == ["doc_id", "emb"]  # column names as compressed
        assert table.column("doc_id").to_pylist() == ids
        vectors = table.column("emb").combine_chunks().values.to_numpy().reshape(-1, 384)
    else:
        vectors = np.load(back)
    np.testing.assert_array_equal(vectors, codec.decode(expected))
    assert leftovers(tmp_path) == []


def test_npy_input_to_parquet_output_gets_row_ids(tmp_path, X, codec, codec_file):
    np.save(tmp_path / "x.npy", X)
    assert run("compress", "-c", codec_file, tmp_path / "x.npy", tmp_path / "c.parquet", "-q") == 0
    ids, codes = parquet_codes(tmp_path / "c.parquet")
    assert ids == list(range(len(X)))
    np.testing.assert_array_equal(codes, codec.encode(X))


@pytest.mark.parametrize("spec", [SPEC, "pca64,fp32"])
def test_codes_do_not_depend_on_block_size(tmp_path, X, spec):
    """Up to BLAS rounding (tests/matching.py): a row's codes are those of a whole-array
    encode whatever block it is read in, one-row blocks included.

    fp32 codes keep every bit of the reduced vector, so they show any difference.
    """
    codec = embcomp.make_codec(spec).fit(X[:1000])
    np.save(tmp_path / "x.npy", X)
    reference = codec.encode(X)
    assert len(X) % rows_per_block(4 * 384) != 1  # the reference has no one-row block
    singles = np.concatenate([encode_rows(codec, X[i : i + 1]) for i in range(len(X))])
    assert_codes_match(codec, singles, reference)
    decoded = np.concatenate([decode_rows(codec, reference[i : i + 1]) for i in range(300)])
    assert_vectors_match(codec, decoded, codec.decode(reference[:300]))
    # 2999 leaves a last block of one row; 683 a codec-internal remainder of one row.
    for block_rows in (7, 2999, 683):
        out = tmp_path / f"c{block_rows}.npy"
        compress(codec, tmp_path / "x.npy", out, block_rows=block_rows)
        assert_codes_match(codec, np.load(out), reference)


# -- directories and resume ------------------------------------------------------------
def make_shards(directory, X, n_shards=3):
    directory.mkdir()
    bounds = np.linspace(0, len(X), n_shards + 1).astype(int)
    for i in range(n_shards):
        ids = [f"d{j}" for j in range(bounds[i], bounds[i + 1])]
        write_parquet(directory / f"part-{i}.parquet", X[bounds[i] : bounds[i + 1]], ids=ids)
    return bounds


def test_directory_gives_one_output_per_shard_and_resumes(tmp_path, X, codec, codec_file, capsys):
    shards, out = tmp_path / "shards", tmp_path / "codes"
    make_shards(shards, X)
    argv = ["compress", "-c", codec_file, shards, out, "--id-column", "doc_id", "-q"]
    assert run(*argv) == 0
    assert "3,000 vectors from 3 file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i}.parquet" for i in range(3)]
    ids, codes = zip(*(parquet_codes(out / f"part-{i}.parquet") for i in range(3)), strict=True)
    assert sum(ids, []) == [f"d{j}" for j in range(len(X))]
    assert_codes_match(codec, np.concatenate(codes), codec.encode(X))  # per shard vs whole
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # A second run does no work and says so.
    assert run(*argv) == 0
    assert "nothing to do, all 3 output(s) already complete and valid" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # A missing or stale output is redone; complete ones are not.
    (out / "part-1.parquet").unlink()
    write_parquet(shards / "part-2.parquet", X[:10], ids=[f"n{j}" for j in range(10)])
    assert run(*argv) == 0
    line = capsys.readouterr().out
    assert "1,010 vectors from 2 file(s)" in line and "1 output(s) already complete" in line
    assert (out / "part-0.parquet").stat().st_mtime_ns == stamps["part-0.parquet"]
    assert parquet_codes(out / "part-2.parquet")[0] == [f"n{j}" for j in range(10)]

    # Another codec makes every output stale.
    other = embcomp.make_codec("int8").fit(X[:500])
    assert compress(other, shards, out, id_column="doc_id").files_done == 3


def test_resume_checks_npy_outputs_against_their_sidecar(tmp_path, X, codec):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    np.save(shards / "a.npy", X[:1000])
    np.save(shards / "b.npy", X[1000:])
    assert compress(codec, shards, out).files_done == 2
    assert compress(codec, shards, out).files_done == 0
    # A codes file cut short (or not matching its record) is redone.
    data = (out / "b.npy").read_bytes()
    (out / "b.npy").write_bytes(data[:-64])
    report = compress(codec, shards, out)
    assert (report.files_done, report.files_already_complete) == (1, 1)
    np.testing.assert_array_equal(np.load(out / "b.npy"), codec.encode(X[1000:]))
    assert compress(codec, shards, out, overwrite=True).files_done == 2


# -- bad rows --------------------------------------------------------------------------
@pytest.fixture()
def nan_input(tmp_path, X):
    bad = X.copy()
    bad[1234, 7] = np.nan
    bad[2500, 0] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    return tmp_path / "bad.npy"


def test_nan_row_fails_with_file_and_row_and_no_output(tmp_path, nan_input, codec_file, capsys):
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    assert run("compress", "-c", codec_file, nan_input, out, "-q") == 2
    err = capsys.readouterr().err
    assert f"{nan_input}: row 1234 contains NaN" in err and "--on-bad-row skip" in err
    assert err.count("\n") == 1
    assert list(out.parent.iterdir()) == []


def test_nan_rows_skipped_are_counted_and_listed(tmp_path, X, nan_input, codec, codec_file, capsys):
    out = tmp_path / "codes.npy"
    assert run("compress", "-c", codec_file, nan_input, out, "--on-bad-row", "skip", "-q") == 0
    assert "2 bad rows skipped" in capsys.readouterr().out
    keep = np.setdiff1d(np.arange(len(X)), [1234, 2500])
    np.testing.assert_array_equal(np.load(out), codec.encode(X[keep]))
    listed = (tmp_path / "codes.npy.skipped.tsv").read_text().splitlines()
    assert listed[0] == "file\trow\tid\treason"
    assert [line.split("\t")[1] for line in listed[1:]] == ["1234", "2500"]
    assert json.loads((tmp_path / "codes.npy.json").read_text())["result"]["bad_rows"] == 2


def test_bad_parquet_rows_skipped_keep_their_ids(tmp_path, X, codec):
    rows = [list(map(float, x)) for x in X[:100]]
    rows[10], rows[20] = None, rows[20][:100]
    table = pa.table(
        {
            "key": pa.array(range(1000, 1100)),
            "emb": pa.array(rows, type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet: row 10 \(id 1010\) is null"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "o.parquet", id_column="key")
    report = compress(
        codec, tmp_path / "in.parquet", tmp_path / "o.parquet", id_column="key",
        on_bad_row="skip",
    )  # fmt: skip
    assert (report.vectors, report.bad_rows) == (98, 2)
    ids, codes = parquet_codes(tmp_path / "o.parquet")
    keep = [i for i in range(100) if i not in (10, 20)]
    assert ids == [1000 + i for i in keep]
    np.testing.assert_array_equal(codes, codec.encode(X[keep]))
    listed = (tmp_path / "o.parquet.skipped.tsv").read_text()
    assert "\t20\t1020\thas 100 values, expected 384" in listed


def test_failure_in_a_later_shard_keeps_earlier_complete_outputs(tmp_path, X, codec):
    shards, out = tmp_path / "shards", tmp_path / "codes"
    shards.mkdir()
    np.save(shards / "a.npy", X[:1500])
    bad = X[1500:].copy()
    bad[3, 3] = np.nan
    np.save(shards / "b.npy", bad)
    with pytest.raises(InputError, match=r"b.npy: row 3 contains NaN"):
        compress(codec, shards, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "a.npy.json"]
    np.save(shards / "b.npy", X[1500:])  # repaired: the rerun does only b
    report = compress(codec, shards, out)
    assert (report.files_done, report.files_already_complete) == (1, 1)


# -- other failures: clear error, no partial output -----------------------------------
def test_truncated_npy_is_refused_before_writing(tmp_path, X, codec_file, capsys):
    np.save(tmp_path / "x.npy", X)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 3])
    assert run("compress", "-c", codec_file, tmp_path / "cut.npy", tmp_path / "o.npy", "-q") == 2
    assert "cut.npy is truncated" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists() and leftovers(tmp_path) == []


def test_wrong_dimension_column_and_missing_column(tmp_path, X, codec_file, capsys):
    source = tmp_path / "in.parquet"
    write_parquet(source, X[:50], small=fixed_list(X[:50, :128]))
    out = tmp_path / "o.parquet"
    assert run("compress", "-c", codec_file, source, out, "--column", "small", "-q") == 2
    err = capsys.readouterr().err
    assert "column 'small': rows have 128 dims" in err and "expects 384" in err
    assert run("compress", "-c", codec_file, source, out, "--column", "vec", "-q") == 2
    assert "no column 'vec'; columns are ['small', 'emb']" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
    np.save(tmp_path / "narrow.npy", X[:, :100])
    with pytest.raises(DimensionMismatchError, match="rows have 100 dims"):
        compress(embcomp.load_codec(codec_file), tmp_path / "narrow.npy", tmp_path / "n.npy")


def unwritable_directory(tmp_path):
    """A directory this process cannot create files in (root ignores permission bits)."""
    if os.geteuid() == 0:
        return "/sys/kernel"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def test_unwritable_output_directory(tmp_path, X, codec_file, capsys):
    np.save(tmp_path / "x.npy", X[:100])
    target = unwritable_directory(tmp_path)
    assert run("compress", "-c", codec_file, tmp_path / "x.npy", f"{target}/o.npy", "-q") == 2
    assert f"cannot write to output directory '{target}'" in capsys.readouterr().err
    assert run("compress", "-c", codec_file, tmp_path, f"{target}/codes", "-q") == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    assert not os.path.exists(f"{target}/o.npy") and not os.path.exists(f"{target}/codes")


def test_interrupted_write_leaves_no_file_under_the_final_name(tmp_path, X, codec, monkeypatch):
    np.save(tmp_path / "x.npy", X)
    from embcomp.batch import _engine

    calls = {"n": 0}
    real = _engine.transform_block

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(_engine, "transform_block", interrupted)
    for fmt in ("npy", "parquet"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            compress(codec, tmp_path / "x.npy", tmp_path / f"o.{fmt}", block_rows=1000)
        assert not (tmp_path / f"o.{fmt}").exists()
    assert leftovers(tmp_path) == []


def test_option_conflicts_are_clear(tmp_path, X, codec, codec_file):
    write_parquet(tmp_path / "in.parquet", X[:10], ids=list(range(10)))
    with pytest.raises(InputError, match="cannot carry the id column 'doc_id'"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "o.npy", id_column="doc_id")
    with pytest.raises(InputError, match="suffix '.npy' but --format is parquet"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "o.npy", output_format="parquet")
    with pytest.raises(InputError, match="is the input"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "in.parquet")
    with pytest.raises(InputError, match="--block-rows must be >= 1"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "o.parquet", block_rows=0)


def test_decompress_refuses_codes_of_another_codec(tmp_path, X, codec):
    np.save(tmp_path / "x.npy", X[:100])
    compress(codec, tmp_path / "x.npy", tmp_path / "codes.npy")
    other = embcomp.make_codec(SPEC).fit(X[1000:2000])
    with pytest.raises(ArtifactError, match="was encoded with codec"):
        decompress(other, tmp_path / "codes.npy", tmp_path / "back.npy")


def test_progress_bar_and_report(tmp_path, X, codec_file, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", X)
    # not a terminal (a log, a pipe): the report alone, no redrawn bar or clearing codes
    assert run("compress", "-c", codec_file, tmp_path / "x.npy", tmp_path / "p.npy") == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert run("compress", "-c", codec_file, tmp_path / "x.npy", tmp_path / "o.npy") == 0
    captured = capsys.readouterr()
    assert "vec/s" in captured.err  # tqdm: count, rate, ETA
    (line,) = captured.out.splitlines()
    for part in ("3,000 vectors", "MB in ->", "KB out", "x smaller", " s (", "vectors/s"):
        assert part in line


def test_missing_ray_names_the_extra(tmp_path, X, codec_file, monkeypatch, capsys):
    np.save(tmp_path / "x.npy", X[:10])
    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["compress", "-c", codec_file, tmp_path / "x.npy", tmp_path / "o", "--engine", "ray"]
    assert run(*argv) == 2
    assert "pip install 'embcomp[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- never lose data (found by a red-team pass) -----------------------------------------
def test_an_interrupted_rewrite_is_not_decoded_with_either_codec(tmp_path, X, codec):
    """A's codes are complete; a compress with codec B into the same path is killed
    before its data lands: the record says B, in progress, over A's codes. Decoding
    them with B gave errors of 1.7; decompress now refuses until a compress completes."""
    from embcomp.batch import _sinks

    np.save(tmp_path / "x.npy", X[:500])
    out = tmp_path / "out.npy"
    compress(codec, tmp_path / "x.npy", out)
    other = embcomp.make_codec(SPEC).fit(X[1000:2000])
    real = _sinks._sink_file

    @contextlib.contextmanager
    def killed(*args, **kwargs):
        with real(*args, **kwargs) as sink:
            yield sink
            raise KeyboardInterrupt  # killed before the rename

    _sinks._sink_file = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            compress(other, tmp_path / "x.npy", out)
    finally:
        _sinks._sink_file = real
    np.testing.assert_array_equal(np.load(out), codec.encode(X[:500]))  # A's codes
    with pytest.raises(InputError, match="is incomplete"):
        decompress(other, out, tmp_path / "back.npy")
    compress(other, tmp_path / "x.npy", out)  # the rerun completes
    assert decompress(other, out, tmp_path / "back.npy").vectors == 500


def test_a_crash_between_rename_and_record_is_redone_not_trusted(tmp_path, X, codec, monkeypatch):
    """Run A completes; run B with another codec dies right after renaming its data into
    place. A's record must not vouch for B's codes: rerunning A redoes the output."""
    from embcomp.batch import _sinks

    np.save(tmp_path / "x.npy", X[:500])
    out = tmp_path / "out.npy"
    compress(codec, tmp_path / "x.npy", out)
    other = embcomp.make_codec(SPEC).fit(X[1000:2000])

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the crash, just after the data file got its final name

    monkeypatch.setattr(_sinks, "write_skipped", die)
    with pytest.raises(KeyboardInterrupt):
        compress(other, tmp_path / "x.npy", out)
    monkeypatch.undo()
    assert json.loads((out.parent / "out.npy.json").read_text())["result"] is None
    # decompress trusts neither codec with an output whose record is still in progress
    for either in (codec, other):
        with pytest.raises(InputError, match="is incomplete: .* was interrupted"):
            decompress(either, out, tmp_path / "back.npy")
    report = compress(codec, tmp_path / "x.npy", out)
    assert report.files_done == 1
    np.testing.assert_array_equal(np.load(out), codec.encode(X[:500]))


def test_files_no_batch_job_wrote_are_not_replaced_without_overwrite(tmp_path, X, codec):
    shards, codes = tmp_path / "shards", tmp_path / "codes"
    shards.mkdir()
    np.save(shards / "a.npy", X[:300])
    compress(codec, shards, codes)
    original = (shards / "a.npy").read_bytes()
    with pytest.raises(InputError, match="exists and no embcomp batch job wrote it"):
        decompress(codec, codes, shards)  # would replace the originals with lossy vectors
    assert (shards / "a.npy").read_bytes() == original
    report = decompress(codec, codes, shards, overwrite=True)
    assert report.files_done == 1
    assert compress(codec, shards, codes).files_done == 1  # input changed: redone


def test_outputs_that_could_not_be_read_back_are_refused(tmp_path, X, codec):
    write_parquet(tmp_path / "in.parquet", X[:10], ids=[f"d{i}" for i in range(10)])
    np.save(tmp_path / "x.npy", X[:10])
    clash = pa.table({"code": pa.array([f"s{i}" for i in range(10)]), "emb": fixed_list(X[:10])})
    pq.write_table(clash, tmp_path / "clash.parquet")
    with pytest.raises(InputError, match="would both be named 'code'"):
        compress(codec, tmp_path / "clash.parquet", tmp_path / "o.parquet", id_column="code")
    with pytest.raises(InputError, match="is the embedding column"):
        compress(codec, tmp_path / "in.parquet", tmp_path / "o.parquet", id_column="emb")
    compress(codec, tmp_path / "in.parquet", tmp_path / "c.parquet", id_column="doc_id")
    with pytest.raises(InputError, match="would both be named 'doc_id'"):
        decompress(codec, tmp_path / "c.parquet", tmp_path / "v.parquet", column="doc_id")
    with pytest.raises(InputError, match="has no .npy or .parquet suffix.*codesfile.npy"):
        compress(codec, tmp_path / "x.npy", tmp_path / "codesfile")
    with pytest.raises(InputError, match="has no .npy or .parquet suffix"):  # readers could
        compress(codec, tmp_path / "x.npy", tmp_path / "codesfile", output_format="npy")
    with pytest.raises(InputError, match="names a directory but the input is one file"):
        compress(codec, tmp_path / "x.npy", str(tmp_path / "newdir") + "/")
    assert not (tmp_path / "codesfile").exists() and not (tmp_path / "newdir").exists()


def test_fit_refuses_mixed_widths_whatever_the_sample(tmp_path, X, capsys):
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", X[:100])
    np.save(tmp_path / "mixed" / "b.npy", X[:100, :32].copy())
    for extra in ([], ["--sample", "3"]):
        argv = ["fit", "--spec", "int8", "--train", tmp_path / "mixed", "-o", tmp_path / "m.codec"]
        assert run(*argv, *extra) == 2
        assert "different widths" in capsys.readouterr().err
    assert not (tmp_path / "m.codec").exists()


# ``embcomp compress`` in a subprocess whose output sits on a slow disk: every block
# written after the first takes 10 ms, so the run is seconds into its output however
# fast the machine is (timing alone made the window 0.5 s and a loaded CI missed it).
_SLOW_DISK_COMPRESS = """
import sys, time
from embcomp.batch import _sinks
from embcomp.cli import main

write = _sinks.Sink.write

def slow_write(self, *args):
    if self.rows:
        time.sleep(0.01)
    write(self, *args)
    self.handle.flush()

_sinks.Sink.write = slow_write
sys.exit(main(sys.argv[1:]))
"""


def _compress_until_writing(tmp_path, X, codec_file):
    """Start ``embcomp compress`` in a subprocess; return it once it writes its output's
    temporary file, with the output directory."""
    import subprocess
    import time

    np.save(tmp_path / "x.npy", np.tile(X, (20, 1)))  # 60,000 rows
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-c", _SLOW_DISK_COMPRESS, "compress", "-q", "-c", codec_file]
    proc = subprocess.Popen(  # 6,000 blocks of 10 rows: a minute of writing to catch
        [*command, str(tmp_path / "x.npy"), str(out / "codes.npy"), "--block-rows", "10"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60

    seen: list[list[str]] = []

    def writing() -> bool:  # the data's temp file (the record's comes first; the
        names = leftovers(out)  # writability probe flashes by before both)
        if not seen or seen[-1] != names:
            seen.append(names)
        return any(name.startswith(".codes.npy.") and ".json" not in name for name in names)

    while not writing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # synchronization only: wait until the temp file exists
    if not writing():
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run never started writing (exit {proc.returncode}, {seen}): {err}")
    return proc, out


def test_sigterm_removes_the_temporary_file(tmp_path, X, codec_file):
    import signal

    proc, out = _compress_until_writing(tmp_path, X, codec_file)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 143 and "terminated" in err
    left = sorted(p.name for p in out.rglob("*"))
    assert left == [], f"left behind: {left}; stderr: {err}"


def test_a_rerun_removes_the_temporary_file_of_a_killed_run(tmp_path, X, codec, codec_file, caplog):
    """SIGKILL runs no clean-up: the partial output stays under its temporary name.
    The next run writing that output removes it once it is unlocked and old."""
    import os
    import time

    proc, out = _compress_until_writing(tmp_path, X, codec_file)
    proc.kill()
    proc.communicate()
    names = [name for name in leftovers(out) if name.startswith(".codes.npy.")]
    (temporary,) = [out / name for name in names if ".json" not in name]
    size = temporary.stat().st_size  # what reached the file before the kill
    old = time.time() - 120  # a killed run's file stops changing
    os.utime(temporary, (old, old))
    with caplog.at_level("WARNING", logger="embcomp"):
        report = compress(codec, tmp_path / "x.npy", out / "codes.npy")
    assert report.files_done == 1 and not temporary.exists()
    assert leftovers(out) == []
    np.testing.assert_array_equal(np.load(out / "codes.npy"), codec.encode(np.tile(X, (20, 1))))
    assert f"removed {temporary} ({size} bytes)" in caplog.text


def test_a_rerun_removes_the_killed_run_s_record_temporaries_too(tmp_path, X, codec):
    """A kill while the record, the skipped-rows list or the writability probe was being
    written leaves their temporary files; the next run sweeps the output directory once."""
    import os

    np.save(tmp_path / "x.npy", X[:100])
    out = tmp_path / "out"
    out.mkdir()
    stale = [
        out / ".codes.npy.json.abcdefgh.tmp",
        out / ".codes.npy.skipped.tsv.k3x_9q0a.tmp",
        out / ".embcomp-probe.abcdefgh.tmp",  # the check that the directory is writable
    ]
    others = out / ".notes.txt.abcdefgh.tmp"  # another program's: left alone
    for path in [*stale, others]:
        path.write_bytes(b"{")
        os.utime(path, (0, 0))
    assert compress(codec, tmp_path / "x.npy", out / "codes.npy").files_done == 1
    assert leftovers(out) == [others.name]


def test_a_short_first_list_row_is_the_one_blamed(tmp_path, X, capsys):
    """A list<float> column states no width: the rows' common length does, not row 0's."""
    rows = [list(x) for x in X[:100]]
    rows[0] = rows[0][:10]
    pq.write_table(
        pa.table({"emb": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "r.parquet"
    )
    argv = ["fit", "--spec", "int8", "--train", tmp_path / "r.parquet", "--column", "emb"]
    assert run(*argv, "-o", tmp_path / "r.codec") == 2
    assert "row 0 has 10 values, expected 384" in capsys.readouterr().err


def test_an_output_rewritten_by_another_command_is_redone(tmp_path, X, codec, codec_file):
    """The record notes the file's size and mtime: `embcomp encode` over a batch output
    with another codec leaves the old record, which must not vouch for the new bytes."""
    np.save(tmp_path / "x.npy", X[:200])
    out = tmp_path / "out.npy"
    compress(codec, tmp_path / "x.npy", out)
    other = embcomp.make_codec(SPEC).fit(X[1000:2000])
    np.save(out, other.encode(X[:200]))  # what `embcomp encode -c other.codec` writes
    assert compress(codec, tmp_path / "x.npy", out).files_done == 1
    np.testing.assert_array_equal(np.load(out), codec.encode(X[:200]))


def test_big_endian_npy_is_named_as_such(tmp_path, X, codec_file, capsys):
    np.save(tmp_path / "be.npy", X[:10].astype(">f4"))
    assert run("compress", "-c", codec_file, tmp_path / "be.npy", tmp_path / "o.npy", "-q") == 2
    assert "big-endian" in capsys.readouterr().err


def test_a_directory_of_npy_and_parquet_shards_round_trips(tmp_path, X, codec, codec_file, capsys):
    """One output per file, each with its own kind of output (a .npy one for the .npy
    shard, Parquet with global row numbers as ids for the Parquet one)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", X[:1000])
    write_parquet(shards / "b.parquet", X[1000:], ids=[f"d{i}" for i in range(1000, len(X))])
    codes, approx = tmp_path / "codes", tmp_path / "approx"
    assert run("compress", "-c", codec_file, shards, codes, "--column", "emb", "-q") == 0
    assert run("decompress", "-c", codec_file, codes, approx, "-q") == 0
    np.testing.assert_array_equal(np.load(approx / "a.npy"), codec.decode(codec.encode(X[:1000])))
    table = pq.read_table(approx / "b.parquet")
    assert table.column("id").to_pylist()[:2] == [1000, 1001]
    decoded = np.stack(table.column("emb").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(decoded, codec.decode(codec.encode(X[1000:])))
    # --id-column names a Parquet column: a .npy input has none, so it is refused, not ignored
    capsys.readouterr()
    out = tmp_path / "ids"
    ids = ["--id-column", "doc_id"]
    assert run("compress", "-c", codec_file, shards, out, "--column", "emb", *ids) == 2
    err = capsys.readouterr().err
    assert "a.npy: --id-column 'doc_id' names a Parquet column" in err and not out.exists()
    assert run("compress", "-c", codec_file, shards / "a.npy", tmp_path / "a.parquet", *ids) == 2


def test_a_list_column_of_another_width_is_refused_up_front(tmp_path, X, codec_file, capsys):
    """Every row of the wrong width was a "bad row": --on-bad-row skip wrote an empty
    output and exited 0. Rows whose usual length is another width are a mismatch."""
    write_parquet(tmp_path / "x.parquet", X[:500, :300], list_type=True)
    out = tmp_path / "codes.parquet"
    assert (
        run("compress", "-c", codec_file, tmp_path / "x.parquet", out, "--on-bad-row", "skip") == 2
    )
    assert "rows have 300 dims but codec" in capsys.readouterr().err and not out.exists()


def test_files_in_subdirectories_are_not_silently_left_out(tmp_path, X, codec_file, capsys):
    shards = tmp_path / "shards"
    (shards / "date=2026-11-28").mkdir(parents=True)
    np.save(shards / "a.npy", X[:100])
    np.save(shards / "date=2026-11-28" / "b.npy", X[100:200])
    (shards / "_logs").mkdir()  # hidden (_ and .) directories are not inputs
    np.save(shards / "_logs" / "c.npy", X[:10])
    assert run("compress", "-c", codec_file, shards, tmp_path / "codes") == 2
    err = capsys.readouterr().err
    assert "b.npy is in a subdirectory of" in err and not (tmp_path / "codes").exists()
    (shards / "date=2026-11-28" / "b.npy").unlink()
    assert run("compress", "-c", codec_file, shards, tmp_path / "codes", "-q") == 0


def test_output_names_that_readers_would_misread_are_refused(
    tmp_path, X, codec, codec_file, capsys
):
    """--format npy into x.fvecs wrote .npy bytes that every reader then called a corrupt
    .fvecs; a directory of outputs named codes.npy looked like one .npy file."""
    np.save(tmp_path / "x.npy", X[:100])
    compress(codec, tmp_path / "x.npy", tmp_path / "codes.npy")
    back = tmp_path / "back.fvecs"
    assert run("decompress", "-c", codec_file, tmp_path / "codes.npy", back, "--format", "npy") == 2
    assert "name it back.npy" in capsys.readouterr().err and not back.exists()
    shards = tmp_path / "shards"
    make_shards(shards, X[:300])
    assert run("compress", "-c", codec_file, shards, tmp_path / "dir.npy") == 2
    assert "has the file suffix '.npy'" in capsys.readouterr().err
    # a Parquet dataset directory is often named so: that is fine
    assert run("compress", "-c", codec_file, shards, tmp_path / "codes.parquet", "-q") == 0
    assert (tmp_path / "codes.parquet").is_dir()


def test_the_first_bad_row_is_named_whatever_its_kind(tmp_path, X, codec_file, capsys):
    """Rows 5 (NaN), 7 (null) and 9 (short): the error named row 7, the first bad row
    the reader saw, though row 5 comes first."""
    rows = [list(map(float, row)) for row in X[:20]]
    rows[5][3] = float("nan")
    rows[7] = None
    rows[9] = rows[9][:100]
    table = pa.table({"emb": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "x.parquet")
    assert run("compress", "-c", codec_file, tmp_path / "x.parquet", tmp_path / "c.parquet") == 2
    err = capsys.readouterr().err
    assert "x.parquet: row 5 contains NaN" in err and "(3 bad rows in this block)" in err


# -- unreadable data inside a readable file --------------------------------------------
def _corrupt(path, offset, junk=b"\xff" * 16):
    data = bytearray(path.read_bytes())
    data[offset : offset + len(junk)] = junk
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["parquet-page-header", "parquet-list", "hdf5-chunk"])
def test_a_corrupt_page_or_chunk_is_one_line_naming_file_and_rows(
    tmp_path, X, codec_file, kind, capsys
):
    """The footer (or HDF5 header) reads fine, so the file opens; the second row group's
    data does not decode. Before, the CLI printed pyarrow's or h5py's bare message
    ("error: Couldn't deserialize thrift ...", over two lines), naming no file."""
    if kind == "hdf5-chunk":
        source = tmp_path / "x.hdf5"
        with h5py.File(source, "w") as handle:
            handle.create_dataset("train", data=X[:300], chunks=(100, 384), compression="gzip")
        with h5py.File(source) as handle:
            offset = handle["train"].id.get_chunk_info(1).byte_offset
        _corrupt(source, offset, b"\0" * 16)
    else:
        source = tmp_path / "x.parquet"
        emb = pa.array(list(X[:300]), type=pa.list_(pa.float32()))
        if kind == "parquet-page-header":
            emb = fixed_list(X[:300])
        pq.write_table(pa.table({"emb": emb}), source, row_group_size=100, compression="none")
        _corrupt(source, pq.read_metadata(source).row_group(1).column(0).data_page_offset)
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    assert run("compress", "-c", codec_file, source, out, "-q", "--block-rows", "100") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embcomp compress: error: {source}") and err.count("\n") == 1
    assert "cannot read rows" in err and "corrupt or truncated" in err
    if kind == "parquet-page-header":
        assert "rows 100-199" in err
    assert list(out.parent.iterdir()) == []


# -- float64 values beyond float32's range ---------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "parquet-fsl", "parquet-list", "hdf5"])
def test_float64_beyond_float32_range_is_named_so_and_skippable(
    tmp_path, X, codec, codec_file, fmt, capsys
):
    """Before, the cast to float32 printed a RuntimeWarning (an error under pytest) and
    the row was reported as holding "NaN, inf or null values"."""
    X64 = X[:300].astype(np.float64)
    X64[40, 3] = -1e300
    X64[41, 0] = np.nan
    if fmt == "npy":
        source = tmp_path / "x.npy"
        np.save(source, X64)
    elif fmt == "hdf5":
        source = tmp_path / "x.hdf5"
        with h5py.File(source, "w") as handle:
            handle["train"] = X64
    else:
        source = tmp_path / "x.parquet"
        rows: list = list(X64)
        rows[50] = None  # the list path gathers the rows around a null one
        kind = pa.list_(pa.float64(), 384 if fmt == "parquet-fsl" else -1)
        pq.write_table(pa.table({"emb": pa.array(rows, type=kind)}), source)
    out = tmp_path / ("c.parquet" if fmt.startswith("parquet") else "c.npy")
    assert run("compress", "-c", codec_file, source, out, "-q") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Warning" not in err
    assert f"{source}: row 40 holds 1e+300, beyond float32's range (+-3.4e38)" in err
    assert run("compress", "-c", codec_file, source, out, "-q", "--on-bad-row", "skip") == 0
    listed = (tmp_path / f"{out.name}.skipped.tsv").read_text().splitlines()[1:]
    reasons = {int(line.split("\t")[1]): line.split("\t")[3] for line in listed}
    assert reasons[40] == "holds 1e+300, beyond float32's range (+-3.4e38): rescale the vectors"
    assert reasons[41] == "contains NaN, inf or null values"
    keep = np.setdiff1d(np.arange(300), list(reasons))
    codes = parquet_codes(out)[1] if fmt.startswith("parquet") else np.load(out)
    np.testing.assert_array_equal(codes, codec.encode(X64[keep].astype(np.float32)))
    # fitting on all rows, or on a sample holding the row, says the same
    assert 40 in np.random.default_rng(0).choice(300, size=250, replace=False)
    for n in (None, 250):
        with pytest.raises(InputError, match=r"row 40 holds 1e\+300, beyond float32's range"):
            sample_vectors(source, n, seed=0)


# -- finite rows the codec cannot encode -----------------------------------------------
def test_a_row_that_overflows_in_the_reducer_is_a_bad_row_with_its_file_row(
    tmp_path, X, codec, codec_file, capsys
):
    """Row 700 is finite but becomes inf after the reducer. Before, the error named
    the row within its block ("row 188 ...", with --block-rows 512), no file, and
    --on-bad-row skip did not skip it."""
    huge = X[:1000].copy()
    huge[700] = 3e38
    huge[600, 5] = np.nan  # a non-finite row in the same block
    np.save(tmp_path / "huge.npy", huge)
    out = tmp_path / "codes.npy"
    argv = ["compress", "-c", codec_file, tmp_path / "huge.npy", out, "-q", "--block-rows", "512"]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'huge.npy'}: row 600 contains NaN" in err
    assert "(2 bad rows in this block)" in err and err.count("\n") == 1
    huge[600, 5] = 0.0
    np.save(tmp_path / "huge.npy", huge)
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'huge.npy'}: row 700 becomes inf after the reducer" in err
    assert "--on-bad-row skip" in err and err.count("\n") == 1
    assert run(*argv, "--on-bad-row", "skip") == 0
    assert "1 bad rows skipped" in capsys.readouterr().out
    listed = (tmp_path / "codes.npy.skipped.tsv").read_text().splitlines()
    assert listed[1].startswith(f"{tmp_path / 'huge.npy'}\t700\t\tbecomes inf after the reducer")
    keep = np.setdiff1d(np.arange(1000), [700])
    assert_codes_match(codec, np.load(out), codec.encode(huge[keep]))


def test_an_output_inside_the_input_directory_is_refused_up_front(tmp_path, X, codec_file, capsys):
    """Before, the first run wrote shards/out and the rerun (resume) failed: it found
    shards/out/part-0.parquet "in a subdirectory" of the input."""
    shards = tmp_path / "shards"
    make_shards(shards, X[:300], n_shards=2)
    before = sorted(p.name for p in shards.iterdir())
    for output in (shards / "out", shards / "deeper" / "out", shards / "x" / ".." / "y"):
        assert run("compress", "-c", codec_file, shards, output, "-q") == 2
        err = capsys.readouterr().err
        assert f"output {str(output)!r} is inside the input directory" in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in shards.iterdir()) == before  # nothing created
    assert run("compress", "-c", codec_file, shards, tmp_path / "codes", "-q") == 0
    assert run("decompress", "-c", codec_file, tmp_path / "codes", tmp_path / "codes/v") == 2
    assert "is inside the input directory" in capsys.readouterr().err


# -- ids of decompressed rows ----------------------------------------------------------
def test_npy_codes_decompress_to_the_ids_of_the_input_rows_they_encode(tmp_path, X, codec):
    """Before, .npy codes decompressed to Parquet were numbered by position among the
    codes read: s1's rows got ids 8..17 after two skipped rows of s0 (10..19 expected),
    s0's got 0..7, and s1.npy decompressed alone got 0..9."""
    shards, codes = tmp_path / "shards", tmp_path / "codes"
    shards.mkdir()
    s0 = X[:10].copy()
    s0[[2, 5], 0] = np.nan
    np.save(shards / "s0.npy", s0)
    np.save(shards / "s1.npy", X[10:20])
    assert compress(codec, shards, codes, on_bad_row="skip").bad_rows == 2
    decompress(codec, codes, tmp_path / "back", output_format="parquet")
    s0_ids = pq.read_table(tmp_path / "back" / "s0.parquet").column("id").to_pylist()
    assert s0_ids == [0, 1, 3, 4, 6, 7, 8, 9]
    back = pq.read_table(tmp_path / "back" / "s1.parquet")
    assert back.column("id").to_pylist() == list(range(10, 20))
    vectors = back.column("embedding").combine_chunks().values.to_numpy().reshape(-1, 384)
    np.testing.assert_array_equal(vectors, codec.decode(np.load(codes / "s1.npy")))
    decompress(codec, codes / "s1.npy", tmp_path / "s1.parquet")
    assert pq.read_table(tmp_path / "s1.parquet").column("id").to_pylist() == list(range(10, 20))

    # A record that does not say which rows were skipped (an older embcomp's) is
    # refused for Parquet outputs, whose ids would be wrong; .npy outputs have no ids.
    sidecar = codes / "s0.npy.json"
    record = json.loads(sidecar.read_text())
    del record["result"]["skipped_rows"]
    sidecar.write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"s0.npy: its record s0.npy.json says 2 input rows"):
        decompress(codec, codes / "s0.npy", tmp_path / "s0.parquet")
    assert not (tmp_path / "s0.parquet").exists()
    assert decompress(codec, codes / "s0.npy", tmp_path / "s0.npy").vectors == 8


def test_codes_that_skipped_rows_are_not_decompressed_to_npy(tmp_path, X, codec):
    """Before, they were: row p of the .npy was then not input row p (after skipped rows
    every later row moved up), and nothing said so. Parquet keeps the input row numbers."""
    bad = X[:40].copy()
    bad[[3, 17], 0] = np.nan
    np.save(tmp_path / "in.npy", bad)
    write_parquet(tmp_path / "in.parquet", bad, row_group_size=16)
    for codes, words in (
        ("c.npy", r"input 2 rows \(3, 17\) were skipped as bad .*see c.npy.skipped.tsv"),
        ("c.parquet", r"its ids \(the input's row numbers\) run from 0 to 39 but leave out 2"),
    ):
        source = tmp_path / ("in" + codes[1:])
        assert compress(codec, source, tmp_path / codes, on_bad_row="skip").bad_rows == 2
        with pytest.raises(InputError, match=rf"{codes}: {words}.*use --format parquet"):
            decompress(codec, tmp_path / codes, tmp_path / "back.npy")
        assert not (tmp_path / "back.npy").exists()
        decompress(codec, tmp_path / codes, tmp_path / "back.parquet", overwrite=True)
        back = pq.read_table(tmp_path / "back.parquet")
        assert back.column("id").to_pylist() == [i for i in range(40) if i not in (3, 17)]
    # a footer without statistics: the ids themselves are read
    table = pq.read_table(tmp_path / "c.parquet")
    pq.write_table(table, tmp_path / "nostats.parquet", write_statistics=False)
    assert pq.read_metadata(tmp_path / "nostats.parquet").row_group(0).column(0).statistics is None
    with pytest.raises(InputError, match=r"nostats.parquet: its ids .* leave out 2"):
        decompress(codec, tmp_path / "nostats.parquet", tmp_path / "back.npy")
    np.save(tmp_path / "one.npy", bad[17:])  # one bad row, at the start
    compress(codec, tmp_path / "one.npy", tmp_path / "one_codes.npy", on_bad_row="skip")
    with pytest.raises(InputError, match=r"input row 0 was skipped as bad"):
        decompress(codec, tmp_path / "one_codes.npy", tmp_path / "back.npy")
    # rows skipped in one shard refuse the whole job before anything is written
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", X[:10])
    np.save(shards / "b.npy", bad)
    compress(codec, shards, tmp_path / "codes", on_bad_row="skip")
    with pytest.raises(InputError, match=r"b.npy: input 2 rows"):
        decompress(codec, tmp_path / "codes", tmp_path / "vectors", output_format="npy")
    assert not (tmp_path / "vectors").exists()


def test_codes_with_an_id_column_are_not_decompressed_to_npy(tmp_path, X, codec):
    """Before, decompressing Parquet codes with their own ids to .npy dropped the ids
    silently (compress refuses the same case); embcomp's row numbers may go."""
    write_parquet(tmp_path / "in.parquet", X[:50], ids=[f"d{i}" for i in range(50)])
    compress(codec, tmp_path / "in.parquet", tmp_path / "c.parquet", id_column="doc_id")
    with pytest.raises(InputError, match=r"c.parquet: .npy outputs cannot carry the id column "):
        decompress(codec, tmp_path / "c.parquet", tmp_path / "back.npy")
    assert not (tmp_path / "back.npy").exists()
    compress(codec, tmp_path / "in.parquet", tmp_path / "rows.parquet")  # ids: row numbers
    assert decompress(codec, tmp_path / "rows.parquet", tmp_path / "back.npy").vectors == 50
