"""Planning a batch job and running it with the local engine.

A job maps each input file (a *source*) to one output. Planning opens every source
(metadata only), checks widths against the codec, decides output names and formats,
and checks that the output directory is writable, all before any work is done. The
local engine then streams each source through a reader thread (so reading overlaps
encoding) into an output written under a temporary name.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import Temporary, remove_stale_temporaries_in
from .._readers import DEFAULT_CODE_COLUMN, Source, block_rows_for, open_sources, vector_format
from .._validation import check_not_an_input
from ..artifacts import codec_id
from ..codec import Codec
from ..exceptions import ArtifactError, InputError
from ._progress import Progress, format_bytes
from ._rows import transform_block
from ._sinks import (
    RECORD_FORMAT,
    RECORD_VERSION,
    OutputSpec,
    is_complete,
    open_sink,
    written_by_embcomp,
)

__all__ = ["BatchReport", "Job", "compress", "decompress", "plan_job"]

COMMANDS = ("compress", "decompress")
FORMATS = ("npy", "parquet")
BAD_ROW_POLICIES = ("fail", "skip")
_SUFFIX = {"npy": ".npy", "parquet": ".parquet"}


@dataclass
class BatchReport:
    """What a batch run did. ``str(report)`` is the one-line summary the CLI prints."""

    command: str
    engine: str
    files: int = 0
    files_done: int = 0
    files_already_complete: int = 0
    rows_read: int = 0
    vectors: int = 0
    bad_rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Bytes in / bytes out (compress), or bytes out / bytes in (decompress)."""
        big, small = (
            (self.bytes_in, self.bytes_out)
            if self.command == "compress"
            else (self.bytes_out, self.bytes_in)
        )
        return big / small if small else 0.0

    @property
    def vectors_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if self.files_done == 0:
            return (
                f"{self.command}: nothing to do, all {self.files} output(s) already complete "
                f"and valid (0 vectors processed, {self.seconds:.2f} s)"
            )
        resumed = (
            f"; {self.files_already_complete} output(s) already complete"
            if self.files_already_complete
            else ""
        )
        return (
            f"{self.command}: {self.vectors:,} vectors from {self.files_done} file(s), "
            f"{format_bytes(self.bytes_in)} in -> {format_bytes(self.bytes_out)} out "
            f"({self.ratio:.2f}x {'smaller' if self.command == 'compress' else 'larger'}) "
            f"in {self.seconds:.2f} s "
            f"({self.vectors_per_second:,.0f} vectors/s); "
            f"{self.bad_rows:,} bad rows skipped{resumed} [{self.engine}]"
        )


@dataclass
class Task:
    """One input file and the output it becomes."""

    source: Source
    output: OutputSpec


@dataclass
class Job:
    """A planned batch job: the codec, the tasks and where they go."""

    command: str
    codec: Codec
    codec_id: str
    tasks: list[Task]
    output: Path
    output_is_dir: bool
    on_bad_row: str
    read_options: dict[str, Any]
    created_output_dir: bool = False


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}; got {value!r}")


PROBE_NAME = "embcomp-probe"  # check_writable's file (".embcomp-probe.<random>.tmp")


def check_writable(directory: Path, *, create: bool = True) -> bool:
    """Prove a file can be written in ``directory``; returns True if it had to create it."""
    created = False
    try:
        if create and not directory.exists():
            directory.mkdir(parents=True)
            created = True
        # named like atomic_output's temporaries, so that the sweep of a later run
        # removes one that a kill left behind
        probe = Temporary(directory, PROBE_NAME)
        try:
            os.close(probe.create())
        finally:
            probe.remove()
        return created
    except (PermissionError, FileExistsError, NotADirectoryError, OSError) as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"cannot write to output directory {str(directory)!r}: {reason}; "
            "choose a writable location"
        ) from exc


def _format_for(requested: str | None, output: Path, source_fmt: str, single: bool) -> str:
    from_suffix = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet"}.get(
        output.suffix.lower()
    )
    if requested is not None:
        _check_choice("--format", requested, FORMATS)
        if single and from_suffix is None and vector_format(output) is not None:
            raise InputError(
                f"output {str(output)!r} has suffix {output.suffix!r}, but --format "
                f"{requested} writes a .{requested} file (readers would take it for "
                f"{vector_format(output)}); name it {output.stem}{_SUFFIX[requested]}"
            )
        if single and from_suffix is not None and from_suffix != requested:
            raise InputError(
                f"output {str(output)!r} has suffix {output.suffix!r} but --format is "
                f"{requested}; make them agree"
            )
        return requested
    if single and from_suffix is not None:
        return from_suffix
    return "parquet" if source_fmt == "parquet" else "npy"


_FORMAT_SUFFIXES = (".npy", ".parquet", ".pq")


def plan_job(
    command: str,
    codec: Codec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None = None,
    id_column: str | None = None,
    dataset: str = "train",
    output_format: str | None = None,
    on_bad_row: str = "fail",
    engine: str = "local",
    overwrite: bool = False,
) -> Job:
    """Open the inputs, check them against the codec and decide every output.

    An existing file at an output path is replaced only if an earlier batch job wrote
    it, or with ``overwrite``; never if it is one of the inputs.

    Raises ``InputError`` / ``DimensionMismatchError`` / ``ArtifactError`` before any
    output is touched.
    """
    _check_choice("command", command, COMMANDS)
    _check_choice("--on-bad-row", on_bad_row, BAD_ROW_POLICIES)
    d_in = codec._check_fitted()
    cid = codec_id(codec)
    in_path, out_path = Path(input), Path(output)
    kind = "vectors" if command == "compress" else "codes"
    read_column = column if command == "compress" else DEFAULT_CODE_COLUMN
    width = d_in if command == "compress" else codec.code_size
    sources = open_sources(
        in_path, kind=kind, column=read_column, id_column=id_column, dataset=dataset,
        width=width,
    )  # fmt: skip
    what = f"codec {str(codec.spec)!r}"
    for source in sources:
        if id_column is not None and source.format != "parquet":
            raise InputError(
                f"{source.path}: --id-column {id_column!r} names a Parquet column, but this "
                f"is a .{source.format} file, which has no columns (its rows get their row "
                "numbers as ids); drop --id-column or give Parquet inputs"
            )
        if source.id_field is not None and source.id_field.name == getattr(source, "column", None):
            raise InputError(
                f"{source.path}: --id-column {source.id_field.name!r} is the embedding column; "
                "name the column that holds the ids"
            )
        source.check_width(width, what)
        meta = source.meta or {}
        stored = meta.get("codec_id")
        if command == "decompress" and "result" in meta and meta["result"] is None:
            raise InputError(
                f"{source.path} is incomplete: its record says a compress into it (codec "
                f"{stored}, {meta.get('spec')}) was interrupted, so it may hold another "
                "job's codes; rerun that compress first"
            )
        if command == "decompress" and stored is not None and stored != cid:
            raise ArtifactError(
                f"{source.path} was encoded with codec {stored} ({meta.get('spec')}), "
                f"but the codec given is {cid} ({codec.spec}); decode with the codec that "
                "encoded it"
            )
    single = in_path.is_file() and engine == "local"
    if single and str(output).endswith(("/", os.sep)):
        raise InputError(
            f"output {str(output)!r} names a directory but the input is one file; "
            "give an output file name (.npy or .parquet)"
        )
    if in_path.resolve() == out_path.resolve():
        raise InputError(f"output {str(out_path)!r} is the input; choose another path")
    if in_path.is_dir() and in_path.resolve() in out_path.resolve().parents:
        # the first run would work, but a rerun (resume) would find the outputs in a
        # subdirectory of the input and refuse it, or read them as inputs
        raise InputError(
            f"output {str(out_path)!r} is inside the input directory {str(in_path)!r}, "
            "where a rerun would take the outputs for inputs; choose an output outside it"
        )
    if single and out_path.is_dir():
        raise InputError(
            f"output {str(out_path)!r} is a directory but the input is one file; "
            "give an output file name"
        )
    if not single and vector_format(out_path) not in (None, "parquet"):
        # (a Parquet dataset directory is often named x.parquet; x.npy is taken for a file)
        raise InputError(
            f"output {str(out_path)!r} would be a directory of outputs (the input is a "
            f"directory, or the engine is Ray) but has the file suffix {out_path.suffix!r}; "
            "name it without one"
        )
    if not single and out_path.is_file():
        raise InputError(
            f"output {str(out_path)!r} is a file; a directory input (or the Ray engine) "
            "writes a directory of outputs"
        )
    tasks: list[Task] = []
    names: dict[str, str] = {}
    for source in sources:
        fmt = _format_for(
            output_format or ("parquet" if engine == "ray" else None), out_path, source.format,
            single,
        )  # fmt: skip
        if engine == "ray" and fmt != "parquet":
            raise InputError(
                "the Ray engine writes Parquet only; use --format parquet or --engine local"
            )
        if fmt == "npy" and source.id_field is not None and not _ids_are_row_numbers(source):
            raise InputError(
                f"{source.path}: .npy outputs cannot carry the id column "
                f"{source.id_field.name!r}; use --format parquet"
            )
        gap = source.position_gap() if fmt == "npy" else None
        if gap is not None:
            raise InputError(
                f"{source.path}: {gap}, so row p of a .npy output would not be input row p; "
                "use --format parquet, which keeps each row's input row number as its id"
            )
        if fmt == "parquet" and source.id_field is None and source.unknown_ids is not None:
            raise InputError(
                f"{source.path}: {source.unknown_ids}, so the ids of its rows are unknown; "
                "compress its input again (--overwrite), or decompress to .npy (no ids)"
            )
        if single and out_path.suffix.lower() not in _FORMAT_SUFFIXES:
            raise InputError(
                f"output {str(out_path)!r} has no .npy or .parquet suffix (decompress and "
                f"the readers go by it); name it {out_path.name}{_SUFFIX[fmt]}"
            )
        path = out_path if single else out_path / (source.path.stem + _SUFFIX[fmt])
        check_not_an_input(path, *(s.path for s in sources))
        if path.name in names:
            raise InputError(
                f"inputs {names[path.name]} and {source.path.name} would both write "
                f"{path.name}; rename one"
            )
        names[path.name] = source.path.name
        dtype: np.dtype[Any]
        if command == "compress":
            dtype, out_width, payload = np.dtype(np.uint8), codec.code_size, "code"
            vector_column = getattr(source, "column", None)
        else:
            dtype, out_width = np.dtype(np.float32), d_in
            vector_column = column or (source.meta or {}).get("column") or "embedding"
            payload = vector_column
        job = {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "command": command,
            "codec_id": cid,
            "spec": str(codec.spec),
            "d_in": d_in,
            "code_size": codec.code_size,
            "input": source.fingerprint(),
            "column": vector_column,
            "id_column": None if source.id_field is None else source.id_field.name,
            "id_offset": source.offset if source.id_field is None else None,
            "dataset": dataset if source.format == "hdf5" else None,
            "on_bad_row": on_bad_row,
        }
        id_name = "id" if source.id_field is None else source.id_field.name
        if fmt == "parquet" and payload == id_name:
            raise InputError(
                f"the output's id column and its {'codes' if command == 'compress' else 'vector'}"
                f" column would both be named {payload!r}; "
                + ("choose another --id-column" if command == "compress" else "pass --column")
            )
        spec = OutputSpec(path, fmt, dtype, out_width, payload, source.id_field, job)
        if path.exists() and not overwrite and not written_by_embcomp(spec):
            raise InputError(
                f"output {str(path)!r} exists and no embcomp batch job wrote it; pass "
                "--overwrite to replace it, or choose another output"
            )
        tasks.append(Task(source, spec))
    if engine == "ray":
        _check_one_schema(tasks, in_path)
    if single or engine == "ray":  # Ray writes beside OUTPUT, then renames
        created = check_writable(out_path.parent, create=False)
    else:
        created = check_writable(out_path)
    read_options = {"column": read_column, "id_column": id_column, "dataset": dataset}
    return Job(command, codec, cid, tasks, out_path, not single, on_bad_row, read_options, created)


def _ids_are_row_numbers(source: Source) -> bool:
    """Whether the id column of codes holds only what a ``.npy`` output's positions
    stand for: row numbers ``embcomp compress`` gave an input without ids."""
    meta = source.meta or {}
    return (
        source.kind == "codes"
        and source.id_field.name == "id"
        and "id_column" in meta
        and meta["id_column"] is None
    )


def _check_one_schema(tasks: list[Task], in_path: Path) -> None:
    """The Ray engine writes one Parquet dataset, so every input must give the same
    columns (a file without ids gets int64 ``id`` ones, its rows' global numbers)."""
    kinds: dict[tuple[str, str, str], str] = {}
    for task in tasks:
        field = task.output.id_field
        ids = ("id", "int64") if field is None else (field.name, str(field.type))
        kinds.setdefault((*ids, task.output.column), task.source.path.name)
    if len(kinds) > 1:
        found = "; ".join(
            f"{name}: id column {i!r} ({t}), column {c!r}" for (i, t, c), name in kinds.items()
        )
        raise InputError(
            f"{in_path}: the Ray engine writes one dataset, but these files would give it "
            f"parts with other columns ({found}); pass --column to name the vector column, "
            "or use --engine local (one output per file)"
        )


# -- the local engine ------------------------------------------------------------------
class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetch(blocks: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``blocks`` in a thread, ``depth`` items ahead; errors re-raise in the caller.

    File reads and Parquet decoding release the GIL, so the next block is read while
    the current one is encoded. At most ``depth + 2`` blocks are alive at once.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in blocks:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="embcomp-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def run_local(job: Job, *, block_rows: int | None, progress: bool, overwrite: bool) -> BatchReport:
    """Run a planned job in this process; returns the report."""
    start = time.monotonic()
    report = BatchReport(job.command, "local", files=len(job.tasks))
    todo = []
    for task in job.tasks:
        if not overwrite and is_complete(task.output):
            report.files_already_complete += 1
        else:
            todo.append(task)
    total = sum(task.source.n_rows for task in todo)
    # Temporary files that killed runs left (SIGKILL runs no clean-up): one scan per
    # output directory, not one per file written, for the names this job writes.
    ours: dict[Path, set[str]] = {}
    for task in todo:
        spec = task.output
        names = {spec.path.name, spec.sidecar.name, spec.skipped_list.name, PROBE_NAME}
        ours.setdefault(spec.path.parent, set()).update(names)
    for directory, names in sorted(ours.items()):
        remove_stale_temporaries_in(directory, names.__contains__)
    try:
        _run_tasks(job, todo, report, block_rows, Progress(total, job.command, enabled=progress))
    except BaseException:
        # Do not leave behind an empty output directory this run created.
        if job.created_output_dir and not any(job.output.iterdir()):
            job.output.rmdir()
        raise
    report.seconds = time.monotonic() - start
    return report


def _run_tasks(
    job: Job, todo: list[Task], report: BatchReport, block_rows: int | None, progress: Progress
) -> None:
    with progress as bar:
        for task in todo:
            source = task.source
            rows = block_rows or block_rows_for(job.codec.d_in or 1, source.block_bytes)
            numbered = task.output.numbers_rows
            with open_sink(task.output, max_rows=source.n_rows) as sink:
                blocks = source.iter_blocks(rows, on_bad_row=job.on_bad_row)
                for block in prefetch(blocks) if source.read_ahead else blocks:
                    out, kept_rows, ids, bad = transform_block(
                        job.codec, block, job.command, job.on_bad_row
                    )
                    sink.write(out, source.row_ids(kept_rows) if numbered else None, ids)
                    sink.bad.extend(block.bad)
                    sink.bad.extend(bad)
                    bar.update(block.stop - block.start)
            report.files_done += 1
            report.rows_read += source.n_rows
            report.vectors += sink.rows
            report.bad_rows += len(sink.bad)
            report.bytes_in += source.data_bytes
            report.bytes_out += task.output.path.stat().st_size
            report.outputs.append(str(task.output.path))


def _run(
    command: str,
    codec: Codec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None,
    id_column: str | None,
    dataset: str,
    output_format: str | None,
    on_bad_row: str,
    engine: str,
    address: str | None,
    block_rows: int | None,
    progress: bool,
    overwrite: bool,
    unit_rows: int | None,
) -> BatchReport:
    _check_choice("--engine", engine, ("local", "ray"))
    for name, value in (("--block-rows", block_rows), ("unit_rows", unit_rows)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1; got {value}")
    if engine == "ray":
        from ._ray import require_ray

        require_ray()  # say which extra to install before doing anything else
    job = plan_job(
        command, codec, input, output, column=column, id_column=id_column, dataset=dataset,
        output_format=output_format, on_bad_row=on_bad_row, engine=engine, overwrite=overwrite,
    )  # fmt: skip
    if engine == "ray":
        from ._ray import run_ray

        return run_ray(
            job,
            address=address,
            block_rows=block_rows,
            unit_rows=unit_rows,
            progress=progress,
            overwrite=overwrite,
        )
    return run_local(job, block_rows=block_rows, progress=progress, overwrite=overwrite)


def compress(
    codec: Codec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None = None,
    id_column: str | None = None,
    dataset: str = "train",
    output_format: str | None = None,
    on_bad_row: str = "fail",
    engine: str = "local",
    address: str | None = None,
    block_rows: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    unit_rows: int | None = None,
) -> BatchReport:
    """Encode every vector of a file or directory of shards with ``codec``.

    Parameters
    ----------
    codec : a fitted Codec.
    input : ``.npy``, ``.fvecs``, Parquet or HDF5 file, or a directory of them.
    output : a file for a file input (local engine), else a directory with one
        output per input file (the Ray engine writes a directory of part files).
    column, id_column : Parquet embedding column and optional id column to carry.
    dataset : HDF5 dataset (ann-benchmarks: ``train`` or ``test``).
    output_format : ``"npy"`` or ``"parquet"``; default: the output file's suffix,
        else Parquet for Parquet input and ``.npy`` for the rest.
    on_bad_row : ``"fail"`` (raise naming file and row) or ``"skip"`` (drop, count
        and list in ``<output>.skipped.tsv``).
    engine : ``"local"`` or ``"ray"`` (needs the ``ray`` extra); ``address`` of an
        existing Ray cluster, else a local Ray instance is started.
    block_rows : rows per streamed block (default: about 32 MiB of float32).
    progress : draw a progress bar on stderr.
    overwrite : redo outputs even when they are complete and valid.
    unit_rows : Ray engine: rows per parallel read task (default: 8 blocks).

    Returns
    -------
    BatchReport

    Outputs are written under temporary names and renamed when complete; outputs that
    are already complete and valid for this codec and input are skipped (resume).
    """
    return _run(
        "compress", codec, input, output, column=column, id_column=id_column, dataset=dataset,
        output_format=output_format, on_bad_row=on_bad_row, engine=engine, address=address,
        block_rows=block_rows, progress=progress, overwrite=overwrite, unit_rows=unit_rows,
    )  # fmt: skip


def decompress(
    codec: Codec,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None = None,
    id_column: str | None = None,
    output_format: str | None = None,
    on_bad_row: str = "fail",
    engine: str = "local",
    address: str | None = None,
    block_rows: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    unit_rows: int | None = None,
) -> BatchReport:
    """Decode codes written by :func:`compress` back to float32 vectors.

    ``input`` is a ``.npy`` of uint8 codes or Parquet with a ``code`` column (or a
    directory of them); ``column`` names the embedding column of Parquet outputs
    (default: the column the codes were compressed from, else ``embedding``). Ids are
    carried to Parquet outputs: the id column of Parquet codes; for ``.npy`` codes of
    ``compress``, the numbers of the input rows they encode (from their record, which
    lists the rows skipped as bad). Codes with ids other than row numbers are refused
    for ``.npy`` outputs, which cannot hold them, and so are codes whose input had rows
    skipped as bad (row ``p`` of the ``.npy`` would not be input row ``p``). A codes
    file whose record names another codec is refused with ``ArtifactError``. Other
    parameters as in :func:`compress`.
    """
    return _run(
        "decompress", codec, input, output, column=column, id_column=id_column,
        dataset="train", output_format=output_format, on_bad_row=on_bad_row, engine=engine,
        address=address, block_rows=block_rows, progress=progress, overwrite=overwrite,
        unit_rows=unit_rows,
    )  # fmt: skip
