"""The ``embcomp`` command line: ``main(argv) -> exit code``.

Core commands live here. Other parts of the package add theirs through a
``register(subparsers)`` function listed in ``_EXTENSIONS``; those modules import
their heavy dependencies only when their command runs, so ``embcomp --help`` works
with the core install alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__
from ._validation import check_finite, check_matrix, check_not_an_input, to_float32
from .artifacts import codec_id, load_codec, read_manifest, save_codec
from .codec import make_codec
from .evaluation import METRICS, exact_knn, recall_at_k
from .exceptions import EmbcompError, InputError
from .io import read_vectors, write_vectors
from .spec import STAGES

# Modules that add subcommands; each defines register(subparsers). Alternatives are
# tried in order: the benchmark harness is `embcomp_bench` in a wheel and `bench` in the
# repository (which editable installs put on the path).
_EXTENSIONS = (("embcomp.service.cli",), ("embcomp.batch_cli",), ("embcomp_bench.cli", "bench.cli"))


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"option {text!r} must look like key=value, e.g. percentile=99.9")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def sample_rows(X: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded uniform sample of ``n`` rows of an in-memory or mapped array (sorted).

    ``embcomp fit`` samples files with :func:`embcomp.batch.sample_vectors`, which
    picks the same rows for a single ``.npy`` but reads any input format, streamed.
    """
    if n is None or n >= X.shape[0]:
        return np.asarray(X)
    if n < 1:
        raise InputError(f"--sample must be >= 1; got {n}")
    rows = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=n, replace=False))
    return np.asarray(X[rows])


def _cmd_fit(args: argparse.Namespace) -> int:
    check_not_an_input(args.output, args.train)
    options = dict(parse_option(o) for o in args.option)
    options.setdefault("seed", args.seed)
    codec = make_codec(args.spec, **options)
    from .batch import sample_vectors  # streams Parquet/HDF5/.npy; pyarrow only if needed

    train, total = sample_vectors(
        args.train, args.sample, seed=args.seed, column=args.column, dataset=args.dataset
    )
    codec.fit(train)
    save_codec(codec, args.output)
    sampled = f" (sampled from {total})" if train.shape[0] < total else ""
    print(
        f"fitted {codec.spec} on {train.shape[0]} x {codec.d_in}{sampled}: "
        f"{codec.code_size} bytes/vector ({codec.compression_ratio:.1f}x) -> {args.output}"
    )
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    check_not_an_input(args.output, args.input, args.codec)
    codec = load_codec(args.codec)
    codes = codec.encode(read_vectors(args.input))
    write_vectors(args.output, codes)
    print(f"encoded {codes.shape[0]} vectors -> {codes.nbytes} bytes in {args.output}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    check_not_an_input(args.output, args.input, args.codec)
    codec = load_codec(args.codec)
    try:
        codes = np.load(args.input, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{args.input!r} is not a readable .npy file of codes: {exc}") from exc
    vectors = codec.decode(codes)
    write_vectors(args.output, vectors)
    print(f"decoded {vectors.shape[0]} vectors -> {args.output}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.codec)
    codec = load_codec(args.codec)  # verifies every array checksum too
    summary = {k: manifest[k] for k in ("spec", "d_in", "d_out", "code_size")}
    summary["options"] = codec.options  # as loaded: with any option older artifacts lack
    summary["id"] = codec_id(codec)  # the service's and the batch records' name for it
    summary["compression_ratio"] = round(4 * manifest["d_in"] / manifest["code_size"], 3)
    summary["format_version"] = manifest["format_version"]
    summary["versions"] = manifest["versions"]
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    codec = load_codec(args.codec)
    if args.k < 1:
        raise InputError(f"--k must be >= 1; got {args.k}")
    d = codec.d_in
    base = to_float32(check_matrix(read_vectors(args.base), name="base", d=d), name="base")
    queries = check_matrix(read_vectors(args.queries), name="queries", d=d)
    queries = to_float32(queries, name="queries")
    check_finite(base, name="base")
    check_finite(queries, name="queries")
    if args.k > base.shape[0]:
        raise InputError(
            f"--k {args.k} is more than the {base.shape[0]} base vectors; "
            f"choose a k of at most {base.shape[0]}"
        )
    # A codec that normalizes is for cosine search: judge it by cosine unless told.
    metric = args.metric or ("cos" if codec.spec.normalize else "ip")
    decoded = codec.decode(codec.encode(base))
    true_ids, _ = exact_knn(base, queries, args.k, metric=metric)
    found_ids, _ = exact_knn(decoded, queries, args.k, metric=metric)
    recall = recall_at_k(found_ids, true_ids, args.k, base=base, queries=queries, metric=metric)
    if args.json:
        result = {
            "spec": str(codec.spec),
            "metric": metric,
            "k": args.k,
            "recall_at_k": recall,
            "bytes_per_vector": codec.code_size,
            "compression_ratio": codec.compression_ratio,
            "base_rows": base.shape[0],
            "query_rows": queries.shape[0],
        }
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"spec               {codec.spec}")
    print(f"metric             {metric}")
    print(f"bytes/vector       {codec.code_size}")
    print(f"compression ratio  {codec.compression_ratio:.2f}x")
    print(f"recall@{args.k:<11d} {recall:.4f}")
    return 0


DEMO_SPECS = (
    "fp16",
    "int8",
    "fp8",
    "int4",
    "fp4",
    "pca192,int8",
    "pca192,fp8",
    "bin",
    "pca,alloc192",
    "pca,alloc96",
    "pca,alloc48",
)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .sample import load_sample

    base, queries = load_sample()
    true_ids, _ = exact_knn(base, queries, 10)
    print(
        f"bundled sample: {base.shape[0]} x {base.shape[1]} all-MiniLM-L6-v2 embeddings, "
        f"{queries.shape[0]} queries; fit on the first half, recall@10 on all"
    )
    print(f"{'spec':<14}{'bytes/vec':>10}{'ratio':>8}{'recall@10':>11}")
    for spec in args.spec or DEMO_SPECS:
        codec = make_codec(spec).fit(base[: base.shape[0] // 2])
        found, _ = exact_knn(codec.decode(codec.encode(base)), queries, 10)
        recall = recall_at_k(found, true_ids, 10, base=base, queries=queries)
        print(
            f"{str(codec.spec):<14}{codec.code_size:>10d}{codec.compression_ratio:>7.1f}x"
            f"{recall:>11.3f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    stage_help = "; ".join(f"{name}: {info.help}" for name, info in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="embcomp", description="Fit, save and apply embedding codecs."
    )
    parser.add_argument("--version", action="version", version=f"embcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="fit a codec on training vectors and save it")
    fit.add_argument("--spec", required=True, help=f"codec spec, e.g. pca256,fp8. {stage_help}")
    fit.add_argument(
        "--train",
        required=True,
        help="training vectors: .npy, .fvecs, Parquet, HDF5 or a directory of them",
    )
    fit.add_argument("-o", "--output", required=True, help="codec file to write")
    fit.add_argument(
        "--sample",
        type=int,
        default=None,
        help="fit on N rows drawn uniformly (seeded), reading only those rows",
    )
    fit.add_argument("--column", default=None, help="Parquet embedding column")
    fit.add_argument("--dataset", default="train", help="HDF5 dataset (default: train)")
    fit.add_argument("--seed", type=int, default=0, help="seed for sampling and fitting")
    fit.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training option, e.g. percentile=99.9 or scale=global (repeatable)",
    )
    fit.set_defaults(func=_cmd_fit)

    for name, func, what in (
        ("encode", _cmd_encode, "vectors -> codes (.npy uint8)"),
        ("decode", _cmd_decode, "codes (.npy) -> vectors"),
    ):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("-c", "--codec", required=True, help="codec file from 'embcomp fit'")
        cmd.add_argument("input")
        cmd.add_argument("output")
        cmd.set_defaults(func=func)

    inspect_cmd = sub.add_parser("inspect", help="print a codec file's manifest")
    inspect_cmd.add_argument("codec")
    inspect_cmd.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="recall@k of decoded vectors vs exact float32 search")
    ev.add_argument("-c", "--codec", required=True)
    ev.add_argument("--base", required=True)
    ev.add_argument("--queries", required=True)
    ev.add_argument("--k", type=int, default=10)
    ev.add_argument(
        "--metric",
        choices=METRICS,
        help="similarity of the exact and the decoded search (default: cos for a codec "
        "that starts with l2norm, else ip)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser("demo", help="fit and evaluate codecs on the bundled sample")
    demo.add_argument("--spec", action="append", help="spec to try (repeatable)")
    demo.set_defaults(func=_cmd_demo)

    for alternatives in _EXTENSIONS:
        for module_name in alternatives:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                if exc.name and module_name.startswith(exc.name):
                    continue  # that part of the package is not present in this install
                raise
            module.register(sub)
            break
    return parser


# Commands that handle SIGTERM themselves (the server drains in-flight calls).
_OWN_SIGTERM = ("serve",)


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks remove temp files."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


# The optional packages a command may import, and the extra that installs each.
_EXTRA_OF = {
    "grpc": "service",
    "grpc_health": "service",
    "grpc_reflection": "service",
    "google": "service",  # protobuf
    "pydantic_settings": "service",
    "prometheus_client": "service",
    "faiss": "bench",
    "matplotlib": "bench",
    "yaml": "bench",
    "tqdm": "batch",
    "h5py": "batch",
    "pyarrow": "parquet",
    "ray": "ray",
    "numba": "fast",
}


# Commands of the benchmark harness: the 'bench' extra brings all they import.
_BENCH_COMMANDS = {"recommend", "claims", "sweep", "bench-speed"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 on a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if args.command not in _OWN_SIGTERM and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # unwinds: temp files go
    try:
        return int(args.func(args))
    except EmbcompError as exc:
        print(f"embcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`embcomp inspect x.codec | head`)
        # Python would report the broken pipe again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # as if killed by SIGPIPE, as a shell pipeline expects
    except OSError as exc:  # permissions, a directory where a file was expected, disk full
        where = f": {exc.filename!r}" if exc.filename else ""
        print(f"embcomp {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is not None and args.command in _BENCH_COMMANDS:
            extra = "bench"  # which brings everything these need
        if extra is None:
            raise
        print(
            f"embcomp {args.command}: error: this command needs {exc.name}, which is not "
            f"installed: pip install 'embcomp[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"embcomp {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"embcomp {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
