"""Run a sweep: expand a declarative YAML into runs, measure each, write one record per run.

    python -m bench run bench/sweeps/default.yaml --out /tmp/bench
    embcomp sweep --data ../shared/data/wordnet-minilm --out /tmp/bench

A run = (dataset, method, options, settings). Its record is a self-describing JSON file
at a path that is a pure function of those parameters (:func:`record_path`), so a
rerun skips every run already on disk; a run that failed leaves an error record and is
retried next time. After the runs, the codecs on each family's Pareto frontier (recall@10
vs bytes) are also served from a FAISS ANN index over their decoded vectors, so the loss
from quantization and the loss from the index show separately (``kind: "ann"`` records).
Then the summary (CSV, Markdown), the plots, and optionally the claims report are made
from the records alone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import embcomp
from embcomp._atomic import atomic_output
from embcomp.evaluation import ndcg_at_k, recall_at_k, relevance_recall_at_k
from embcomp.exceptions import EmbcompError, InputError

from .datasets import Dataset, ground_truth, load_dataset, qrels_for, train_rows
from .methods import FAMILIES, Method, expand_templates, make_method

__all__ = [
    "AnnConfig",
    "Settings",
    "SweepConfig",
    "evaluate",
    "load_sweep",
    "record_path",
    "run_sweep",
]

SCHEMA_VERSION = 1
SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
DEFAULT_SWEEP = SWEEPS_DIR / "default.yaml"
_RECALL_KS = (1, 10, 100)
_QUERY_CHUNK = 128


# -- configuration ---------------------------------------------------------------------
def _default_ann_params() -> dict[str, int | float]:
    return {"nprobe": 32}


def _default_ratios() -> list[float]:
    return [4.0, 8.0, 16.0, 32.0]


class AnnConfig(BaseModel):
    """Serve the frontier codecs' decoded vectors from a FAISS ANN index."""

    model_config = ConfigDict(extra="forbid")
    factory: str = Field("IVF256,Flat", description="index_factory string of the ANN index")
    params: dict[str, int | float] = Field(
        default_factory=_default_ann_params, description="ParameterSpace settings"
    )
    select: str = Field("frontier", description="'frontier' (each family's) or 'all'")

    @field_validator("select")
    @classmethod
    def _select(cls, value: str) -> str:
        if value not in ("frontier", "all"):
            raise ValueError("must be 'frontier' or 'all'")
        return value


class Settings(BaseModel):
    """Everything besides the dataset and method that changes a run's numbers."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(
        100, ge=10, description="depth of the exact ground truth (recall@1/10/100; >= 10)"
    )
    train_size: int | None = Field(20000, ge=1, description="base rows codecs are fitted on")
    train_rows: str = Field("first", description="'first' rows of the base or 'random'")
    rescore: int = Field(4, ge=0, description="re-rank the top rescore*10 with float32; 0=off")
    timing_repeats: int = Field(3, ge=1, description="encode/decode timings: median of N")
    seed: int = 0

    @field_validator("train_rows")
    @classmethod
    def _rows(cls, value: str) -> str:
        if value not in ("first", "random"):
            raise ValueError("must be 'first' or 'random'")
        return value


class MethodTemplates(BaseModel):
    """Method templates per family (see ``bench.methods.expand_templates``)."""

    model_config = ConfigDict(extra="forbid")
    embcomp: list[str] = Field(default_factory=list)
    faiss: list[str] = Field(default_factory=list)
    paper: list[str] = Field(default_factory=list)


class SweepConfig(BaseModel):
    """A declarative sweep, as read from YAML."""

    model_config = ConfigDict(extra="forbid")
    name: str = "sweep"
    datasets: list[str] = Field(min_length=1)
    settings: Settings = Field(default_factory=lambda: Settings.model_validate({}))
    ratios: list[float] = Field(
        default_factory=_default_ratios,
        description="compression ratios for {qb} budgets and the frontier table (>= 1)",
    )
    methods: MethodTemplates
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="training options per family"
    )
    ann: AnnConfig | None = None
    claims: bool = False

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if any(not ratio >= 1 for ratio in value):
            raise ValueError("compression ratios must be >= 1 (float32 is 1)")
        return value

    @field_validator("options")
    @classmethod
    def _families(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(value) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; use {list(FAMILIES)}")
        return value


def load_sweep(path: str | os.PathLike[str]) -> SweepConfig:
    """Read and validate a sweep YAML file (errors name the file and the bad field)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{str(path)!r} is not valid YAML: {exc}") from exc
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InputError(f"{str(path)!r}: {problems}") from exc


# -- records ---------------------------------------------------------------------------
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def record_path(out: str | os.PathLike[str], params: Mapping[str, Any]) -> Path:
    """Where the record of a run with these parameters lives: a pure function of them.

    ``<out>/records/<dataset>/<kind>/<method-slug>--<sha256(params)[:12]>.json``
    """
    digest = hashlib.sha256(_canonical(params).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in ".-_" else "-" for c in params["method"])
    return Path(out) / "records" / params["dataset"] / params["kind"] / f"{slug}--{digest}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` if it exists and parses, else ``None``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        handle.write((json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def _environment() -> dict[str, Any]:
    versions = {"embcomp": embcomp.__version__, "numpy": np.__version__}
    try:
        import faiss

        versions["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover - faiss ships with the bench extra
        pass
    return {
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_params(
    dataset: Dataset, method: Method, settings: Settings, kind: str = "run", **extra: Any
) -> dict[str, Any]:
    """The parameters that identify a run (and so its record path)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "method": method.name,
        "method_options": method.options,
        "settings": settings.model_dump(),
        **extra,
    }


# -- measuring one run -----------------------------------------------------------------
@dataclass
class Truth:
    """What every run of a dataset is scored against, computed once per dataset."""

    ids: np.ndarray  # (m, k) exact neighbour ids
    ndcg_float32: float | None
    qrels_recall_float32: float | None
    ndcg_per_query_float32: np.ndarray | None


def make_truth(dataset: Dataset, k: int, cache_dir: Path | None) -> Truth:
    """Exact neighbours for recall, and the float32 reference for nDCG.

    The nDCG reference is float32 search of the original vectors through the same
    FAISS flat search every method's decoded vectors go through, so the retention of
    ``faiss:Flat`` is exactly 1 and only the codec differs. (The exact neighbours may
    order near-ties differently, e.g. when computed in float64.)
    """
    ids = ground_truth(dataset, k, cache_dir)
    qrels = qrels_for(dataset)
    if not qrels:
        return Truth(ids, None, None, None)
    from .methods import flat_search

    float32_ids = flat_search(np.asarray(dataset.base), dataset.queries, 10, dataset.metric)
    return Truth(
        ids,
        ndcg_at_k(float32_ids, qrels, 10),
        relevance_recall_at_k(float32_ids, qrels, 10),
        per_query_ndcg(float32_ids, qrels, 10),
    )


def per_query_ndcg(ids: np.ndarray, qrels: Mapping[int, Any], k: int) -> np.ndarray:
    """nDCG@k of every query with labels, in sorted query order: float64 (q,)."""
    return np.array([ndcg_at_k(ids[q : q + 1], {0: qrels[q]}, k) for q in sorted(qrels)])


def tie_aware_recall(
    found: np.ndarray, true: np.ndarray, k: int, dataset: Dataset, per_query: bool = False
) -> Any:
    """recall@k with ties counted as hits (``embcomp.evaluation.recall_at_k`` with the
    vectors), in query chunks so the gathered (chunk, k, d) block stays small.

    Returns the mean (float), or with ``per_query`` a float64 (m,) array.
    """
    k = min(k, true.shape[1], found.shape[1])
    values = []
    for start in range(0, found.shape[0], _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, found.shape[0])
        rows = range(start, stop) if per_query else [slice(start, stop)]
        for row in rows:
            sel = slice(row, row + 1) if isinstance(row, int) else row
            value = recall_at_k(
                found[sel],
                true[sel],
                k,
                base=dataset.base,
                queries=dataset.queries[sel],
                metric=dataset.metric,
            )
            values.append((value, 1 if isinstance(row, int) else stop - start))
    if per_query:
        return np.array([v for v, _ in values])
    return float(sum(v * n for v, n in values) / found.shape[0])


def _buffer(shape: tuple[int, int], dtype: Any, wanted: bool) -> np.ndarray | None:
    """An output buffer with every page written once (no page faults left for a timed
    call), or None where the method cannot write into one."""
    if not wanted:
        return None
    buffer = np.empty(shape, dtype=dtype)
    buffer.fill(0)
    return buffer


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Result of the last call and the median wall time of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def _rescore(ids: np.ndarray, dataset: Dataset, depth: int, k: int) -> np.ndarray:
    """Re-rank the first ``depth`` candidates of each row by exact float32 score; (m, k)
    int64, ties broken by lower id, padded with -1 when a row has fewer candidates."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for q in range(ids.shape[0]):
        cands = np.unique(ids[q, :depth])
        cands = cands[cands >= 0]
        vectors = np.asarray(dataset.base[cands], dtype=np.float32)
        query = np.asarray(dataset.queries[q], dtype=np.float32)
        if dataset.metric == "ip":
            scores = vectors @ query
        else:
            scores = -((vectors - query) ** 2).sum(axis=1)
        best = cands[np.lexsort((cands, -scores))][:k]
        out[q, : best.size] = best
    return out


def evaluate(
    method: Method, dataset: Dataset, train: np.ndarray, truth: Truth, settings: Settings
) -> dict[str, Any]:
    """Fit, encode, decode and search one method; return the measured results.

    Returns
    -------
    dict with ``bytes_per_vector`` (``code_size``), ``compression_ratio``,
    ``recall_at_{1,10,100}`` (ties count), nDCG@10 and its retention when the dataset
    has qrels, ``fit_s``, ``encode_vectors_per_s``, ``decode_vectors_per_s`` (into
    reused buffers where the method can, as ``encode_into``/``decode_into`` say),
    ``search_s`` and, with rescoring on, the rescored numbers and their extra bytes.
    """
    start = time.perf_counter()
    method.fit(train, dataset.metric)
    fit_s = time.perf_counter() - start
    if method.fit_s is not None:
        fit_s = method.fit_s
    base = dataset.base
    # First calls compile kernels and allocate: warm up on a few rows, untimed, so that
    # one timed repeat measures the steady state rather than the start-up.
    warm = method.encode(base[: min(256, dataset.n_base)])
    if method.decodes:
        method.decode(warm)
    # Encode and decode write into buffers written once beforehand (where the method
    # can): a fresh output's page faults cost what the kernel's free 2 MiB pages
    # decide (11 ms or 40-53 ms for the same 77 MB on one VM), which would swamp the
    # codecs' own differences.
    into = "reused buffer" if method.writes_into else "fresh array"
    code_size = method.code_size
    code_buffer = _buffer((dataset.n_base, code_size), np.uint8, method.writes_into)
    codes, encode_s = _timed(lambda: method.encode(base, out=code_buffer), settings.timing_repeats)
    if codes.shape != (dataset.n_base, code_size) or codes.dtype != np.uint8:
        raise EmbcompError(
            f"{method.name}: encode returned {codes.dtype} {codes.shape}, expected uint8 "
            f"({dataset.n_base}, {code_size})"
        )
    decoded, decode_s = None, None
    if method.decodes:
        buffer = _buffer((dataset.n_base, dataset.d), np.float32, method.writes_into)
        decoded, decode_s = _timed(
            lambda: method.decode(codes, out=buffer), settings.timing_repeats
        )
    depth = max(settings.k, settings.rescore * 10)
    depth = min(depth, dataset.n_base)
    start = time.perf_counter()
    found = method.search(codes, dataset.queries, depth, decoded=decoded)
    search_s = time.perf_counter() - start
    del decoded
    results: dict[str, Any] = {
        "bytes_per_vector": code_size,
        "compression_ratio": 4 * dataset.d / code_size,
        "fit_s": fit_s,
        "encode_s": encode_s,
        "encode_vectors_per_s": dataset.n_base / encode_s if encode_s > 0 else None,
        "decode_s": decode_s,
        "decode_vectors_per_s": (dataset.n_base / decode_s) if decode_s else None,
        "encode_into": into,
        "decode_into": into if decode_s else None,
        "search_s": search_s,
        "search_queries": dataset.n_queries,
        "search_depth": depth,
    }
    per_query: dict[str, list[float]] = {}
    for k in _RECALL_KS:
        if k <= truth.ids.shape[1]:
            results[f"recall_at_{k}"] = tie_aware_recall(found, truth.ids, k, dataset)
    recall10 = tie_aware_recall(found, truth.ids, 10, dataset, per_query=True)
    per_query["recall_at_10"] = [round(float(v), 4) for v in recall10]
    results.update(_relevance(found, dataset, truth, per_query, prefix=""))
    if settings.rescore:
        rescored = _rescore(found, dataset, settings.rescore * 10, 10)
        results["rescore"] = {
            "candidates": settings.rescore * 10,
            "recall_at_1": tie_aware_recall(rescored, truth.ids, 1, dataset),
            "recall_at_10": tie_aware_recall(rescored, truth.ids, 10, dataset),
            "extra_bytes_per_vector": 4 * dataset.d,
            "extra_bytes_note": "float32 originals, read only for the candidates",
            **_relevance(rescored, dataset, truth, {}, prefix=""),
        }
    return {"results": results, "per_query": per_query}


def _relevance(
    found: np.ndarray,
    dataset: Dataset,
    truth: Truth,
    per_query: dict[str, list[float]],
    prefix: str,
) -> dict[str, Any]:
    qrels = qrels_for(dataset)
    if not qrels or truth.ndcg_float32 is None:
        return {}
    ndcg = ndcg_at_k(found, qrels, 10)
    out = {
        f"{prefix}ndcg_at_10": ndcg,
        f"{prefix}ndcg_at_10_float32": truth.ndcg_float32,
        f"{prefix}ndcg_retention": ndcg / truth.ndcg_float32 if truth.ndcg_float32 else None,
        f"{prefix}qrels_recall_at_10": relevance_recall_at_k(found, qrels, 10),
        f"{prefix}qrels_recall_at_10_float32": truth.qrels_recall_float32,
    }
    if per_query is not None:
        per_query["ndcg_at_10"] = [round(float(v), 4) for v in per_query_ndcg(found, qrels, 10)]
    return out


# -- the sweep -------------------------------------------------------------------------
@dataclass
class PlannedRun:
    dataset: Dataset
    method: Method
    params: dict[str, Any]
    path: Path


def _progress(items: list[Any], desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run", file=sys.stderr, disable=None, dynamic_ncols=True)


def plan_runs(
    config: SweepConfig, dataset: Dataset, out: Path
) -> tuple[list[PlannedRun], list[str]]:
    """Expand the sweep's templates for one dataset into runs (and skipped expansions)."""
    planned: list[PlannedRun] = []
    skipped: list[str] = []
    for family in FAMILIES:
        templates = getattr(config.methods, family)
        refs, bad = expand_templates(family, templates, dataset.d, config.ratios)
        skipped += bad
        for ref in refs:
            method = make_method(f"{family}:{ref}", config.options.get(family))
            params = run_params(dataset, method, config.settings)
            planned.append(PlannedRun(dataset, method, params, record_path(out, params)))
    return planned, skipped


def run_one(run: PlannedRun, train: np.ndarray, truth: Truth, settings: Settings) -> dict[str, Any]:
    """Measure one planned run and write its record (an error record if it failed)."""
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": "run",
        "params": run.params,
        "dataset": run.dataset.describe(),
    }
    try:
        measured = evaluate(run.method, run.dataset, train, truth, settings)
        record.update(status="ok", **measured)
    except (EmbcompError, RuntimeError, ValueError, MemoryError) as exc:
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    record["method"] = run.method.describe()
    record["env"] = _environment()
    write_record(run.path, record)
    return record


def run_sweep(
    config: SweepConfig,
    out: str | os.PathLike[str],
    *,
    datasets: list[Dataset] | None = None,
    force: bool = False,
    progress: bool = True,
    make_outputs: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """Run every (dataset, method) of ``config`` not already recorded under ``out``.

    ``datasets`` (already loaded) replaces ``config.datasets``. Returns the records of
    this sweep (new and reused). With ``make_outputs``, also writes ``summary.csv``,
    ``summary.md``, the plots and (``config.claims``) the claims report under ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if datasets is None:
        datasets = [load_dataset(ref, seed=config.settings.seed) for ref in config.datasets]
    records: list[dict[str, Any]] = []
    for dataset in datasets:
        records += run_dataset(config, dataset, out, force=force, progress=progress, log=log)
    if not records and not config.claims:
        raise InputError(
            "the sweep plans no runs: every method list is empty or every template was "
            "skipped for this data (the 'skipped' lines say why)"
        )
    written: list[Path] = []
    if config.claims:
        from .claims import write_claims

        for dataset in datasets:
            written += write_claims(
                dataset,
                out,
                config.settings,
                options=config.options,
                force=force,
                log=log,
                progress=progress,
            )
    if make_outputs:
        # From the records on disk, like `python -m bench summary/plot`: one source.
        from .plot import plot_results
        from .results import load_records, write_summary

        # Only records of this sweep's data and settings: an output folder may also hold
        # records of other data under the same name, or of other settings.
        fingerprints = {(dataset.name, dataset.fingerprint()) for dataset in datasets}
        settings = config.settings.model_dump()
        on_disk = [
            r
            for r in load_records(out)
            if (r["params"]["dataset"], r["params"].get("dataset_fingerprint")) in fingerprints
            and r["params"].get("settings", settings) == settings
        ]
        written += write_summary(out, on_disk, ratios=config.ratios)
        written += plot_results(out, on_disk)
    for path in written:
        log(f"wrote {path}")
    return records


def run_dataset(
    config: SweepConfig,
    dataset: Dataset,
    out: Path,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """All runs (then the ANN pass) of one dataset; returns their records."""
    if config.ann is not None:
        from .ann import check_ann

        check_ann(config.ann.factory, config.ann.params, dataset.d, dataset.metric)
    planned, skipped = plan_runs(config, dataset, out)
    for line in skipped:
        log(f"skipped {line}")
    return execute(planned, dataset, out, config.settings, config.ann, force, progress, log)


def execute(
    planned: list[PlannedRun],
    dataset: Dataset,
    out: Path,
    settings: Settings,
    ann: AnnConfig | None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """Run the planned runs of one dataset that have no ok record yet (all with
    ``force``), then the ANN pass; returns every record."""
    records: list[dict[str, Any]] = []
    todo: list[PlannedRun] = []
    for run in planned:
        existing = None if force else read_record(run.path)
        if existing is not None and existing.get("status") == "ok":
            records.append(existing)
        else:
            todo.append(run)
    log(
        f"{dataset.name}: {len(planned)} runs, {len(planned) - len(todo)} already recorded, "
        f"{len(todo)} to run"
    )
    if todo:
        truth = make_truth(dataset, settings.k, out / "gt")
        train = train_rows(dataset, settings.train_size, settings.train_rows, settings.seed)
        for run in _progress(todo, dataset.name, progress):
            record = run_one(run, train, truth, settings)
            if record["status"] != "ok":
                log(f"FAILED {run.method.name}: {record['error']}")
            records.append(record)
    if ann is not None:
        from .ann import run_ann

        try:
            records += run_ann(records, planned, dataset, out, settings, ann, force, progress, log)
        except RuntimeError as exc:  # FAISS cannot build or train that index on this data
            log(f"{dataset.name}: ANN pass ({ann.factory} {ann.params}) skipped: {exc}")
    return records
