"""Outputs of the batch compressor, written block by block under a temporary name.

Every output describes the job that produced it (codec id, spec, the input's name,
size, mtime and row count, the read options) and, once complete, how many rows it
holds. That record is what makes an output *verifiable*: a rerun skips outputs whose
record matches the job it is about to do and whose row count matches the file.

- ``.npy``: ``<name>.json`` (the record) says "in progress" (``result`` null) before the
  array is renamed into place, and gets the row count after it: a crash in between
  leaves a record that no rerun takes for complete (nor a previous job's record).
  The result also lists the input rows skipped as bad (``skipped_rows``): with the
  input's ``id_offset``, that gives each row its id (its input row), which a
  ``.npy`` cannot store and decompress to Parquet needs.
- Parquet: an id column and ``code`` (``fixed_size_binary``) or the embedding column
  (``fixed_size_list<float32>``); the job record is the file metadata key
  ``embcomp``, the row count ``embcomp.result``.
- Rows skipped as bad are listed in ``<name>.skipped.tsv`` (file, row, id, reason).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_output, atomic_write_bytes
from .._readers import (
    PARQUET_META_KEY,
    PARQUET_RESULT_KEY,
    BadRow,
    _read_npy_header,
    require_pyarrow,
)
from ..exceptions import InputError

__all__ = ["OutputSpec", "Sink", "is_complete", "open_sink", "write_skipped", "written_by_embcomp"]

RECORD_FORMAT = "embcomp-batch"
RECORD_VERSION = 1


@dataclass
class OutputSpec:
    """Where and how one output is written.

    Attributes
    ----------
    path : final file name.
    fmt : ``"npy"`` or ``"parquet"``.
    dtype : ``uint8`` (codes) or ``float32`` (vectors).
    width : bytes per code, or vector dimension.
    column : Parquet payload column: ``code``, or the embedding column name.
    id_field : pyarrow Field of the id column; None means int64 ``id`` = global row.
    job : the job record (JSON-able dict) stored in the output.
    """

    path: Path
    fmt: str
    dtype: np.dtype
    width: int
    column: str
    id_field: Any
    job: dict[str, Any]

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @property
    def numbers_rows(self) -> bool:
        """Whether rows get their row numbers as ids (Parquet without an id column)."""
        return self.fmt == "parquet" and self.id_field is None

    @property
    def skipped_list(self) -> Path:
        return self.path.with_name(self.path.name + ".skipped.tsv")


@dataclass
class Sink:
    """An output being written: call :meth:`write` per block."""

    spec: OutputSpec
    handle: Any
    writer: Any = None
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)

    def write(self, data: np.ndarray, row_ids: np.ndarray | None, ids: Any) -> None:
        """Append ``data`` (n, width) with its ``ids`` (pyarrow Array), or with
        ``row_ids`` (int64 (n,)) where the output numbers its rows (see
        :attr:`OutputSpec.numbers_rows`; None elsewhere)."""
        if self.spec.fmt == "npy":
            self.handle.write(np.ascontiguousarray(data, dtype=self.spec.dtype).data)
        else:
            self.writer.write_table(_table(self.spec, data, row_ids, ids))
        self.rows += data.shape[0]


def _npy_header(dtype: np.dtype, shape: tuple[int, int], total: int | None = None) -> bytes:
    """A version 1.0 ``.npy`` header, space-padded to ``total`` bytes (multiple of 64)."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape}, }}"
    base = 10 + len(text) + 1
    total = total if total is not None else -(-base // 64) * 64
    if base > total:
        raise ValueError("npy header does not fit its reserved space")
    text += " " * (total - base) + "\n"
    return np.lib.format.magic(1, 0) + struct.pack("<H", len(text)) + text.encode("latin1")


def _table(spec: OutputSpec, data: np.ndarray, row_ids: np.ndarray | None, ids: Any) -> Any:
    pa = require_pyarrow()
    n = data.shape[0]
    if spec.dtype == np.uint8:
        payload = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(spec.width), n, [None, pa.py_buffer(np.ascontiguousarray(data))]
        )
    else:
        flat = pa.array(np.ascontiguousarray(data, dtype=np.float32).reshape(-1))
        payload = pa.FixedSizeListArray.from_arrays(flat, spec.width)
    id_values = pa.array(row_ids, type=pa.int64()) if spec.id_field is None else ids
    return pa.Table.from_arrays([id_values, payload], schema=_schema(spec))


def _schema(spec: OutputSpec) -> Any:
    pa = require_pyarrow()
    id_field = pa.field("id", pa.int64()) if spec.id_field is None else spec.id_field
    payload_type = (
        pa.binary(spec.width) if spec.dtype == np.uint8 else pa.list_(pa.float32(), spec.width)
    )
    meta = {PARQUET_META_KEY: json.dumps(spec.job, sort_keys=True).encode()}
    return pa.schema([id_field, pa.field(spec.column, payload_type)], metadata=meta)


@contextlib.contextmanager
def open_sink(spec: OutputSpec, max_rows: int) -> Iterator[Sink]:
    """Write an output under a temporary name; rename it only if the block exits cleanly.

    ``max_rows`` bounds the rows to come (the ``.npy`` header is written first with
    room for it and rewritten with the final count at the end).
    """
    if spec.fmt == "npy":  # in progress: replaces any earlier job's record first
        had_data = spec.path.exists()
        try:  # (a signal landing just after the record is written cleans it up too)
            _write_record(spec, None)
            with _sink_file(spec, max_rows) as sink:
                yield sink
        except BaseException:
            if not had_data:  # nothing for the record to describe: leave no trace
                with contextlib.suppress(FileNotFoundError):
                    spec.sidecar.unlink()
            raise
    else:
        with _sink_file(spec, max_rows) as sink:
            yield sink
    # The data file now has its final name; the list of skipped rows and the record's
    # result follow. A crash in between leaves an output whose record is still "in
    # progress", which a rerun redoes.
    write_skipped(spec.skipped_list, sink.bad)
    if spec.fmt == "npy":
        done = spec.path.stat()  # so that a later rewrite by anything else shows
        result = {"rows": sink.rows, "bad_rows": len(sink.bad), "size": done.st_size}
        skipped = sorted(row.row for row in sink.bad)
        _write_record(spec, {**result, "mtime_ns": done.st_mtime_ns, "skipped_rows": skipped})


@contextlib.contextmanager
def _sink_file(spec: OutputSpec, max_rows: int) -> Iterator[Sink]:
    """The data file of :func:`open_sink`, renamed into place on a clean exit."""
    with atomic_output(spec.path, clean_stale=False) as handle:  # the job swept the directory
        sink = Sink(spec, handle)
        if spec.fmt == "npy":
            reserved = len(_npy_header(spec.dtype, (max_rows, spec.width)))
            handle.write(_npy_header(spec.dtype, (max_rows, spec.width)))
            yield sink
            handle.seek(0)
            handle.write(_npy_header(spec.dtype, (sink.rows, spec.width), reserved))
            handle.seek(0, os.SEEK_END)
        else:
            import pyarrow.parquet as pq

            # Codes and floats are near-random bytes: compressing them, building a
            # dictionary or min/max statistics for them costs time and saves nothing.
            id_name = _schema(spec).field(0).name
            sink.writer = pq.ParquetWriter(
                handle,
                _schema(spec),
                compression={spec.column: "none", id_name: "snappy"},
                use_dictionary=[id_name],
                write_statistics=[id_name],
            )
            try:
                yield sink
            except BaseException:
                sink.writer.close()
                raise
            result = {"rows": sink.rows, "bad_rows": len(sink.bad)}
            sink.writer.add_key_value_metadata({PARQUET_RESULT_KEY: json.dumps(result)})
            sink.writer.close()


def _write_record(spec: OutputSpec, result: dict[str, Any] | None) -> None:
    record = {**spec.job, "result": result}
    atomic_write_bytes(spec.sidecar, json.dumps(record, indent=1, sort_keys=True).encode())


def written_by_embcomp(spec: OutputSpec) -> bool:
    """Whether the file at ``spec.path`` carries a batch job record (complete or not),
    so that replacing it loses nothing the user did not ask embcomp to make."""
    try:
        if spec.path.suffix.lower() == ".npy" or spec.fmt == "npy":
            record = json.loads(spec.sidecar.read_text())
            return isinstance(record, dict) and record.get("format") == RECORD_FORMAT
        require_pyarrow()
        import pyarrow.parquet as pq

        return PARQUET_META_KEY in (pq.read_metadata(spec.path).metadata or {})
    except (OSError, ValueError, InputError):
        return False
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own errors on bad files
        if type(exc).__module__.startswith("pyarrow"):
            return False
        raise


def write_skipped(path: Path, bad: list[BadRow]) -> None:
    """Write the list of skipped rows (TSV: file, row, id, reason); remove a stale one."""
    if not bad:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    text = io.StringIO()
    out = csv.writer(text, delimiter="\t", lineterminator="\n")
    out.writerow(["file", "row", "id", "reason"])
    for row in sorted(bad, key=lambda b: (b.path, b.row)):
        out.writerow([row.path, row.row, "" if row.id is None else row.id, row.reason])
    atomic_write_bytes(path, text.getvalue().encode())


def _same_job(stored: Any, job: dict[str, Any]) -> bool:
    return isinstance(stored, dict) and stored == json.loads(json.dumps(job, sort_keys=True))


def is_complete(spec: OutputSpec) -> bool:
    """True if ``spec.path`` is a finished output of exactly this job (see module doc)."""
    if not spec.path.is_file():
        return False
    try:
        if spec.fmt == "npy":
            record = json.loads(spec.sidecar.read_text())
            result = record.get("result") or {}
            rows = result.get("rows")
            if not isinstance(rows, int):  # in progress: the run did not finish
                return False
            done = spec.path.stat()
            if (result.get("size"), result.get("mtime_ns")) != (done.st_size, done.st_mtime_ns):
                return False  # the file was rewritten since (e.g. by embcomp encode)
            job = {k: v for k, v in record.items() if k != "result"}
            shape, _, dtype, offset = _read_npy_header(spec.path)
            size = spec.path.stat().st_size
            return (
                _same_job(job, spec.job)
                and shape == (rows, spec.width)
                and dtype == spec.dtype
                and size == offset + rows * spec.width * spec.dtype.itemsize
            )
        require_pyarrow()
        import pyarrow.parquet as pq

        meta = pq.read_metadata(spec.path)
        kv = meta.metadata or {}
        job = json.loads(kv[PARQUET_META_KEY])
        result = json.loads(kv[PARQUET_RESULT_KEY])
        return _same_job(job, spec.job) and result.get("rows") == meta.num_rows
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError):
        return False
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own errors on bad files
        if type(exc).__module__.startswith("pyarrow"):
            return False
        raise
