"""Datasets for the benchmark: a registry named ``<source>-<model>-<dim>``, plus any file.

A reference resolves to a :class:`Dataset` in one of these ways:

* a registry name: ``sample-wordnet-minilm-384`` (the sample bundled with embcomp) or
  ``shared-<folder>-<dim>`` for every folder of ``../shared/data`` (or
  ``$EMBCOMP_DATA_DIR``) in the shared layout;
* a folder in the shared layout: ``base.npy``, ``queries.npy``, and optionally
  ``gt_ip_100.npy`` (exact neighbours by inner product) and ``qrels.tsv``;
* an ann-benchmarks HDF5 file (``train`` = the base, ``test`` = the queries,
  ``neighbors`` = exact neighbours, ``attrs["distance"]`` = angular | euclidean | dot);
* any ``.npy`` or ``.fvecs`` matrix: the base, with queries from a second file or, when
  none is given, a seeded random hold-out of the rows (removed from the base).

When a dataset has no ground truth (or too few columns of it), :func:`ground_truth`
computes it exactly once and caches it under the results folder, keyed by the data's
fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from embcomp._atomic import atomic_output
from embcomp.evaluation import check_metric, exact_knn, load_qrels
from embcomp.exceptions import InputError
from embcomp.io import read_vectors

__all__ = [
    "Dataset",
    "data_roots",
    "ground_truth",
    "list_datasets",
    "load_dataset",
]

SAMPLE_NAME = "sample-wordnet-minilm-384"
_HDF5_SUFFIXES = (".hdf5", ".h5")
_VECTOR_SUFFIXES = (".npy", ".fvecs")
_MAX_HELD_OUT_QUERIES = 1000
_FINGERPRINT_ROWS = 1024


@dataclass
class Dataset:
    """Base vectors, queries and what is known about their true neighbours.

    Attributes
    ----------
    name : registry-style name ``<source>-<model>-<dim>``.
    base : (n, d) float32, possibly a memory map.
    queries : (m, d) float32.
    metric : ``"ip"`` (inner product, larger is nearer) or ``"l2"``.
    gt : (m, k_gt) int or ``None``: exact neighbours, nearest first.
    qrels : ``{query_row: {base_row: grade}}`` or ``None``.
    source : where the data came from (a path or ``"bundled"``).
    """

    name: str
    base: np.ndarray
    queries: np.ndarray
    metric: str = "ip"
    gt: np.ndarray | None = None
    qrels: dict[int, dict[int, float]] | None = None
    source: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def d(self) -> int:
        return int(self.base.shape[1])

    @property
    def n_base(self) -> int:
        return int(self.base.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.queries.shape[0])

    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of shapes, metric, 1,024 evenly spaced base rows and
        every query: cheap for big bases, changes whenever the data in use changes."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"{self.base.shape}|{self.queries.shape}|{self.metric}".encode())
            rows = np.unique(np.linspace(0, self.n_base - 1, _FINGERPRINT_ROWS).astype(np.int64))
            digest.update(np.ascontiguousarray(self.base[rows], dtype="<f4").tobytes())
            digest.update(np.ascontiguousarray(self.queries, dtype="<f4").tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts about the dataset, for records."""
        return {
            "name": self.name,
            "source": self.source,
            "n_base": self.n_base,
            "n_queries": self.n_queries,
            "d": self.d,
            "metric": self.metric,
            "fingerprint": self.fingerprint(),
            "has_qrels": bool(self.qrels),
            "gt_columns": None if self.gt is None else int(self.gt.shape[1]),
        }


def data_roots() -> list[Path]:
    """Folders searched for shared datasets: ``$EMBCOMP_DATA_DIR`` (``os.pathsep``-separated),
    then ``shared/data`` beside the repository and beside the working directory."""
    roots: list[Path] = []
    env = os.environ.get("EMBCOMP_DATA_DIR")
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[1]
    roots += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [u.resolve() for u in unique]:
            unique.append(root)
    return unique


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "data"


def _is_shared_layout(folder: Path) -> bool:
    return (folder / "base.npy").is_file() and (folder / "queries.npy").is_file()


def _npy_width(path: Path) -> int:
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[1])


def list_datasets() -> dict[str, str]:
    """Registry name -> where it lives, for every dataset found right now."""
    found = {SAMPLE_NAME: "bundled with embcomp (embcomp.sample.load_sample)"}
    for root in data_roots():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if _is_shared_layout(folder):
                name = f"shared-{_slug(folder.name)}-{_npy_width(folder / 'base.npy')}"
                found.setdefault(name, str(folder))
    return found


def load_dataset(
    ref: str | os.PathLike[str],
    *,
    queries: str | os.PathLike[str] | None = None,
    qrels: str | os.PathLike[str] | None = None,
    n_queries: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Resolve a registry name, folder or file into a :class:`Dataset`.

    Parameters
    ----------
    ref : registry name, shared-layout folder, ``.hdf5``/``.h5``, ``.npy`` or ``.fvecs``.
    queries : optional query file (``.npy``/``.fvecs``) for a single-matrix ``ref``.
    qrels : optional ``query<TAB>doc[<TAB>grade]`` file (rows index the queries/base);
        with a single-matrix ``ref`` only together with ``queries`` (held-out queries
        renumber the rows the labels name).
    n_queries : rows held out as queries when a single matrix comes without queries
        (default ``min(1000, n // 10)``).
    seed : seeds that hold-out.

    Raises
    ------
    InputError
        Unknown name, missing file, unsupported type, mismatched widths, ``qrels`` for
        a single matrix without ``queries``.
    """
    text = os.fspath(ref)
    registry = list_datasets()
    if (
        qrels is not None
        and queries is None
        and text not in registry
        and Path(text).suffix.lower() in _VECTOR_SUFFIXES
    ):
        # Held-out queries are random rows taken out of the base, which renumbers both:
        # labels written for the file's rows would point at the wrong documents.
        raise InputError(
            f"--qrels with a single matrix {text!r} needs --queries: without it, queries are "
            "rows held out of the base and both are renumbered, so the labels would name "
            "the wrong rows; pass the query file the qrels were written for"
        )
    if text in registry:
        if text == SAMPLE_NAME:
            dataset = _load_sample()
        else:
            dataset = _load_folder(Path(registry[text]), name=text)
    else:
        path = Path(text)
        if not path.exists():
            raise InputError(
                f"dataset {text!r} is neither a registered name nor an existing path; "
                f"registered: {', '.join(sorted(registry))}"
            )
        if path.is_dir():
            if not _is_shared_layout(path):
                raise InputError(
                    f"folder {text!r} lacks base.npy and queries.npy (the shared layout: "
                    "base.npy, queries.npy, optional gt_ip_100.npy and qrels.tsv)"
                )
            dataset = _load_folder(path, name=None)
        elif path.suffix.lower() in _HDF5_SUFFIXES:
            dataset = _load_hdf5(path)
        elif path.suffix.lower() in _VECTOR_SUFFIXES:
            dataset = _load_matrix(path, queries, n_queries, seed)
        else:
            raise InputError(
                f"{text!r}: unsupported dataset file type {path.suffix!r}; use a folder, "
                ".npy, .fvecs or an ann-benchmarks .hdf5"
            )
    if queries is not None and Path(text).suffix.lower() not in _VECTOR_SUFFIXES:
        dataset.queries = _float32(read_vectors(queries), f"queries {os.fspath(queries)!r}")
        # the stored neighbours and relevance labels belong to the other queries
        dataset.gt, dataset.qrels = None, None
        dataset.name += "-q" + hashlib.sha256(os.fspath(queries).encode()).hexdigest()[:6]
    if qrels is not None:
        dataset.qrels = load_qrels(qrels)
    _check_widths(dataset)
    return dataset


def _float32(X: np.ndarray, what: str) -> np.ndarray:
    if X.ndim != 2 or X.shape[0] == 0:
        raise InputError(f"{what} must be a non-empty (n, d) matrix; got shape {X.shape}")
    X = X if X.dtype == np.float32 else np.ascontiguousarray(X, dtype=np.float32)
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        raise InputError(
            f"{what}: row {int(np.flatnonzero(~finite)[0])} holds NaN or inf "
            f"({int((~finite).sum())} such rows); benchmark data must be finite"
        )
    return X


def _check_widths(dataset: Dataset) -> None:
    if dataset.queries.shape[1] != dataset.base.shape[1]:
        raise InputError(
            f"dataset {dataset.name!r}: queries have {dataset.queries.shape[1]} dims but the "
            f"base has {dataset.base.shape[1]}; give queries made by the same model"
        )
    if dataset.gt is not None and (
        dataset.gt.ndim != 2 or dataset.gt.min() < 0 or dataset.gt.max() >= dataset.n_base
    ):
        raise InputError(
            f"dataset {dataset.name!r}: ground truth ids must be a 2-D array of base rows "
            f"0..{dataset.n_base - 1}; got shape {dataset.gt.shape}, ids "
            f"{dataset.gt.min()}..{dataset.gt.max()}"
        )
    if dataset.gt is not None and dataset.gt.shape[0] != dataset.n_queries:
        raise InputError(
            f"dataset {dataset.name!r}: ground truth has {dataset.gt.shape[0]} rows for "
            f"{dataset.n_queries} queries"
        )
    if dataset.gt is not None:
        _spot_check_ground_truth(dataset)


def _spot_check_ground_truth(dataset: Dataset, n_checked: int = 8) -> None:
    """Raise ``InputError`` if the stored nearest neighbour of any of the first few
    queries is not (up to float rounding) the nearest by exact search: ground truth of
    other data or another metric would score every codec against the wrong answers.

    The base is scored block by block in float64 (about 1 MiB per block), keeping only
    each query's best score so far: never a float64 copy of the whole base.
    """
    assert dataset.gt is not None
    m = min(n_checked, dataset.n_queries)
    queries = np.asarray(dataset.queries[:m], dtype=np.float64)  # (m, d)

    def score(rows: np.ndarray) -> np.ndarray:
        """(r, d) float base rows -> (r, m) float64 scores, higher is nearer."""
        rows = np.asarray(rows, dtype=np.float64)
        if dataset.metric == "ip":
            return rows @ queries.T
        return -np.stack([((rows - q) ** 2).sum(axis=1) for q in queries], axis=1)

    best = np.full(m, -np.inf)
    best_row = np.zeros(m, dtype=np.int64)
    step = max(1, (1 << 20) // (8 * dataset.d))
    for start in range(0, dataset.n_base, step):
        scores = score(dataset.base[start : start + step])
        top = scores.argmax(axis=0)
        top_scores = scores[top, np.arange(m)]
        better = top_scores > best
        best[better], best_row[better] = top_scores[better], start + top[better]
    stored_rows = np.asarray(dataset.gt[:m, 0], dtype=np.int64)
    stored = score(dataset.base[stored_rows])[np.arange(m), np.arange(m)]
    for q in range(m):
        if best[q] - stored[q] > 1e-4 * max(1.0, abs(best[q])):
            raise InputError(
                f"dataset {dataset.name!r}: ground truth row {q} names base row "
                f"{int(stored_rows[q])} as the nearest ({dataset.metric} score "
                f"{stored[q]:.6g}), but row {int(best_row[q])} scores {best[q]:.6g}; the "
                "ground truth is not of this base, these queries and this metric"
            )


def _load_sample() -> Dataset:
    from embcomp.sample import load_sample

    base, queries = load_sample()
    return Dataset(SAMPLE_NAME, base, queries, "ip", source="bundled")


def _load_folder(folder: Path, name: str | None) -> Dataset:
    base = _float32(read_vectors(folder / "base.npy"), f"{folder}/base.npy")
    queries = _float32(np.asarray(read_vectors(folder / "queries.npy")), f"{folder}/queries.npy")
    gt_path = folder / "gt_ip_100.npy"
    gt = np.load(gt_path, allow_pickle=False) if gt_path.is_file() else None
    qrels_path = folder / "qrels.tsv"
    qrels = load_qrels(qrels_path) if qrels_path.is_file() else None
    source = "shared" if name is not None else "dir"
    name = name or f"{source}-{_slug(folder.name)}-{base.shape[1]}"
    return Dataset(name, base, queries, "ip", gt, qrels, str(folder))


def _load_hdf5(path: Path) -> Dataset:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py ships with the bench extra
        raise InputError("reading .hdf5 datasets needs h5py: pip install 'embcomp[bench]'") from exc
    try:
        with h5py.File(path, "r") as handle:
            missing = [key for key in ("train", "test") if key not in handle]
            if missing:
                raise InputError(
                    f"{str(path)!r} lacks {missing}: an ann-benchmarks file has 'train' "
                    "(base), 'test' (queries) and 'neighbors'"
                )
            base = np.asarray(handle["train"], dtype=np.float32)
            queries = np.asarray(handle["test"], dtype=np.float32)
            gt = np.asarray(handle["neighbors"]) if "neighbors" in handle else None
            distance = str(handle.attrs.get("distance", "angular")).lower()
    except OSError as exc:
        raise InputError(f"{str(path)!r} is not a readable HDF5 file: {exc}") from exc
    if distance in ("angular", "cosine"):
        # cosine ranking == inner product of unit vectors; the stored neighbours stay valid
        base, queries, metric = _unit(base), _unit(queries), "ip"
    elif distance in ("euclidean", "l2"):
        metric = "l2"
    elif distance in ("dot", "ip", "inner_product"):
        metric = "ip"
    else:
        raise InputError(
            f"{str(path)!r}: distance {distance!r} is not supported; use angular, euclidean or dot"
        )
    name = f"hdf5-{_slug(path.stem)}-{base.shape[1]}"
    return Dataset(name, base, queries, metric, gt, None, str(path))


def with_metric(dataset: Dataset, metric: str) -> Dataset:
    """``dataset`` to be searched by ``metric``: ``"ip"``, ``"l2"`` or ``"cos"``.

    Cosine is the inner product of rows scaled to unit norm (copies), as ann-benchmarks'
    angular datasets are loaded. Stored neighbours found by another metric are dropped
    (the benchmark then computes them exactly); the name says the metric.
    """
    check_metric(metric)
    if metric == "cos":
        base, queries, search = _unit(dataset.base), _unit(dataset.queries), "ip"
    elif metric == dataset.metric:
        return dataset
    else:
        base, queries, search = dataset.base, dataset.queries, metric
    return replace(
        dataset,
        name=f"{dataset.name}-{metric}",
        base=base,
        queries=queries,
        metric=search,
        gt=None,
        _fingerprint=None,
    )


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (X / norms).astype(np.float32)


def _load_matrix(
    path: Path, queries: str | os.PathLike[str] | None, n_queries: int | None, seed: int
) -> Dataset:
    base = _float32(read_vectors(path), f"{str(path)!r}")
    name = f"file-{_slug(path.stem)}-{base.shape[1]}"
    if queries is not None:
        Q = _float32(np.asarray(read_vectors(queries)), f"queries {os.fspath(queries)!r}")
        return Dataset(name, base, Q, "ip", source=str(path))
    n = base.shape[0]
    m = n_queries if n_queries is not None else min(_MAX_HELD_OUT_QUERIES, n // 10)
    if m < 1 or n - m < 10:
        raise InputError(
            f"{str(path)!r} has {n} rows: too few to hold out queries (one in ten) and keep "
            "10 for recall@10; pass a query file or at least 11 vectors"
        )
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).choice(n, size=m, replace=False)] = True
    return Dataset(
        f"{name}-holdout{m}",
        np.ascontiguousarray(base[~held]),
        np.ascontiguousarray(base[held]),
        "ip",
        source=f"{path} (rows held out as queries: {m}, seed {seed})",
    )


def ground_truth(dataset: Dataset, k: int, cache_dir: str | os.PathLike[str] | None) -> np.ndarray:
    """Exact top-``k`` neighbour ids (m, k), nearest first, from the dataset or a cache.

    Computed at most once per dataset content: the result is saved as
    ``<cache_dir>/gt-<name>-<fingerprint>-<metric>-k<k>.npy`` and reused.
    """
    k = min(k, dataset.n_base)
    if dataset.gt is not None and dataset.gt.shape[1] >= k:
        return np.asarray(dataset.gt[:, :k])
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / (
            f"gt-{dataset.name}-{dataset.fingerprint()}-{dataset.metric}-k{k}.npy"
        )
        if cache.is_file():
            return np.load(cache, allow_pickle=False)
    ids, _ = exact_knn(dataset.base, dataset.queries, k, metric=dataset.metric)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache) as handle:
            np.save(handle, ids.astype(np.int32), allow_pickle=False)
    return ids


def train_rows(dataset: Dataset, size: int | None, how: str = "first", seed: int = 0) -> np.ndarray:
    """The vectors codecs are fitted on: ``size`` rows of the base, the first ones
    (``how="first"``) or a seeded uniform sample (``"random"``); float32 (size, d)."""
    n = dataset.n_base
    if size is None or size >= n:
        return np.ascontiguousarray(dataset.base, dtype=np.float32)
    if size < 1:
        raise InputError(f"train_size must be >= 1; got {size}")
    if how == "first":
        return np.ascontiguousarray(dataset.base[:size], dtype=np.float32)
    if how == "random":
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        return np.ascontiguousarray(dataset.base[rows], dtype=np.float32)
    raise InputError(f"train_rows must be 'first' or 'random'; got {how!r}")


def qrels_for(dataset: Dataset) -> Mapping[int, Mapping[int, float]] | None:
    """The relevance labels restricted to queries that exist, or ``None``."""
    if not dataset.qrels:
        return None
    return {q: rel for q, rel in dataset.qrels.items() if 0 <= q < dataset.n_queries}
