"""Benchmark commands, for both ``embcomp`` and ``python -m bench``.

``register(subparsers)`` adds ``sweep``, ``recommend`` and ``claims`` to the ``embcomp``
CLI; ``python -m bench`` also has ``run``, ``summary`` and ``plot``. Nothing heavy is
imported here: FAISS, matplotlib and the harness load when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from embcomp.evaluation import METRICS


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin (before FAISS loads).

    On a machine shared with other busy processes, spinning FAISS threads wait for
    descheduled peers at every barrier; PQ training was measured 3.5x slower that way.
    """
    if "faiss" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _needs(*modules: str) -> None:
    """Import the optional packages a command needs before it does any work, so that
    on an install without them it fails at once, naming the extra (``embcomp.cli``),
    rather than after minutes of runs or with a cache half written."""
    prefer_passive_openmp()  # before FAISS loads
    for module in modules:
        importlib.import_module(module)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


# -- handlers --------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    _needs("faiss", "yaml", "matplotlib")
    from .run import load_sweep, run_sweep

    config = load_sweep(args.sweep)
    if args.data:
        config.datasets = list(args.data)
    out = args.out or os.path.join("bench-results", config.name)
    run_sweep(config, out, force=args.force, progress=not args.no_progress, log=_log)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    _needs("faiss", "yaml", "matplotlib")
    from .datasets import load_dataset
    from .run import DEFAULT_SWEEP, load_sweep, run_sweep

    config = load_sweep(args.config or DEFAULT_SWEEP)
    dataset = load_dataset(args.data, queries=args.queries, seed=config.settings.seed)
    config.datasets = [dataset.name]
    run_sweep(
        config,
        args.out,
        datasets=[dataset],
        force=args.force,
        progress=not args.no_progress,
        log=_log,
    )
    return 0


def _mk(path: str) -> Any:
    from pathlib import Path

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _note_left_out(results: str) -> None:
    """Tell on stderr which records a summary or plot of ``results`` leaves out."""
    from pathlib import Path

    from .results import comparable_runs, load_records

    if (Path(results) / "records").is_dir():
        for dataset, note in comparable_runs(load_records(results))[1]:
            print(f"note: {dataset}: {note}", file=sys.stderr)


def cmd_summary(args: argparse.Namespace) -> int:
    from .results import write_summary

    _note_left_out(args.results)
    for path in write_summary(args.results):
        print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_results

    _note_left_out(args.results)
    for path in plot_results(args.results):
        print(f"wrote {path}")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    _needs("faiss")
    from .claims import write_claims
    from .datasets import load_dataset
    from .run import Settings

    dataset = load_dataset(args.data, queries=args.queries, qrels=args.qrels)
    settings = Settings.model_validate(
        {"train_size": args.train_size, "train_rows": args.train_rows}
    )
    paths = write_claims(
        dataset, _mk(args.out), settings, force=args.force, progress=not args.no_progress, log=_log
    )
    for path in paths:
        _log(f"wrote {path}")
    print(paths[0].read_text(encoding="utf-8"))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    _needs("faiss")
    from embcomp import save_codec

    from .recommend import format_text, load_for_recommend, recommend

    dataset = load_for_recommend(args.data, args.queries, args.qrels, args.seed)
    rec = recommend(
        dataset,
        budget_bytes=args.budget_bytes,
        min_recall=args.min_recall,
        train_size=args.train_size,
        quick=args.quick,
        seed=args.seed,
        progress=not args.json and not args.no_progress,
        log=(lambda _m: None) if args.json else _log,
        metric=args.metric,
    )
    result = rec.as_dict()
    if args.output:
        save_codec(rec.best.method.codec, args.output)
        result["codec_path"] = args.output
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_text(rec))
        if args.output:
            print(f"wrote {rec.best.spec} codec -> {args.output}")
    return 0


# -- parsers ---------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rerun runs that have records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="run the default benchmark sweep on a dataset; write records, CSV, plots",
        description="Run bench/sweeps/default.yaml (embcomp specs x FAISS codecs x the "
        "paper's procedures) on one dataset and write records, summary.csv, summary.md, "
        "plots and the claims report under --out.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="shared-layout folder (base.npy, queries.npy[, gt_ip_100.npy, qrels.tsv]), "
        "registry name, .npy/.fvecs matrix or ann-benchmarks .hdf5",
    )
    p.add_argument("--queries", help="query vectors for a single-matrix --data")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--config", help="sweep YAML to use instead of the default")
    _add_common(p)
    p.set_defaults(func=cmd_sweep)


def add_recommend(sub: Any) -> None:
    p = sub.add_parser(
        "recommend",
        help="measure every codec on your vectors and print the best for a budget",
        description="Fit and measure every codec embcomp can make on your own sample "
        "and print the best one within --budget-bytes (or the smallest reaching "
        "--min-recall), its measured numbers and the runner-up.",
    )
    p.add_argument("--data", required=True, help="your vectors (.npy, .fvecs, folder, .hdf5)")
    p.add_argument(
        "--queries", help="query vectors (default: hold out min(1000, n/10) rows of --data)"
    )
    p.add_argument("--qrels", help="optional query<TAB>doc relevance labels (adds nDCG@10)")
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="the search the codec is for (default: the data's own; ip for a matrix). "
        "cos measures over unit-norm rows and keeps to codecs that start with l2norm",
    )
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget-bytes", type=int, help="max bytes per stored vector")
    goal.add_argument("--min-recall", type=float, help="min recall@10 vs exact float32")
    p.add_argument("-o", "--output", help="write the chosen, fitted codec here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--train-size", type=int, default=50000, help="fit on N random rows")
    p.add_argument("--quick", action="store_true", help="reducer widths at 25/50/75%% only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_recommend)


def add_claims(sub: Any) -> None:
    p = sub.add_parser(
        "claims",
        help="check the RAG-storage paper's float8/int8/PCA claims on a dataset",
        description="Run (or reuse) the runs the paper's claims need and write "
        "claims-<dataset>.md/.json under --out.",
    )
    p.add_argument("--data", required=True, help="dataset name, folder or file")
    p.add_argument("--queries", help="query vectors for a single-matrix --data")
    p.add_argument("--qrels", help="relevance labels (nDCG@10); shared folders carry them")
    p.add_argument("--out", required=True, help="results folder (records are reused)")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--train-rows", choices=("first", "random"), default="first")
    _add_common(p)
    p.set_defaults(func=cmd_claims)


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run a sweep YAML (records, summary, plots)")
    p.add_argument("sweep", help="sweep file, e.g. bench/sweeps/default.yaml")
    p.add_argument("--out", help="results folder (default bench-results/<sweep name>)")
    p.add_argument("--data", action="append", help="replace the sweep's datasets (repeatable)")
    _add_common(p)
    p.set_defaults(func=cmd_run)


def add_summary(sub: Any) -> None:
    p = sub.add_parser("summary", help="write summary.csv and summary.md from records")
    p.add_argument("results", help="results folder of a sweep")
    p.set_defaults(func=cmd_summary)


def add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw the plots (PNG + SVG) from records")
    p.add_argument("results", help="results folder of a sweep")
    p.set_defaults(func=cmd_plot)


def register(sub: Any) -> None:
    """Add ``sweep``, ``recommend`` and ``claims`` to the ``embcomp`` CLI, and
    ``bench-speed`` when ``bench/speed.py`` (issue 7) provides it."""
    add_sweep(sub)
    add_recommend(sub)
    add_claims(sub)
    try:
        speed = importlib.import_module(f"{__package__}.speed")
    except ImportError as exc:
        if exc.name != f"{__package__}.speed":
            raise
        return
    if hasattr(speed, "register"):
        speed.register(sub)  # embcomp bench-speed (issue 7)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bench`` parser (``speed`` is dispatched before it)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="embcomp benchmark harness"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_run, add_summary, add_plot, add_sweep, add_recommend, add_claims):
        add(sub)
    sub.add_parser("speed", help="encode/decode throughput vs FAISS (bench/speed.py)")
    return parser
