"""The Ray Data engine: the same job as the local engine, spread over a Ray cluster.

Pipeline::

    from_items(units)                       one unit = (input file, row range), row-group
      .map_batches(read units)              aligned for Parquet; read by the same
                                            streaming readers as the local engine
      .map_batches(encode or decode)        the codec travels as artifact bytes
      .write_parquet(temporary directory)   renamed to OUTPUT when every task is done

Reading through embcomp's own readers (rather than ``ray.data.read_parquet``) keeps
what the local engine guarantees: the same inputs (Parquet, ``.npy``, ``.fvecs``,
HDF5), bad rows named by file and row number, and ids equal to the global row number
when there is no id column. Units are read in the local engine's blocks and encoded
with :func:`encode_rows`, so the codes equal the local engine's byte for byte.

The output is a directory of Parquet part files plus ``_embcomp.json``, the job
record (codec id, every input's fingerprint, rows per part) that makes a rerun skip
a finished job. Skipped bad rows go to ``_skipped.tsv``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import guard, remove_stale_directory
from .._readers import BadRow, Block, Source, block_rows_for, require_pyarrow
from ..artifacts import codec_from_bytes, codec_to_bytes
from ..codec import Codec
from ..exceptions import EmbcompError, InputError
from ._engine import BatchReport, Job
from ._rows import transform_block
from ._sinks import OutputSpec, _schema, _table, write_skipped

__all__ = ["RECORD_NAME", "require_ray", "run_ray"]

RECORD_NAME = "_embcomp.json"
SKIPPED_NAME = "_skipped.tsv"


def require_ray() -> Any:
    """Import Ray Data or say which extra provides it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "--engine ray needs Ray Data, which is not installed: pip install 'embcomp[ray]'"
        ) from exc
    require_pyarrow()
    return ray


# -- worker side -----------------------------------------------------------------------
@lru_cache(maxsize=4)
def _codec(artifact: bytes) -> Codec:
    return codec_from_bytes(artifact, source="<codec shipped to a Ray worker>")


def _payload_array(data: np.ndarray) -> Any:
    """uint8 codes -> fixed_size_binary; float32 vectors -> fixed_size_list<float32>."""
    pa = require_pyarrow()
    n, width = data.shape
    if data.dtype == np.uint8:
        return pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(data))]
        )
    flat = pa.array(np.ascontiguousarray(data).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _payload_numpy(column: Any, width: int, dtype: np.dtype) -> np.ndarray:
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(array)
    if dtype == np.uint8:
        flat = np.frombuffer(array.buffers()[1], dtype=np.uint8)
        return flat[array.offset * width : (array.offset + n) * width].reshape(n, width)
    values = array.values.slice(array.offset * width, n * width)
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


def _record_bad(log: Any, bad: list[BadRow]) -> None:
    if bad:
        import ray

        ray.get(log.add.remote(bad))


def _read_units(
    units: dict[str, np.ndarray],
    *,
    sources: list[Source],
    block_rows: int,
    on_bad_row: str,
    log: Any,
) -> Iterator[Any]:
    """Read each unit's rows block by block: tables of (__src, __row, __id?, __data)."""
    pa = require_pyarrow()
    for index, start, stop in zip(units["task"], units["start"], units["stop"], strict=True):
        source = sources[int(index)]
        for block in source.iter_blocks(block_rows, int(start), int(stop), on_bad_row=on_bad_row):
            _record_bad(log, block.bad)
            columns = {
                "__src": pa.array(np.full(len(block.rows), index, dtype=np.int32)),
                "__row": pa.array(block.rows),
                "__data": _payload_array(block.data),
            }
            if block.ids is not None:
                columns["__id"] = block.ids
            yield pa.table(columns)


def _transform(
    table: Any,
    *,
    artifact: bytes,
    command: str,
    sources: list[Source],
    outputs: list[OutputSpec],
    on_bad_row: str,
    log: Any,
    metadata: bytes,
) -> Any:
    """Encode or decode a batch of rows; returns the output table (id, payload).

    Every part file carries the same job-level metadata (codec id, spec, columns);
    per-input fingerprints live in the directory's record.
    """
    pa = require_pyarrow()
    codec = _codec(artifact)
    if table.num_rows == 0:
        return _schema(outputs[0]).empty_table().replace_schema_metadata({"embcomp": metadata})
    src = table.column("__src").to_numpy()
    rows = table.column("__row").to_numpy()
    parts = []
    # A batch normally holds one input file's rows; split it where the file changes.
    cuts = np.flatnonzero(np.diff(src)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(src)], strict=True):
        index = int(src[lo])
        source, spec = sources[index], outputs[index]
        piece = table.slice(int(lo), int(hi - lo))
        in_width = spec.job["d_in"] if command == "compress" else spec.job["code_size"]
        in_dtype = np.dtype(np.float32) if command == "compress" else np.dtype(np.uint8)
        data = _payload_numpy(piece.column("__data"), in_width, in_dtype)
        ids = piece.column("__id").combine_chunks() if "__id" in piece.column_names else None
        block = Block(source, data, rows[lo:hi], ids, int(rows[lo]), int(rows[hi - 1]) + 1)
        out, kept_rows, kept_ids, bad = transform_block(codec, block, command, on_bad_row)
        _record_bad(log, bad)
        parts.append(_table(spec, out, source.row_ids(kept_rows), kept_ids))
    return pa.concat_tables(parts).replace_schema_metadata({"embcomp": metadata})


# -- driver side -----------------------------------------------------------------------
def _job_record(job: Job) -> dict[str, Any]:
    first = job.tasks[0].output.job
    shared = {k: v for k, v in first.items() if k not in ("input", "id_offset")}
    inputs = [{**t.output.job["input"], "id_offset": t.output.job["id_offset"]} for t in job.tasks]
    record = {**shared, "engine": "ray", "inputs": inputs}
    return json.loads(json.dumps(record, sort_keys=True))


def _is_complete(directory: Path, record: dict[str, Any]) -> bool:
    import pyarrow.parquet as pq

    try:
        stored = json.loads((directory / RECORD_NAME).read_text())
        if stored.get("job") != record:
            return False
        for name, rows in stored["files"].items():
            if pq.read_metadata(directory / name).num_rows != rows:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _user_error(exc: BaseException) -> EmbcompError | None:
    """The embcomp error a Ray task raised, found through Ray's wrappers."""
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, EmbcompError) and type(err).__module__ == "embcomp.exceptions":
            return err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
    return None


@contextlib.contextmanager
def _ray_session(address: str | None, quiet: bool) -> Iterator[Any]:
    """Connect to (or start) Ray and configure Ray Data; restore everything afterwards."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": logging.ERROR if quiet else logging.INFO}
        if address is None:
            options["include_dashboard"] = False
        # ray.init installs its own SIGTERM handler (a C++ stack dump, exit 15): keep
        # the caller's (the CLI's unwinds, so the scratch directory goes and Ray stops)
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, **options)
        started = True
        if threading.current_thread() is threading.main_thread() and handler is not None:
            signal.signal(signal.SIGTERM, handler)
    with warnings.catch_warnings():
        # Ray Data warns about its own deprecated defaults when it builds its context.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
        context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    # Raise a UDF's own exception (our InputError naming file and row), not a wrapper
    # holding only its traceback text. Older Ray lacks the switch; errors then come
    # through as Ray's exceptions, still with the message in them.
    saved_raise = getattr(context, "raise_original_map_exception", None)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    try:
        context.execution_options.preserve_order = True
        context.enable_progress_bars = not quiet
        if saved_raise is not None:
            context.raise_original_map_exception = True
        # Its errors reach us as exceptions, reported in one line (a bad row was 233
        # lines of logged tracebacks): only a crash of Ray itself is logged
        data_logger.setLevel(logging.CRITICAL)
        yield ray
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if saved_raise is not None:
            context.raise_original_map_exception = saved_raise
        data_logger.setLevel(saved_level)
        if started:
            ray.shutdown()


def run_ray(
    job: Job,
    *,
    address: str | None,
    block_rows: int | None,
    unit_rows: int | None,
    progress: bool,
    overwrite: bool,
) -> BatchReport:
    """Run a planned job on Ray Data; returns the report (see module doc for the layout)."""
    start = time.monotonic()
    report = BatchReport(job.command, "ray", files=len(job.tasks))
    record = _job_record(job)
    if not overwrite and _is_complete(job.output, record):
        report.files_already_complete = len(job.tasks)
        report.seconds = time.monotonic() - start
        return report
    _check_replaceable(job.output, [task.source.path for task in job.tasks], overwrite)
    sources = [task.source for task in job.tasks]
    rows = block_rows or block_rows_for(job.codec.d_in or 1)
    units = [
        {"task": i, "start": lo, "stop": hi}
        for i, source in enumerate(sources)
        for lo, hi in source.split(unit_rows or 8 * rows)
    ]
    _remove_stale_scratch(job.output)
    scratch = job.output.parent / f".{job.output.name}.tmp-{uuid.uuid4().hex[:12]}"
    with guard(scratch):  # tells a later run that this scratch is in use
        files, total_bad = _write_through_scratch(
            job, scratch, record, units, rows, address=address, progress=progress
        )
    report.files_done = len(job.tasks)
    report.rows_read = sum(source.n_rows for source in sources)
    report.vectors = sum(files.values())
    report.bad_rows = total_bad
    report.bytes_in = sum(source.data_bytes for source in sources)
    report.bytes_out = sum((job.output / name).stat().st_size for name in files)
    report.outputs = [str(job.output / name) for name in files]
    report.seconds = time.monotonic() - start
    return report


def _write_through_scratch(
    job: Job,
    scratch: Path,
    record: dict[str, Any],
    units: list[dict[str, int]],
    rows: int,
    *,
    address: str | None,
    progress: bool,
) -> tuple[dict[str, int], int]:
    """Run the Ray Data job into ``scratch`` and move it to the output; returns the
    rows of each part file and the number of bad rows."""
    import pyarrow.parquet as pq

    sources = [task.source for task in job.tasks]
    outputs = [task.output for task in job.tasks]
    try:
        with _ray_session(address, quiet=not progress) as ray:
            log = _skip_log_class(ray).remote()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
                dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
            dataset = dataset.map_batches(
                _read_units,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={
                    "sources": sources,
                    "block_rows": rows,
                    "on_bad_row": job.on_bad_row,
                    "log": log,
                },
            ).map_batches(
                _transform,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={
                    "artifact": codec_to_bytes(job.codec),
                    "command": job.command,
                    "sources": sources,
                    "outputs": outputs,
                    "on_bad_row": job.on_bad_row,
                    "log": log,
                    "metadata": json.dumps(record, sort_keys=True).encode(),
                },
            )
            try:
                dataset.write_parquet(str(scratch))
            except Exception as exc:
                found = _user_error(exc)
                if found is None:
                    raise
                # Ray appends lines of retry advice to the message; ours is one line
                raise type(found)(str(found).split("\n", 1)[0]) from None
            # A retried task may report a row twice: keep one entry per (file, row).
            unique = {(b.path, b.row): b for b in ray.get(log.rows.remote())}
            bad: list[BadRow] = [unique[key] for key in sorted(unique)]
        scratch.mkdir(exist_ok=True)  # an input with no rows writes no part file
        if not any(scratch.glob("*.parquet")):  # one empty part, so the output reads back
            meta = {"embcomp": json.dumps(record, sort_keys=True).encode()}
            empty = _schema(outputs[0]).empty_table().replace_schema_metadata(meta)
            pq.write_table(empty, scratch / "part-empty.parquet")
        files = {p.name: pq.read_metadata(p).num_rows for p in sorted(scratch.glob("*.parquet"))}
        total_bad = len(bad)
        stored = {"job": record, "files": files, "rows": sum(files.values()), "bad_rows": total_bad}
        (scratch / RECORD_NAME).write_text(json.dumps(stored, indent=1, sort_keys=True))
        write_skipped(scratch / SKIPPED_NAME, bad)
        _replace_dir(scratch, job.output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return files, total_bad


def _remove_stale_scratch(output: Path) -> None:
    """Remove the scratch directories of earlier runs for ``output`` that were killed
    (SIGKILL runs no clean-up; see :func:`embcomp._atomic.remove_stale_directory`)."""
    name = re.compile(rf"\.{re.escape(output.name)}\.tmp-[0-9a-f]{{12}}")
    candidates: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(output.parent) as scan:
        candidates = {entry.name.removesuffix(".lock") for entry in scan}
    for candidate in sorted(c for c in candidates if name.fullmatch(c)):
        remove_stale_directory(output.parent / candidate)


def _check_replaceable(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output directory whose replacement would delete what no Ray job of
    embcomp wrote: an input (never), or other files (only with ``overwrite``)."""
    if not output.is_dir():
        return
    inside = [p for p in inputs if output.resolve() in p.resolve().parents]
    if inside:
        raise InputError(
            f"input {str(inside[0])!r} lies inside the output directory {str(output)!r}, "
            "which the job replaces as a whole; choose an output outside the inputs"
        )
    entries = {p.name for p in output.iterdir()}
    if not entries:
        return
    try:
        written = json.loads((output / RECORD_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"output directory {str(output)!r} exists, is not empty and is not an "
            "output of 'embcomp compress --engine ray'; choose a new or empty directory"
        ) from None
    foreign = sorted(entries - set(written) - {RECORD_NAME, SKIPPED_NAME})
    if foreign and not overwrite:
        raise InputError(
            f"output directory {str(output)!r} holds {len(foreign)} file(s) no embcomp "
            f"job wrote ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
            "which replacing it would delete; move them, or pass --overwrite"
        )


def _replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory to its final name (replacing an old output)."""
    if final.exists() and any(final.iterdir()):
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        final.rename(trash)
        new.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if final.exists():
            final.rmdir()
        new.rename(final)


@lru_cache(maxsize=1)
def _skip_log_class(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class SkipLog:
        """Collects rows the tasks skipped (few, by nature) for the driver's report."""

        def __init__(self) -> None:
            self.skipped: list[BadRow] = []

        def add(self, rows: list[BadRow]) -> None:
            self.skipped.extend(rows)

        def rows(self) -> list[BadRow]:
            return self.skipped

    return SkipLog
