"""``embcomp compress`` and ``embcomp decompress``: the offline batch compressor's CLI.

Registered through ``embcomp.cli._EXTENSIONS``. Nothing heavy is imported here:
pyarrow, h5py and Ray load only when a command needs them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def _add_common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-c", "--codec", required=True, help="codec file from 'embcomp fit'")
    cmd.add_argument(
        "--format",
        choices=("npy", "parquet"),
        default=None,
        help="output format (default: the output's suffix, else Parquet for Parquet "
        "input and .npy otherwise)",
    )
    cmd.add_argument(
        "--on-bad-row",
        choices=("fail", "skip"),
        default="fail",
        help="fail on the first null/NaN/inf/wrong-length row (naming file and row), or "
        "skip such rows, count them and list them in <output>.skipped.tsv",
    )
    cmd.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: stream in this process; ray: run on Ray Data (pip install "
        "'embcomp[ray]'), writing a directory of Parquet parts",
    )
    cmd.add_argument("--address", default=None, help="Ray cluster address (default: start one)")
    cmd.add_argument(
        "--block-rows",
        type=int,
        default=None,
        help="rows per block (default: ~128 MiB of .npy, ~32 MiB of other input)",
    )
    cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="redo outputs that are already complete, and replace files at output paths "
        "that no embcomp batch job wrote",
    )
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    """Add the ``compress`` and ``decompress`` subcommands."""
    comp = subparsers.add_parser(
        "compress",
        help="encode a large file or directory of shards, streaming, with resume",
        description="Encode every vector of INPUT (.npy, .fvecs, Parquet, ann-benchmarks "
        "HDF5, or a directory of them: one output per file) into codes. Outputs are "
        "written under a temporary name and renamed when complete; a rerun skips outputs "
        "that are already complete and valid.",
    )
    _add_common(comp)
    comp.add_argument("input", help="vectors: a file or a directory of shards")
    comp.add_argument("output", help="codes: a file for a file input, else a directory")
    comp.add_argument("--column", default=None, help="Parquet embedding column")
    comp.add_argument("--id-column", default=None, help="Parquet id column to carry through")
    comp.add_argument("--dataset", default="train", help="HDF5 dataset (default: train)")
    comp.set_defaults(func=_cmd_compress)

    dec = subparsers.add_parser(
        "decompress",
        help="decode codes written by 'embcomp compress' back to float32 vectors",
        description="Decode codes (.npy uint8, or Parquet with a 'code' column, or a "
        "directory of them) to float32 vectors: .npy, or Parquet with ids carried.",
    )
    _add_common(dec)
    dec.add_argument("input", help="codes: a file or a directory")
    dec.add_argument("output", help="vectors: a file for a file input, else a directory")
    dec.add_argument(
        "--column", default=None, help="embedding column of Parquet output (default: as compressed)"
    )
    dec.add_argument("--id-column", default=None, help="id column of Parquet codes (default: id)")
    dec.set_defaults(func=_cmd_decompress)


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "column": args.column,
        "id_column": args.id_column,
        "output_format": args.format,
        "on_bad_row": args.on_bad_row,
        "engine": args.engine,
        "address": args.address,
        "block_rows": args.block_rows,
        # a bar only on a terminal: redrawn lines would litter a log or a pipe
        "progress": not args.quiet and sys.stderr.isatty(),
        "overwrite": args.overwrite,
    }


def _cmd_compress(args: argparse.Namespace) -> int:
    from .artifacts import load_codec
    from .batch import compress

    report = compress(
        load_codec(args.codec), args.input, args.output, dataset=args.dataset,
        **_common_kwargs(args),
    )  # fmt: skip
    print(report)
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from .artifacts import load_codec
    from .batch import decompress

    report = decompress(load_codec(args.codec), args.input, args.output, **_common_kwargs(args))
    print(report)
    return 0
