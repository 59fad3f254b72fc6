"""Streaming readers: any supported input as a sequence of row blocks with bounded memory.

A *source* is one input file: ``.npy`` (memory-mapped; a block's pages are released
once it is done, so resident memory stays about one block), ``.fvecs``, Parquet (an
embedding column of ``fixed_size_list<float>`` or ``list<float>``, optionally an id
column carried through) or an ann-benchmarks HDF5 file (one dataset, ``train`` by
default). A directory is the sorted list of the supported files in it (names
starting with ``.`` or ``_`` are skipped, as Spark and Ray write such markers).
Sources hold metadata only, no open handles, so they can be pickled and shipped to
Ray workers.

Sources come in two kinds: ``"vectors"`` (float rows, read as float32) and
``"codes"`` (uint8 rows written by ``embcomp compress``: ``.npy`` or Parquet with a
``fixed_size_binary`` column).

pyarrow (the ``parquet`` extra) and h5py (the ``bench`` extra) are imported only
when such a file is read.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._blocks import rows_per_block
from .exceptions import DimensionMismatchError, InputError

__all__ = [
    "BadRow",
    "Block",
    "Source",
    "block_rows_for",
    "iter_blocks",
    "open_sources",
    "vector_format",
]

VECTOR_SUFFIXES = {
    ".npy": "npy",
    ".fvecs": "fvecs",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}
CODE_SUFFIXES = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet"}
# Metadata key under which embcomp describes its Parquet outputs (JSON).
PARQUET_META_KEY = b"embcomp"
PARQUET_RESULT_KEY = b"embcomp.result"
DEFAULT_CODE_COLUMN = "code"
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# About 32 MiB of float32 per block for readers that copy (Parquet, .fvecs, HDF5):
# large enough that per-block overhead is small, small enough that the few blocks in
# flight keep memory far below 1 GB. Memory-mapped .npy blocks cost no copy, so they
# are larger (fewer, longer encode calls keep both cores busy).
_TARGET_BLOCK_BYTES = 32 << 20
_MAPPED_BLOCK_BYTES = 128 << 20
# Block sizes for a list<float> column whose width no row has shown yet (its first
# rows are null) assume rows this wide: a block stays near its byte target for any
# usual embedding, instead of millions of rows (block_rows_for(1)).
_WIDTH_IF_UNKNOWN = 4096


def block_rows_for(width: int, target_bytes: int = _TARGET_BLOCK_BYTES) -> int:
    """Default rows per streamed block for ``width``-dim float vectors.

    A multiple of the codec's internal block, so streaming splits rows the same way
    as one ``Codec.encode`` call over the whole file does.
    """
    inner = rows_per_block(4 * width)
    return max(inner, (target_bytes // (4 * width)) // inner * inner)


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "reading or writing Parquet needs pyarrow: pip install 'embcomp[parquet]'"
        ) from exc
    return pyarrow


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise InputError("reading HDF5 needs h5py: pip install 'embcomp[bench]'") from exc
    return h5py


@dataclass(frozen=True)
class BadRow:
    """A row that could not be used: its file, row number in that file, id and why."""

    path: str
    row: int
    id: Any
    reason: str

    def message(self) -> str:
        ident = "" if self.id is None else f" (id {self.id!r})"
        return f"{self.path}: row {self.row}{ident} {self.reason}"


@dataclass
class Block:
    """Consecutive rows ``[start, stop)`` of one source, bad rows already removed.

    Attributes
    ----------
    source : the Source the rows come from.
    data : ndarray, shape (n, width): float32 vectors, or uint8 codes for code sources.
    rows : ndarray, shape (n,), int64: row number in the file of each row of ``data``.
    ids : pyarrow Array of length n, or None when the source has no id column.
    start, stop : the file rows this block covers (``stop - start`` rows were read).
    bad : rows of ``[start, stop)`` dropped as bad (only with ``on_bad_row="skip"``).
    """

    source: Source
    data: np.ndarray
    rows: np.ndarray
    ids: Any
    start: int
    stop: int
    bad: list[BadRow] = field(default_factory=list)

    @property
    def global_rows(self) -> np.ndarray:
        """int64 (n,): position of each row in the whole input (all files, in order)."""
        return self.rows + self.source.offset


def _drop_bad(
    source: Source,
    start: int,
    data: np.ndarray,
    ids: Any,
    reasons: dict[int, str],
    on_bad_row: str,
) -> tuple[np.ndarray, np.ndarray, Any, list[BadRow]]:
    """Apply the bad-row policy to a block; ``reasons`` maps block row -> why it is bad."""
    rows = np.arange(start, start + data.shape[0], dtype=np.int64)
    if not reasons:
        return data, rows, ids, []
    if on_bad_row != "skip" and source.kind == "vectors":
        # about to fail: a NaN row before the first null or short one is the first bad
        # row (the encoder, which checks finiteness otherwise, never sees this block)
        reasons = {**nonfinite_reasons(data), **reasons}
    bad = [BadRow(str(source.path), start + i, _id_at(ids, i), reasons[i]) for i in sorted(reasons)]
    if on_bad_row != "skip":  # "fail", or "refuse" where skipping is no option (fitting)
        raise InputError(bad_row_message(bad[0], len(bad), skippable=on_bad_row == "fail"))
    keep = np.ones(data.shape[0], dtype=bool)
    keep[sorted(reasons)] = False
    return data[keep], rows[keep], (None if ids is None else ids.filter(keep)), bad


def bad_row_message(first: BadRow, count: int, *, skippable: bool = True) -> str:
    more = f" ({count} bad rows in this block)" if count > 1 else ""
    if not skippable:
        return f"{first.message()}{more}; repair or drop such rows before fitting"
    return (
        f"{first.message()}{more}; repair or drop such rows, or pass --on-bad-row skip "
        "to skip and list them"
    )


def _id_at(ids: Any, i: int) -> Any:
    if ids is None:
        return None
    value = ids[i]
    return value.as_py() if hasattr(value, "as_py") else value


def nonfinite_reasons(data: np.ndarray) -> dict[int, str]:
    """Block row -> reason for every row of float ``data`` holding NaN or inf."""
    bad = np.flatnonzero(~np.isfinite(data).all(axis=1))
    return {int(i): "contains NaN, inf or null values" for i in bad}


def _float32_rows(data: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Float rows (n, d) as float32, and block row -> reason for the rows whose finite
    values are beyond float32's range (they become inf: named as such, as
    ``embcomp encode`` names them, not as NaN or inf in the file; and no
    RuntimeWarning)."""
    if data.dtype == np.float32:
        return data, {}
    with np.errstate(over="ignore"):
        data32 = data.astype(np.float32)
    if data.dtype.itemsize <= 4 or np.isfinite(data32).all():
        return data32, {}
    beyond = np.isinf(data32) & np.isfinite(data)
    reasons = {}
    for i in np.flatnonzero(beyond.any(axis=1)):
        value = float(np.abs(data[i][beyond[i]]).max())
        reasons[int(i)] = (
            f"holds {value:.3g}, beyond float32's range (+-3.4e38): rescale the vectors"
        )
    return data32, reasons


class Source:
    """One input file. Subclasses implement ``_read(start, stop)`` and ``read_rows``.

    Attributes
    ----------
    path : Path
    kind : ``"vectors"`` or ``"codes"``.
    format : ``"npy"``, ``"fvecs"``, ``"parquet"`` or ``"hdf5"``.
    n_rows : rows in the file.
    width : vector dimension (vectors) or bytes per code (codes); ``None`` for a
        Parquet ``list<float>`` column before the width is known.
    offset : rows of the files before this one in the same input (global row ids).
    id_field : pyarrow Field of the id column, or None.
    meta : embcomp's description of the file (codec id, spec...) when it has one.
    unknown_ids : why :meth:`row_ids` cannot tell the ids of the rows, or None.
    """

    format = ""
    # Whether reading a block costs real work worth overlapping with encoding (a
    # reader thread); memory-mapped sources need none and must not run ahead.
    read_ahead = True
    block_bytes = _TARGET_BLOCK_BYTES

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        stat = path.stat()
        self.nbytes = stat.st_size
        self.mtime_ns = stat.st_mtime_ns
        self.n_rows = 0
        self.width: int | None = None
        self.offset = 0
        self.id_field: Any = None
        self.meta: dict[str, Any] | None = None
        self.unknown_ids: str | None = None

    # -- what every engine needs ---------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input for resume: name, size, mtime and row count."""
        return {
            "name": self.path.name,
            "size": self.nbytes,
            "mtime_ns": self.mtime_ns,
            "rows": self.n_rows,
        }

    def default_block_rows(self) -> int:
        """Rows per block when the caller gives none (about ``block_bytes`` of float32)."""
        return block_rows_for(self.width or _WIDTH_IF_UNKNOWN, self.block_bytes)

    def row_ids(self, rows: np.ndarray) -> np.ndarray:
        """int64 ids of file rows ``rows`` (int64) where the file has no id column:
        their position in the whole input (see NpySource for codes)."""
        return rows + self.offset

    def position_gap(self) -> str | None:
        """Why row ``p`` of these codes is not row ``p`` of the input they encode (rows
        skipped as bad by ``embcomp compress``), or None when it is, or nobody can tell."""
        return None

    def split(self, target_rows: int) -> list[tuple[int, int]]:
        """Row ranges of about ``target_rows`` covering the file (units of parallel work)."""
        step = max(1, target_rows)
        return [(s, min(s + step, self.n_rows)) for s in range(0, self.n_rows, step)]

    def iter_blocks(
        self,
        block_rows: int,
        start: int = 0,
        stop: int | None = None,
        *,
        on_bad_row: str = "fail",
        check_finite: bool = False,
    ) -> Iterator[Block]:
        """Yield :class:`Block` s covering rows ``[start, stop)`` in order.

        Rows that are null or of the wrong length are bad (as are non-finite rows when
        ``check_finite``): ``on_bad_row="fail"`` raises ``InputError`` naming the file
        and row; ``"skip"`` drops them and lists them in ``Block.bad``.
        """
        stop = self.n_rows if stop is None else stop
        for b_start, data, ids, reasons in self._read(start, stop, block_rows):
            if check_finite and self.kind == "vectors":
                reasons = {**nonfinite_reasons(data), **reasons}
            kept, rows, ids, bad = _drop_bad(self, b_start, data, ids, reasons, on_bad_row)
            yield Block(self, kept, rows, ids, b_start, b_start + data.shape[0], bad)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted int64 file row numbers) as float32 (len(rows), width).

        Used for sampling: any bad row among them raises ``InputError``.
        """
        parts = []
        for b_start, data, ids, reasons in self._read_covering(rows):
            local = rows[(rows >= b_start) & (rows < b_start + data.shape[0])] - b_start
            picked = data[local]
            bad = {int(local[i]): why for i, why in nonfinite_reasons(picked).items()}
            wanted = set(local.tolist())
            bad.update({i: why for i, why in reasons.items() if i in wanted})
            if bad:
                first = min(bad)
                raise InputError(
                    BadRow(
                        str(self.path), b_start + first, _id_at(ids, first), bad[first]
                    ).message()
                    + "; repair or drop it before fitting"
                )
            parts.append(np.asarray(picked, dtype=np.float32))
        if not parts:
            return np.empty((0, self.width or 0), dtype=np.float32)
        return np.concatenate(parts)

    # -- per format ------------------------------------------------------------------
    def _read(
        self, start: int, stop: int, block_rows: int
    ) -> Iterator[tuple[int, np.ndarray, Any, dict[int, str]]]:
        """Yield (first row, data (n, width), ids or None, {block row: bad reason})."""
        raise NotImplementedError

    def _read_covering(
        self, rows: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, Any, dict[int, str]]]:
        """Blocks covering the sorted ``rows`` (default: blocks of the file holding any)."""
        step = self.default_block_rows()
        for start in np.unique(rows // step) * step:
            yield from self._read(int(start), min(int(start) + step, self.n_rows), step)

    @property
    def data_bytes(self) -> int:
        """Bytes of the input this source reads (for reports): the file's size."""
        return self.nbytes

    def check_width(self, expected: int, what: str) -> None:
        """Raise ``DimensionMismatchError`` unless rows are ``expected`` wide."""
        if self.width is not None and self.width != expected:
            unit = "dims" if self.kind == "vectors" else "bytes per code"
            raise DimensionMismatchError(
                f"{self.path}{self._column_note()}: rows have {self.width} {unit} but {what} "
                f"expects {expected}; check the file, --column and the codec"
            )

    def _column_note(self) -> str:
        return ""

    def _raise_read_error(self, first: int, stop: int, exc: BaseException) -> None:
        """Raise the one-line ``InputError`` naming the file and rows ``[first, stop)``
        for an error of the file's own decoder that is about the file: missing or not
        readable, using what the installed reader does not support, or corrupt or
        truncated data. Returns for any other error (out of memory above all), which
        the caller re-raises with its own message."""
        kind = _read_error_kind(exc)
        if kind == "other":
            return
        if kind == "access":
            raise _access_error(self.path, exc) from exc
        detail = " ".join(str(exc).split()) or type(exc).__name__  # some span lines
        where = f"{self.path}{self._column_note()}: cannot read rows {first}-{stop - 1}"
        if kind == "unsupported":
            raise InputError(
                f"{where}: the installed reader does not support what the file uses ({detail})"
            ) from exc
        raise InputError(
            f"{where} ({detail}); the file is corrupt or truncated: re-export or restore it"
        ) from exc


_ACCESS_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def _read_error_kind(exc: BaseException) -> str:
    """What an exception from pyarrow or h5py reading a file says about the file:
    ``"access"`` (missing, not permitted, a directory), ``"unsupported"`` (a feature the
    installed pyarrow does not implement), ``"corrupt"`` (data that does not decode:
    ``ArrowInvalid``, or any other ``OSError``, which is what pyarrow's ``ArrowIOError``
    and h5py's read errors are) or ``"other"`` (out of memory and the rest: not the
    file's fault)."""
    if isinstance(exc, MemoryError):  # pyarrow's ArrowMemoryError too
        return "other"
    if isinstance(exc, OSError):
        return "access" if exc.errno in _ACCESS_ERRNOS else "corrupt"
    pa = sys.modules.get("pyarrow")  # an Arrow error means pyarrow is loaded
    if pa is not None and isinstance(exc, pa.ArrowNotImplementedError):
        return "unsupported"
    if pa is not None and isinstance(exc, pa.ArrowInvalid):
        return "corrupt"
    return "other"


def _access_error(path: Path, exc: BaseException) -> InputError:
    # the errno's own words: h5py's strerror spans lines of internals
    code = exc.errno if isinstance(exc, OSError) else None
    reason = os.strerror(code) if code else " ".join(str(exc).split())
    return InputError(f"cannot read {path}: {reason}")


# -- .npy ------------------------------------------------------------------------------
def _read_npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(handle)
            else:
                shape, fortran, dtype = fmt._read_array_header(handle, version)  # type: ignore[attr-defined]
            return shape, fortran, dtype, handle.tell()
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npy file (truncated?): {exc}") from exc


class NpySource(Source):
    format = "npy"
    read_ahead = False
    block_bytes = _MAPPED_BLOCK_BYTES

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(path, kind)
        shape, fortran, dtype, self.data_offset = _read_npy_header(path)
        allowed = _FLOAT_DTYPES if kind == "vectors" else (np.dtype(np.uint8),)
        if len(shape) != 2:
            raise InputError(f"{path}: expected a 2-D (n, d) array, got shape {shape}")
        if dtype.kind == "f" and not dtype.isnative:
            raise InputError(
                f"{path}: big-endian {dtype} values; save them little-endian, e.g. "
                "np.save(path, X.astype(X.dtype.newbyteorder('<')))"
            )
        if dtype not in allowed:
            want = "float16/32/64 vectors" if kind == "vectors" else "uint8 codes"
            raise InputError(f"{path}: expected {want}, got dtype {dtype}")
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise InputError(
                f"{path}: array is stored in Fortran order; re-save it with "
                "np.save(path, np.ascontiguousarray(X))"
            )
        self.dtype = dtype
        self.n_rows, self.width = int(shape[0]), int(shape[1])
        if self.width == 0:
            raise InputError(f"{path}: its rows have 0 values (shape {shape})")
        row_bytes = self.width * dtype.itemsize
        expected = self.data_offset + self.n_rows * row_bytes
        if self.nbytes < expected:
            complete = (self.nbytes - self.data_offset) // max(1, row_bytes)
            raise InputError(
                f"{path} is truncated: its header says {self.n_rows} x {self.width} {dtype} "
                f"({expected} bytes) but the file has {self.nbytes} bytes (row {complete} is "
                "the first incomplete one); re-export the file"
            )
        self._origin = None
        if kind == "codes":
            self.meta = _read_sidecar_meta(path)
            self._origin = self._recorded_origin()

    def _recorded_origin(self) -> tuple[int, np.ndarray] | None:
        """Codes ``embcomp compress`` wrote to .npy: the input rows they encode, as the
        id of the first input row and the skipped-row steps :meth:`row_ids` uses (None
        for codes without a record, numbered by position). Sets ``unknown_ids`` when
        the record cannot tell."""
        record = self.meta
        if record is None or "id_offset" not in record:
            return None
        result, first_id = record.get("result"), record["id_offset"]
        sidecar = f"its record {self.path.name}.json"
        if not isinstance(result, dict) or not isinstance(first_id, int):
            self.unknown_ids = f"{sidecar} does not say which input rows it holds"
            return None
        skipped = result.get("skipped_rows", [])
        if result.get("rows") != self.n_rows:
            self.unknown_ids = (
                f"it holds {self.n_rows} rows but {sidecar} says {result.get('rows')} (the "
                "file changed after 'embcomp compress' wrote it)"
            )
        elif result.get("bad_rows") and "skipped_rows" not in result:
            self.unknown_ids = (
                f"{sidecar} says {result['bad_rows']} input rows were skipped but not which "
                "(an older embcomp wrote it)"
            )
        elif not isinstance(skipped, list) or len(skipped) != (result.get("bad_rows") or 0):
            self.unknown_ids = f"{sidecar} does not list the skipped rows it counts"
        if self.unknown_ids is not None:
            return None
        # kept row p is input row p + (number of skipped rows s_i with s_i - i <= p)
        return first_id, np.asarray(skipped, dtype=np.int64) - np.arange(len(skipped))

    def position_gap(self):
        if self._origin is None or not len(self._origin[1]):
            return None
        return _skipped_words(self.meta["result"]["skipped_rows"], self.path.name)

    def row_ids(self, rows):
        """Codes ``embcomp compress`` wrote to .npy get the ids of the input rows they
        encode (their record gives the input's place in its directory and the rows
        it skipped as bad), not their position among the codes."""
        if self.unknown_ids is not None:
            raise InputError(f"{self.path}: {self.unknown_ids}; its rows' ids are unknown")
        if self._origin is None:
            return super().row_ids(rows)
        first_id, steps = self._origin
        return rows + first_id + np.searchsorted(steps, rows, side="right")

    def _read(self, start, stop, block_rows):
        """Blocks are views of a read-only shared memory map, so float32 input is never
        copied. The kernel is asked to read the next block ahead (``MADV_WILLNEED``) and
        to drop a block's pages from this process once the consumer asks for the next
        one (``MADV_DONTNEED``; the page cache keeps them), so resident memory stays
        about one block whatever the file size."""
        row_bytes = self.width * self.dtype.itemsize
        if stop <= start or row_bytes == 0:
            return
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        advise = getattr(mapped, "madvise", None)  # Python >= 3.8 on Linux/macOS

        def span(first: int, last: int) -> tuple[int, int]:
            lo = (self.data_offset + first * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
            return lo, self.data_offset + last * row_bytes - lo

        for b_start in range(start, stop, block_rows):
            b_stop = min(b_start + block_rows, stop)
            if advise is not None and b_stop < stop:
                advise(mmap.MADV_WILLNEED, *span(b_stop, min(b_stop + block_rows, stop)))
            data = np.frombuffer(
                mapped,
                dtype=self.dtype,
                count=(b_stop - b_start) * self.width,
                offset=self.data_offset + b_start * row_bytes,
            ).reshape(-1, self.width)
            data, reasons = _float32_rows(data) if self.kind == "vectors" else (data, {})
            yield b_start, data, None, reasons
            del data
            if advise is not None:
                advise(mmap.MADV_DONTNEED, *span(b_start, b_stop))

    def read_rows(self, rows):
        # Read just the sampled rows, one positioned read each: through a memory map,
        # the kernel maps 64 KiB around every touched row (fault-around), and a
        # 100,000-row sample of a 4 GB file kept 3.6 GB resident.
        row_bytes = self.width * self.dtype.itemsize
        out = np.empty((rows.size, self.width), dtype=self.dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as handle:
            fd = handle.fileno()
            for i, row in enumerate(rows.tolist()):
                target = flat[i * row_bytes : (i + 1) * row_bytes]
                if os.preadv(fd, [target], self.data_offset + row * row_bytes) != row_bytes:
                    raise InputError(f"{self.path}: truncated at row {row}")
        return _checked_gather(self, out, rows, gathered=True)


def _checked_gather(
    source: Source, matrix: np.ndarray, rows: np.ndarray, *, gathered: bool = False
) -> np.ndarray:
    """float32 copy of ``matrix[rows]`` (``matrix`` itself if ``gathered``); a
    non-finite row raises naming its file row."""
    data, beyond = _float32_rows(np.asarray(matrix if gathered else matrix[rows]))
    bad = {**nonfinite_reasons(data), **beyond}
    if bad:
        first = min(bad)
        raise InputError(
            BadRow(str(source.path), int(rows[first]), None, bad[first]).message()
            + "; repair or drop it before fitting"
        )
    return data


def _read_sidecar_meta(path: Path) -> dict[str, Any] | None:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{sidecar} is not valid JSON: {exc}") from exc
    return meta if isinstance(meta, dict) else None


# -- .fvecs ----------------------------------------------------------------------------
class FvecsSource(Source):
    format = "fvecs"

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(path, kind)
        if kind != "vectors":
            raise InputError(f"{path}: .fvecs holds vectors, not codes")
        if self.nbytes < 4:
            raise InputError(f"{path} is empty")
        d = int(np.fromfile(path, dtype="<i4", count=1)[0])
        record = 4 * (d + 1)
        if d <= 0 or self.nbytes % record:
            raise InputError(
                f"{path}: first record says dim {d}, but the file size {self.nbytes} is not a "
                f"multiple of {record} bytes (truncated or not .fvecs)"
            )
        self.n_rows, self.width = self.nbytes // record, d

    def _read(self, start, stop, block_rows):
        d = self.width
        with open(self.path, "rb") as handle:
            handle.seek(start * 4 * (d + 1))
            for b_start in range(start, stop, block_rows):
                n = min(block_rows, stop - b_start)
                records = np.fromfile(handle, dtype="<i4", count=n * (d + 1))
                if records.size != n * (d + 1):
                    raise InputError(f"{self.path}: file ended inside row {b_start} (truncated?)")
                records = records.reshape(n, d + 1)
                wrong = np.flatnonzero(records[:, 0] != d)
                if wrong.size:
                    row = b_start + int(wrong[0])
                    raise InputError(
                        f"{self.path}: record {row} says dim {records[wrong[0], 0]}, expected "
                        f"{d}; the file is corrupt"
                    )
                yield b_start, np.ascontiguousarray(records[:, 1:]).view("<f4"), None, {}

    def read_rows(self, rows):
        records = np.memmap(self.path, dtype="<i4", mode="r").reshape(-1, self.width + 1)
        wrong = np.flatnonzero(records[rows, 0] != self.width)
        if wrong.size:
            raise InputError(f"{self.path}: record {int(rows[wrong[0]])} has a wrong dim field")
        return _checked_gather(self, records[:, 1:].view("<f4"), rows)


# -- HDF5 (ann-benchmarks) -------------------------------------------------------------
class HDF5Source(Source):
    format = "hdf5"

    def __init__(self, path: Path, kind: str, dataset: str) -> None:
        super().__init__(path, kind)
        if kind != "vectors":
            raise InputError(f"{path}: HDF5 inputs hold vectors, not codes")
        h5py = _require_h5py()
        self.dataset = dataset
        try:
            with h5py.File(path, "r") as handle:
                if dataset not in handle:
                    raise InputError(
                        f"{path}: no dataset {dataset!r}; it has {sorted(handle.keys())}; "
                        "choose one with --dataset"
                    )
                ds = handle[dataset]
                shape, dtype = ds.shape, ds.dtype
        except OSError as exc:
            if _read_error_kind(exc) == "access":
                raise _access_error(path, exc) from exc
            raise InputError(f"{path} is not a readable HDF5 file: {exc}") from exc
        if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
            raise InputError(
                f"{path}: dataset {dataset!r} must be a 2-D float array; got shape {shape}, "
                f"dtype {dtype}"
            )
        self.n_rows, self.width = int(shape[0]), int(shape[1])
        self._itemsize = int(dtype.itemsize)

    def _column_note(self) -> str:
        return f" (dataset {self.dataset!r})"

    @property
    def data_bytes(self) -> int:
        # the dataset read, not the whole file (an ann-benchmarks file also holds the
        # queries and their neighbours: an 8x codec was reported 48x smaller)
        return self.n_rows * int(self.width or 0) * self._itemsize

    def _read(self, start, stop, block_rows):
        h5py = _require_h5py()
        try:
            handle = h5py.File(self.path, "r")
        except OSError as exc:
            self._raise_read_error(start, stop, exc)
            raise
        with handle:
            ds = handle[self.dataset]
            for b_start in range(start, stop, block_rows):
                b_stop = min(b_start + block_rows, stop)
                try:
                    data = ds[b_start:b_stop]
                except OSError as exc:  # e.g. a chunk that does not decompress
                    self._raise_read_error(b_start, b_stop, exc)
                    raise
                data, reasons = _float32_rows(np.asarray(data))
                yield b_start, data, None, reasons


# -- Parquet ---------------------------------------------------------------------------
def _is_float_list(pa: Any, typ: Any) -> bool:
    return (
        pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)
    ) and pa.types.is_floating(typ.value_type)


class ParquetSource(Source):
    format = "parquet"

    def __init__(
        self,
        path: Path,
        kind: str,
        column: str | None,
        id_column: str | None,
        width: int | None = None,
    ) -> None:
        super().__init__(path, kind)
        pa = require_pyarrow()
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            kind = _read_error_kind(exc)
            if kind == "access":
                raise _access_error(path, exc) from exc
            if kind == "other":
                raise
            if kind == "unsupported":
                raise InputError(
                    f"{path}: the installed reader does not support what the file uses ({exc})"
                ) from exc
            raise InputError(f"{path} is not a readable Parquet file (truncated?): {exc}") from exc
        self.n_rows = meta.num_rows
        self.group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        kv = meta.metadata or {}
        if PARQUET_META_KEY in kv:
            try:
                self.meta = json.loads(kv[PARQUET_META_KEY])
            except ValueError:
                self.meta = None
        if kind == "codes":
            # embcomp's own outputs name their id column in the metadata.
            id_column = id_column or (self.meta or {}).get("id_column")
            if id_column is None and "id" in schema.names:
                id_column = "id"
        self.column = column or self._guess_column(pa, schema)
        if self.column not in schema.names:
            raise InputError(
                f"{path}: no column {self.column!r}; columns are {schema.names}; "
                "choose one with --column"
            )
        self.type = schema.field(self.column).type
        if kind == "vectors":
            if not _is_float_list(pa, self.type):
                raise InputError(
                    f"{path}: column {self.column!r} has type {self.type}; expected "
                    "fixed_size_list<float> or list<float> embeddings"
                )
            if pa.types.is_fixed_size_list(self.type):
                self.width = self.type.list_size
            else:
                # Known only per row, and checked row by row; the usual length sets it
                # now: block sizes depend on it (fit --sample read a whole row group as
                # one block without it), and rows whose usual length differs from the
                # codec's would all be "bad" (an empty output with --on-bad-row skip).
                usual = self._usual_list_length()
                self.width = width if usual is None else usual
        else:
            if not pa.types.is_fixed_size_binary(self.type):
                raise InputError(
                    f"{path}: column {self.column!r} has type {self.type}; expected "
                    "fixed_size_binary codes as written by 'embcomp compress'"
                )
            self.width = self.type.byte_width
        if id_column is not None:
            if id_column not in schema.names:
                raise InputError(f"{path}: no id column {id_column!r}; columns are {schema.names}")
            self.id_field = schema.field(id_column)

    def position_gap(self):
        """Codes of an input without ids carry its row numbers in ``id``: a gap between
        the first and last (from the footer's statistics, else the column) is rows
        skipped as bad."""
        if self.kind != "codes" or self.id_field is None or self.n_rows == 0:
            return None
        if self.id_field.name != "id" or (self.meta or {}).get("id_column", "") is not None:
            return None
        import pyarrow.parquet as pq

        index = pq.read_schema(self.path).get_field_index("id")
        meta = pq.read_metadata(self.path)
        stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats):
            first = min(int(s.min) for s in stats)
            last = max(int(s.max) for s in stats)
        else:
            ids = pq.read_table(self.path, columns=["id"]).column(0).to_numpy()
            first, last = int(ids.min()), int(ids.max())
        missing = last - first + 1 - self.n_rows
        if missing <= 0:
            return None
        return (
            f"its ids (the input's row numbers) run from {first} to {last} but leave out "
            f"{missing:,} (rows skipped as bad when it was compressed)"
        )

    def _usual_list_length(self) -> int | None:
        """The most common length among the first block's non-null rows (None if none)."""
        pa = require_pyarrow()
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(self.path, buffer_size=8 << 20, pre_buffer=False)
            try:
                batch = next(handle.iter_batches(batch_size=1024, columns=[self.column]), None)
            finally:
                handle.close()
        except (OSError, pa.ArrowException) as exc:
            self._raise_read_error(0, min(1024, self.n_rows), exc)
            raise
        if batch is None:
            return None
        array = batch.column(0)
        lengths = np.diff(np.asarray(array.offsets, dtype=np.int64))[~_null_mask(array)]
        if lengths.size == 0:
            return None
        seen, counts = np.unique(lengths, return_counts=True)
        return int(seen[np.argmax(counts)])

    def _guess_column(self, pa: Any, schema: Any) -> str:
        if self.kind == "codes":
            return DEFAULT_CODE_COLUMN
        candidates = [f.name for f in schema if _is_float_list(pa, f.type)]
        if "embedding" in candidates:
            return "embedding"
        if len(candidates) == 1:
            return candidates[0]
        raise InputError(
            f"{self.path}: cannot tell which column holds the embeddings (float list "
            f"columns: {candidates}, all columns: {schema.names}); pass --column"
        )

    def _column_note(self) -> str:
        return f" column {self.column!r}"

    def split(self, target_rows):
        ranges, start, acc = [], 0, 0
        for rows in self.group_rows:
            acc += rows
            if acc - start >= target_rows:
                ranges.append((start, acc))
                start = acc
        if acc > start:
            ranges.append((start, acc))
        return ranges

    def _groups(self, start: int, stop: int) -> tuple[list[int], int]:
        """Row groups overlapping [start, stop) and the first row of the first one."""
        groups, first, pos = [], None, 0
        for i, rows in enumerate(self.group_rows):
            if pos < stop and pos + rows > start:
                groups.append(i)
                first = pos if first is None else first
            pos += rows
        return groups, (start if first is None else first)

    def _read(self, start, stop, block_rows):
        pa = require_pyarrow()
        import pyarrow.parquet as pq

        groups, pos = self._groups(start, stop)
        if not groups:
            return
        end = pos + sum(self.group_rows[i] for i in groups)
        columns = [self.column] + ([self.id_field.name] if self.id_field is not None else [])
        # Buffered page-by-page reads: by default pyarrow loads a whole column chunk of a
        # row group at once (1.5 GB for one default-sized group of 1M x 384 floats);
        # this way memory is a block plus an 8 MiB buffer, and reading is no slower.
        try:
            handle = pq.ParquetFile(self.path, buffer_size=8 << 20, pre_buffer=False)
        except (OSError, pa.ArrowException) as exc:
            self._raise_read_error(pos, end, exc)
            raise
        try:
            batches = handle.iter_batches(
                batch_size=block_rows, row_groups=groups, columns=columns, use_threads=False
            )
            while True:
                try:  # pages are decoded here: a corrupt one fails in pyarrow
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as exc:
                    self._raise_read_error(pos, min(pos + block_rows, end), exc)
                    raise
                if batch is None:
                    return
                b_start, b_stop = pos, pos + batch.num_rows
                pos = b_stop
                lo, hi = max(start, b_start), min(stop, b_stop)
                if lo >= hi:
                    continue
                batch = batch.slice(lo - b_start, hi - lo)
                ids = batch.column(1) if self.id_field is not None else None
                data, reasons = self._convert(batch.column(0))
                yield lo, data, ids, reasons
        finally:
            handle.close()

    def _read_covering(self, rows):
        # Row groups holding any of the rows, in blocks (a default row group of 1M x 384
        # floats read as one batch held 4 GB while fitting on a sample of it)
        pos, step = 0, self.default_block_rows()
        for rows_in_group in self.group_rows:
            stop = pos + rows_in_group
            if ((rows >= pos) & (rows < stop)).any():
                yield from self._read(pos, stop, min(rows_in_group, step))
            pos = stop

    def _convert(self, array: Any) -> tuple[np.ndarray, dict[int, str]]:
        """Arrow column -> (data (n, width), {row: reason}) with bad rows zero-filled."""
        if self.kind == "codes":
            return self._convert_codes(array)
        pa = require_pyarrow()
        n = len(array)
        reasons: dict[int, str] = {}
        if array.null_count:
            for i in np.flatnonzero(_null_mask(array)):
                reasons[int(i)] = "is null (no vector)"
        if pa.types.is_fixed_size_list(array.type):
            d = array.type.list_size
            data, beyond = _float_rows(array.values.slice(array.offset * d, n * d), n, d)
            return data, {**beyond, **reasons}
        # Variable-length lists: every row must hold exactly `width` values.
        offsets = np.asarray(array.offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        good = np.ones(n, dtype=bool)
        good[list(reasons)] = False
        if self.width is None:
            # A list column states no width: the most common length among the first
            # block's non-null rows sets it (so one short first row is the bad one).
            if not good.any():
                return np.zeros((n, 0), dtype=np.float32), reasons
            seen, counts = np.unique(lengths[good], return_counts=True)
            self.width = int(seen[np.argmax(counts)])
        d = self.width
        for i in np.flatnonzero(good & (lengths != d)):
            reasons[int(i)] = f"has {int(lengths[i])} values, expected {d}"
        good &= lengths == d
        values = array.values
        if good.all():
            return _float_rows(values.slice(int(offsets[0]), n * d), n, d)
        out = np.zeros((n, d), dtype=np.float32)
        if good.any():
            flat = values.to_numpy(zero_copy_only=False)
            kept = np.flatnonzero(good)
            out[kept], beyond = _float32_rows(flat[offsets[:-1][kept][:, None] + np.arange(d)])
            reasons.update({int(kept[i]): why for i, why in beyond.items()})
        return out, reasons

    def _convert_codes(self, array: Any) -> tuple[np.ndarray, dict[int, str]]:
        n, width = len(array), int(self.width or 0)
        reasons = {int(i): "is null (no code)" for i in np.flatnonzero(_null_mask(array))}
        buffer = array.buffers()[1]
        data = np.frombuffer(buffer, dtype=np.uint8)[
            array.offset * width : (array.offset + n) * width
        ]
        return data.reshape(n, width), reasons


def _skipped_words(rows: list[int], name: str) -> str:
    shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    which = f"row {shown} was" if len(rows) == 1 else f"{len(rows):,} rows ({shown}) were"
    return f"input {which} skipped as bad when it was compressed (see {name}.skipped.tsv)"


def _null_mask(array: Any) -> np.ndarray:
    return np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _float_rows(values: Any, n: int, d: int) -> tuple[np.ndarray, dict[int, str]]:
    """Arrow float values -> float32 (n, d) and {row: reason} for rows beyond float32's
    range (see :func:`_float32_rows`); nulls become NaN (so they count as bad)."""
    return _float32_rows(values.to_numpy(zero_copy_only=False).reshape(n, d))


# -- opening inputs --------------------------------------------------------------------
def vector_format(path: Path, kind: str = "vectors") -> str | None:
    """The format a file name implies for ``kind``, or None if unsupported."""
    table = VECTOR_SUFFIXES if kind == "vectors" else CODE_SUFFIXES
    return table.get(path.suffix.lower())


def _input_files(path: Path, kind: str) -> list[Path]:
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist")
    if path.is_file():
        if vector_format(path, kind) is None:
            supported = sorted(VECTOR_SUFFIXES if kind == "vectors" else CODE_SUFFIXES)
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use {supported}")
        return [path]
    visible = [p for p in path.iterdir() if not p.name.startswith((".", "_"))]
    files = sorted(p for p in visible if p.is_file() and vector_format(p, kind) is not None)
    for sub in sorted(p for p in visible if p.is_dir()):
        nested = next(
            (f for f in sub.rglob("*") if f.is_file() and vector_format(f, kind) is not None),
            None,
        )
        if nested is not None:  # e.g. a Hive-style date=.../part-0.parquet layout
            raise InputError(
                f"{nested} is in a subdirectory of {path}, and a directory input is read "
                "one level deep (its files would be left out); pass each directory "
                "separately, or move the files up"
            )
    if not files:
        raise InputError(f"directory {path} holds no supported input files ({kind})")
    return files


def open_sources(
    path: str | os.PathLike[str],
    *,
    kind: str = "vectors",
    column: str | None = None,
    id_column: str | None = None,
    dataset: str = "train",
    width: int | None = None,
) -> list[Source]:
    """Open a file or a directory of shards as a list of :class:`Source`.

    Parameters
    ----------
    path : a supported file, or a directory of them (sorted by name).
    kind : ``"vectors"`` or ``"codes"``.
    column, id_column : Parquet embedding/code column (guessed when there is one float
        list column, or ``embedding``/``code``) and an optional id column.
    dataset : HDF5 dataset name.
    width : expected row width, if known (a codec's ``d_in`` or ``code_size``); used
        to check ``list<float>`` rows.

    Raises
    ------
    InputError
        Missing input, unsupported or unreadable file, missing column.
    """
    if kind not in ("vectors", "codes"):
        raise ValueError(f"kind must be 'vectors' or 'codes', got {kind!r}")
    sources: list[Source] = []
    offset = 0
    for file in _input_files(Path(path), kind):
        fmt = vector_format(file, kind)
        source: Source
        if fmt == "npy":
            source = NpySource(file, kind)
        elif fmt == "fvecs":
            source = FvecsSource(file, kind)
        elif fmt == "hdf5":
            source = HDF5Source(file, kind, dataset)
        else:
            source = ParquetSource(file, kind, column, id_column, width)
        source.offset = offset
        offset += source.n_rows
        sources.append(source)
    return sources


def iter_blocks(
    path: str | os.PathLike[str] | Sequence[Source],
    *,
    block_rows: int | None = None,
    on_bad_row: str = "fail",
    check_finite: bool = True,
    **open_options: Any,
) -> Iterator[Block]:
    """Stream every row of a file or directory as :class:`Block` s of float32 vectors.

    Memory is a few blocks whatever the input size. ``block.global_rows`` gives each
    row's position in the whole input; ``block.ids`` the id column, if any.

    >>> for block in iter_blocks("shards/", column="emb"):   # doctest: +SKIP
    ...     codes = codec.encode(block.data)
    """
    if isinstance(path, (str, os.PathLike)):
        sources: Sequence[Source] = open_sources(path, **open_options)
    else:
        sources = path
    for source in sources:
        rows = block_rows or source.default_block_rows()
        yield from source.iter_blocks(rows, on_bad_row=on_bad_row, check_finite=check_finite)
