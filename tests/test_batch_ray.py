"""The Ray Data engine on a local 2-CPU Ray instance: same codes as the local engine."""

from __future__ import annotations

import gc
import json
import subprocess
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matching import assert_codes_match, assert_vectors_match

import embcomp
from embcomp.artifacts import codec_id
from embcomp.batch import compress, decompress
from embcomp.cli import main
from embcomp.exceptions import InputError
from embcomp.sample import load_sample

ray = pytest.importorskip("ray")  # the 'ray' extra; installed by `make test`

SPEC = "pca64,fp8"


def _stop_stray_ray_processes() -> None:
    """Kill and reap what a failed ``ray.init`` started (it keeps no handle to them), so
    no ``Popen`` is left to warn "still running" in a later, unrelated test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ray.shutdown()
        for obj in gc.get_objects():
            started = isinstance(obj, subprocess.Popen) and "ray" in str(obj.args)
            if started and obj.returncode is None:
                obj.kill()
                obj.wait(timeout=30)
        gc.collect()


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """A local Ray instance. On this 2-core machine its start-up timed out about once in
    40 suite runs (the raylet did not register within Ray's fixed 30 s): then clean up
    and start once more."""
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False
            )
            break
        except Exception:
            _stop_stray_ray_processes()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return load_sample()[0]


@pytest.fixture(scope="module")
def codec(X):
    return embcomp.make_codec(SPEC).fit(X[:1000])


def table_rows(directory) -> tuple[list, np.ndarray, str]:
    """(ids, payload bytes, payload column) of every Parquet file under ``directory``."""
    files = sorted(directory.glob("*.parquet")) if directory.is_dir() else [directory]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    name = table.schema.names[1]
    payload = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_binary(payload.type):
        width, raw = payload.type.byte_width, np.frombuffer(payload.buffers()[1], np.uint8)
    else:
        width, raw = payload.type.list_size * 4, payload.values.to_numpy().view(np.uint8)
    return table.column(0).to_pylist(), raw[: len(payload) * width].reshape(-1, width), name


@pytest.fixture(scope="module")
def shards(tmp_path_factory, X):
    """Two Parquet shards with string ids and a NaN-free copy; row groups of 300 rows."""
    directory = tmp_path_factory.mktemp("ray") / "shards"
    directory.mkdir()
    for i, (lo, hi) in enumerate([(0, 1700), (1700, 3000)]):
        table = pa.table(
            {
                "doc": pa.array([f"doc-{j}" for j in range(lo, hi)]),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(X[lo:hi].reshape(-1)), 384),
            }
        )
        pq.write_table(table, directory / f"part-{i}.parquet", row_group_size=300)
    return directory


def test_ray_output_equals_local_output(tmp_path, shards, X, codec, capsys):
    codec_file = embcomp.save_codec(codec, tmp_path / "c.codec")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    common = ["-c", str(codec_file), str(shards), "--id-column", "doc", "-q"]
    assert main(["compress", *common[:3], str(local), *common[3:]]) == 0
    argv = ["compress", *common[:3], str(distributed), *common[3:], "--engine", "ray"]
    argv += ["--block-rows", "250"]  # blocks and units cut across row groups and shards
    assert main(argv) == 0
    assert "3,000 vectors from 2 file(s)" in capsys.readouterr().out
    local_ids, local_codes, _ = table_rows(local)
    ray_ids, ray_codes, _ = table_rows(distributed)
    assert ray_ids == local_ids == [f"doc-{j}" for j in range(3000)]
    np.testing.assert_array_equal(ray_codes, local_codes)
    assert_codes_match(codec, ray_codes, codec.encode(X))
    record = json.loads((distributed / "_embcomp.json").read_text())
    assert record["rows"] == 3000 and record["job"]["codec_id"] == codec_id(codec)
    assert not list(tmp_path.glob(".ray.tmp-*"))

    # Resume: the same job again does nothing and says so.
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out

    # Decompress on Ray equals decompress locally.
    back_ray, back_local = tmp_path / "back_ray", tmp_path / "back_local"
    assert decompress(codec, distributed, back_ray, engine="ray").vectors == 3000
    decompress(codec, local, back_local)
    ids, vectors, name = table_rows(back_ray)
    assert name == "emb" and ids == local_ids
    np.testing.assert_array_equal(vectors, table_rows(back_local)[1])
    # the same codes decoded whole-array: other row groups, so equal up to BLAS rounding
    assert_vectors_match(codec, vectors.view(np.float32), codec.decode(ray_codes))


def test_ray_reads_npy_and_skips_bad_rows_like_local(tmp_path, X, codec):
    bad = X.copy()
    bad[[5, 2222], 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError, match=r"bad.npy: row 5 contains NaN") as failure:
        compress(codec, tmp_path / "bad.npy", tmp_path / "failed", engine="ray", unit_rows=700)
    assert "Traceback" not in str(failure.value) and "\n" not in str(failure.value)
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".failed*"))

    report = compress(
        codec, tmp_path / "bad.npy", tmp_path / "ray", engine="ray", on_bad_row="skip",
        unit_rows=700, block_rows=333,
    )  # fmt: skip
    assert (report.vectors, report.bad_rows) == (2998, 2)
    local = compress(codec, tmp_path / "bad.npy", tmp_path / "local.parquet", on_bad_row="skip")
    assert local.bad_rows == 2
    ray_ids, ray_codes, _ = table_rows(tmp_path / "ray")
    local_ids, local_codes, _ = table_rows(tmp_path / "local.parquet")
    assert ray_ids == local_ids and 5 not in ray_ids and 2222 not in ray_ids
    assert_codes_match(codec, ray_codes, local_codes)  # 700-row units vs one local run
    skipped = (tmp_path / "ray" / "_skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[1] for line in skipped[1:]] == ["5", "2222"]
    # .npy codes (which hold no ids) decompress to the ids of the input rows they encode
    compress(codec, tmp_path / "bad.npy", tmp_path / "codes.npy", on_bad_row="skip")
    decompress(codec, tmp_path / "codes.npy", tmp_path / "back", engine="ray", unit_rows=700)
    assert table_rows(tmp_path / "back")[0] == local_ids


def test_ray_refuses_to_replace_a_foreign_directory(tmp_path, X, codec):
    np.save(tmp_path / "x.npy", X[:100])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="is not an output of 'embcomp compress --engine ray'"):
        compress(codec, tmp_path / "x.npy", foreign, engine="ray")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_ray_needs_one_kind_of_id_across_files(tmp_path, shards, X, codec):
    """Ray writes one dataset: files whose ids differ in name or type are refused up
    front; a file without ids fits with int64 ``id`` ones (its rows' global numbers)."""
    codes = tmp_path / "codes"
    codes.mkdir()
    compress(codec, shards / "part-1.parquet", codes / "b.parquet", id_column="doc")
    compress(codec, _npy(tmp_path, X[:1700]), codes / "a.npy")
    with pytest.raises(InputError, match=r"b.parquet: id column 'doc' \(string\).*--engine local"):
        decompress(codec, codes, tmp_path / "refused", engine="ray")
    # Without ids, the vector columns still differ ('emb' from b's input, 'embedding' for a)
    compress(codec, shards / "part-1.parquet", codes / "b.parquet", overwrite=True)
    with pytest.raises(InputError, match=r"column 'emb'.*pass --column"):
        decompress(codec, codes, tmp_path / "refused", engine="ray")
    assert not (tmp_path / "refused").exists()

    assert decompress(codec, codes, tmp_path / "back", engine="ray", column="v").vectors == 3000
    ids, vectors, _ = table_rows(tmp_path / "back")
    assert ids == list(range(1700)) + list(range(1300))  # b.parquet keeps its stored ids
    # the same codes decoded whole-array: other row groups, so equal up to BLAS rounding
    a_codes = np.load(codes / "a.npy")
    b_codes = np.asarray(table_rows(codes / "b.parquet")[1], dtype=np.uint8)
    want = codec.decode(np.concatenate([a_codes, b_codes]))
    assert_vectors_match(codec, vectors.view(np.float32), want)


def _npy(tmp_path, rows: np.ndarray):
    path = tmp_path / "a-input.npy"
    np.save(path, rows)
    return path


def test_ray_never_deletes_an_input_and_deletes_other_files_only_with_overwrite(tmp_path, X, codec):
    """Replacing a Ray output replaces its directory: it deleted a user's notes and the
    job's own input under it, with only the record checked."""
    np.save(tmp_path / "x.npy", X[:300])
    out = tmp_path / "codes"
    compress(codec, tmp_path / "x.npy", out, engine="ray")
    (out / "notes.txt").write_text("keep me")
    inputs = out / "inputs"
    inputs.mkdir()
    np.save(inputs / "y.npy", X[300:600])
    with pytest.raises(InputError, match="lies inside the output directory"):
        compress(codec, inputs, out, engine="ray", overwrite=True)
    (inputs / "y.npy").unlink()
    inputs.rmdir()
    other = embcomp.make_codec(SPEC).fit(X[1000:2000])  # another job: replaces the output
    with pytest.raises(InputError, match=r"holds 1 file\(s\) no embcomp job wrote \(notes.txt\)"):
        compress(other, tmp_path / "x.npy", out, engine="ray")
    assert (out / "notes.txt").read_text() == "keep me"
    assert compress(codec, tmp_path / "x.npy", out, engine="ray").files_already_complete == 1
    compress(other, tmp_path / "x.npy", out, engine="ray", overwrite=True)
    assert not (out / "notes.txt").exists()
    np.testing.assert_array_equal(table_rows(out)[1], other.encode(X[:300]))


def test_ray_output_of_an_empty_input_decompresses(tmp_path, X, codec):
    np.save(tmp_path / "empty.npy", X[:0])
    assert compress(codec, tmp_path / "empty.npy", tmp_path / "codes", engine="ray").vectors == 0
    assert decompress(codec, tmp_path / "codes", tmp_path / "back").vectors == 0
    (part,) = (tmp_path / "back").glob("*.parquet")
    assert pq.read_metadata(part).num_rows == 0


def test_ray_session_keeps_the_callers_sigterm_handler(monkeypatch):
    """ray.init installs its own SIGTERM handler (a C++ stack dump, exit 15); the CLI's
    (which unwinds: exit 143, scratch removed) must stay in force during the job."""
    import signal

    from embcomp.batch import _ray

    def ours(signum, frame):  # pragma: no cover - never called
        pass

    def fake_init(**kwargs):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does, in effect

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with _ray._ray_session(None, quiet=True):
            assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
