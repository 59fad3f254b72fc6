"""Search-quality measures: exact k-NN ground truth, recall@k with ties, nDCG@k."""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike
from typing import Any

import numpy as np

from ._cancel import checkpoint
from ._validation import check_finite, check_matrix, normalize_rows, to_float32, unit_rows
from .exceptions import InputError

__all__ = [
    "METRICS",
    "check_metric",
    "exact_knn",
    "load_qrels",
    "ndcg_at_k",
    "recall_at_k",
    "relevance_recall_at_k",
]

# 256 queries x 16,384 base rows: 16 MB of scores, 16 MB of their negation (NaN last)
# and 32 MB of argpartition's indices per block (65,536 rows took 270 MB at once and
# was no faster: 1,000 queries against 80,000 MiniLM rows, 0.47-0.49 s either way).
_Q_BLOCK = 256
_B_BLOCK = 16384
_GATHER_FLOATS = 1 << 22  # recall_at_k scores ties on this many gathered floats at a time
_CENTRE_ROWS = 4096  # base rows whose mean L2 searches measure from (see l2_centre)
_FAR = 1024.0  # ... when its squared norm is over this many times their spread
METRICS = ("ip", "l2", "cos")


def check_metric(metric: Any) -> str:
    """``metric`` if it is one of :data:`METRICS`, else a clear error."""
    if metric not in METRICS:
        raise InputError(f"metric must be 'ip', 'l2' or 'cos'; got {metric!r}")
    return str(metric)


def _scores(queries: np.ndarray, base: np.ndarray, metric: str) -> np.ndarray:
    """Larger is better: inner product (cosine for unit rows), or minus the squared L2
    distance (for ``"l2"``, pass rows translated by :func:`l2_centre`)."""
    ip = queries @ base.T
    if metric != "l2":
        return ip
    base_sq = np.einsum("ij,ij->i", base, base)
    query_sq = np.einsum("ij,ij->i", queries, queries)
    return 2 * ip - base_sq[None, :] - query_sq[:, None]


def l2_centre(rows: Any) -> np.ndarray | None:
    """A point to measure squared L2 distances from: the mean of ``rows`` (float64 sum,
    as float32) where they sit far from the origin next to their spread, else None
    (measure from the origin).

    :func:`_scores` computes ``|q - x|^2`` as ``|q|^2 + |x|^2 - 2 q.x``, whose rounding
    error grows with ``|q|^2 + |x|^2`` while the distances grow with the spread: far
    from the origin it loses every digit in float32 (at offset/spread 1e3, recall@10
    0.05 and negative distances). Translating queries and base by the same point changes
    no distance and brings them near 0. It is done only where the squared offset is
    over ``_FAR`` times the spread (more than 10 of float32's 24 bits lost): nearer,
    it would gain little and lose exact ties (small integers, for one, score exactly
    about 0 but not about a fractional mean). The mean is rounded to 12 significant
    bits, which leaves it as near the data and keeps integers (and other power-of-two
    grids) integers after the translation: their distances stay exact.
    """
    rows = np.asarray(rows)
    with np.errstate(over="ignore", invalid="ignore"):
        centre = rows.mean(axis=0, dtype=np.float64)
        spread = np.mean(np.sum((rows - centre) ** 2, axis=1)) if rows.size else 0.0
        far = bool(np.isfinite(centre).all() and centre @ centre > _FAR * spread)
    if not far:  # measure from the origin: no translation to pay for
        return None
    fraction, exponent = np.frexp(centre)
    return np.ldexp(np.round(fraction * 4096) / 4096, exponent).astype(np.float32)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row by score, ties broken by lower id (deterministic)."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores_k = np.take_along_axis(scores, part, axis=1)
        ids_k = np.take_along_axis(ids, part, axis=1)
        # Rows where an entry outside the partition ties the k-th score: argpartition
        # chose among the tied ones arbitrarily, so redo just those rows exactly, sorting
        # only the entries at or above the k-th score (quantized vectors tie often).
        kth = scores_k.min(axis=1)
        contenders = scores >= kth[:, None]
        for row in np.flatnonzero(contenders.sum(axis=1) > k):
            candidates = np.flatnonzero(contenders[row])
            order = candidates[np.lexsort((ids[row, candidates], -scores[row, candidates]))[:k]]
            scores_k[row], ids_k[row] = scores[row, order], ids[row, order]
    else:
        scores_k, ids_k = scores, ids
    order = np.lexsort((ids_k, -scores_k), axis=1)
    return np.take_along_axis(ids_k, order, axis=1), np.take_along_axis(scores_k, order, axis=1)


def exact_knn(base: Any, queries: Any, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force in float32, blocked over both arrays.

    Parameters
    ----------
    base : (n, d) float array; may be a memory map.
    queries : (m, d) float array.
    k : neighbours per query (capped at n).
    metric : ``"ip"`` (inner product, larger is nearer), ``"l2"`` or ``"cos"`` (cosine
        similarity: the inner product of the rows scaled to unit norm; a zero row
        scores 0 against everything).

    Returns
    -------
    ids : (m, k) int64, nearest first; ties broken by lower index.
    scores : (m, k) float32: inner products (cosines for ``"cos"``), or squared L2
        distances for ``"l2"``.
    """
    base = check_matrix(base, name="base")
    queries = check_matrix(queries, name="queries", d=base.shape[1], allow_empty=True)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer >= 1; got {k!r}")
    check_metric(metric)
    check_finite(to_float32(queries, name="queries"), name="queries")
    return blocked_knn(base, queries, k, metric, checked=True)


def blocked_knn(
    base: Any, queries: Any, k: int, metric: str = "ip", *, checked: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_knn` without its argument checks, for callers that pass valid arrays.

    Scores 256 queries against 16,384 base rows at a time (16 MB of scores, ~65 MB in
    all) and merges each block's top k into a running top k, so memory does not grow
    with ``base``.
    ``checked``: convert each base block to float32, refuse non-finite rows and honour
    cancellation (:mod:`embcomp._cancel`); without it, base blocks are used as they are
    and a NaN score never ranks above a number. ``"cos"`` scales the queries and each
    base block to unit rows (copies: memory still does not grow with ``base``).
    """
    k = min(k, base.shape[0])
    m = queries.shape[0]
    if metric == "cos":
        queries = unit_rows(queries)
    centre = l2_centre(base[:_CENTRE_ROWS]) if metric == "l2" else None
    best_ids = np.empty((m, k), dtype=np.int64)
    best_scores = np.empty((m, k), dtype=np.float32)
    for q0 in range(0, m, _Q_BLOCK):
        q = np.ascontiguousarray(queries[q0 : q0 + _Q_BLOCK], dtype=np.float32)
        if centre is not None:
            q = q - centre
        run_ids = np.empty((q.shape[0], 0), dtype=np.int64)
        run_scores = np.empty((q.shape[0], 0), dtype=np.float32)
        for b0 in range(0, base.shape[0], _B_BLOCK):
            b = base[b0 : b0 + _B_BLOCK]
            if checked:
                checkpoint()  # a caller may stop a long search between blocks
                b = to_float32(b, name="base", row_offset=b0)
                check_finite(b, name="base", row_offset=b0)
            if metric == "cos":
                b = unit_rows(b)
            elif centre is not None:
                b = np.asarray(b, dtype=np.float32) - centre
            block_scores = _scores(q, b, metric)
            block_ids = np.broadcast_to(np.arange(b0, b0 + b.shape[0]), block_scores.shape)
            ids_k, scores_k = _top_k(block_scores, block_ids, k)
            run_ids, run_scores = _top_k(
                np.concatenate([run_scores, scores_k], axis=1),
                np.concatenate([run_ids, ids_k], axis=1),
                k,
            )
        best_ids[q0 : q0 + q.shape[0]] = run_ids
        best_scores[q0 : q0 + q.shape[0]] = l2_or_score(run_scores, metric)
    return best_ids, best_scores


def _members(found: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``hits[i, j] = found[i, j] in true[i]`` (bool, ``found``'s shape), without a
    (m, k, k) comparison: each id becomes a key ``row * span + id``, so the rows of
    ``true``, each sorted, make one sorted array to binary-search."""
    if found.size == 0 or true.size == 0:
        return np.zeros(found.shape, dtype=bool)
    lo = min(int(found.min()), int(true.min()))
    span = max(int(found.max()), int(true.max())) - lo + 1
    if not (-(2**62) <= lo and (lo + span) * found.shape[0] < 2**62):  # keys overflow
        return np.array([np.isin(f, t) for f, t in zip(found, true, strict=True)])
    rows = np.arange(found.shape[0], dtype=np.int64)[:, None] * span - lo
    keys = (np.sort(true, axis=1).astype(np.int64) + rows).ravel()
    wanted = found.astype(np.int64) + rows
    at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    return keys[at] == wanted


def _ties(
    found: np.ndarray,
    true: np.ndarray,
    base: np.ndarray,
    q: np.ndarray,
    metric: str,
    eps: float,
) -> np.ndarray:
    """Which found ids score within ``eps * scale`` of the true k-th (see recall_at_k)."""
    valid = found >= 0
    safe = np.where(valid, found, 0)
    found_vectors = base[safe].astype(np.float32)  # (m, k, d)
    kth_vectors = base[true[:, -1]].astype(np.float32)  # (m, d)
    if metric == "cos":  # cosines are inner products of unit rows (the gathers are
        q = unit_rows(q)  # fresh copies: normalized in place)
        normalize_rows(kth_vectors)
        normalize_rows(found_vectors.reshape(-1, q.shape[1]))
    q_norm = np.linalg.norm(q, axis=1)[:, None]
    x_norm = np.maximum(
        np.linalg.norm(found_vectors, axis=2), np.linalg.norm(kth_vectors, axis=1)[:, None]
    )
    if metric == "l2":
        found_scores = -((found_vectors - q[:, None, :]) ** 2).sum(axis=2)
        kth_scores = -((kth_vectors - q) ** 2).sum(axis=1)
        scale = q_norm**2 + x_norm**2
    else:
        found_scores = np.einsum("mkd,md->mk", found_vectors, q)
        kth_scores = np.einsum("md,md->m", kth_vectors, q)
        scale = q_norm * x_norm
    return valid & (found_scores >= kth_scores[:, None] - eps * scale)


def l2_or_score(scores: np.ndarray, metric: str) -> np.ndarray:
    """What a search returns from its ranking scores: squared L2 distances (never below
    0, which rounding could give) for ``"l2"``, else the scores themselves."""
    return np.maximum(-scores, 0) if metric == "l2" else scores


def recall_at_k(
    found_ids: Any,
    true_ids: Any,
    k: int,
    *,
    base: Any = None,
    queries: Any = None,
    metric: str = "ip",
    eps: float = 1e-5,
) -> float:
    """Mean fraction of the true top-k found among the first k results.

    Parameters
    ----------
    found_ids : (m, >=k) int, results of the search under test, best first.
    true_ids : (m, >=k) int, exact neighbours, best first.
    base, queries : the float32 vectors; when given, a found id whose exact score is
        within ``eps * scale`` of the true k-th score also counts as a hit (ties are not
        misses). ``scale`` is what float32 rounding errors of the scores grow with:
        ``|q| * |x|`` for inner products, ``|q|^2 + |x|^2`` for squared distances (``x``
        the larger of the two base vectors compared). For unit vectors and ``ip`` the
        tolerance is ``eps`` itself; an absolute one would make every id a tie for
        embeddings of norm 1e-6 and no near-tie one for embeddings of norm 1e4.
    metric : ``"ip"``, ``"l2"`` or ``"cos"``, as the search that gave the ids (only
        used to score ties).

    Returns
    -------
    float in [0, 1].
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer >= 1; got {k!r}")
    check_metric(metric)
    found, true = np.asarray(found_ids), np.asarray(true_ids)
    if any(a.ndim != 2 or a.dtype.kind not in "iu" for a in (found, true)):
        raise InputError(
            f"found_ids and true_ids must be 2-D integer arrays; got {found.dtype} "
            f"{found.shape} and {true.dtype} {true.shape}"
        )
    found, true = found[:, :k], true[:, :k]
    if base is not None and (true.max(initial=0) >= len(base) or found.max(initial=0) >= len(base)):
        raise InputError(f"found_ids or true_ids name rows beyond the {len(base)} base vectors")
    if found.shape[0] != true.shape[0] or true.shape[1] < k:
        raise InputError(
            f"found_ids {found.shape} and true_ids {true.shape} must have the same rows "
            f"and at least k={k} columns"
        )
    hits = _members(found, true)
    if base is not None and queries is not None:
        base = np.asarray(base)
        q = np.asarray(queries, dtype=np.float32)
        # Rows in blocks: the gathered vectors are (rows, k, d) floats.
        step = max(1, _GATHER_FLOATS // max(1, k * q.shape[1]))
        for r0 in range(0, found.shape[0], step):
            rows = slice(r0, r0 + step)
            hits[rows] |= _ties(found[rows], true[rows], base, q[rows], metric, eps)
    if found.shape[0] == 0:
        return 0.0
    # Duplicate ids in a result list must not count twice (copies of an id are all hits
    # or all misses): count the first of each run of equal ids in each sorted row.
    order = np.argsort(found, axis=1, kind="stable")
    ids, hits = np.take_along_axis(found, order, axis=1), np.take_along_axis(hits, order, axis=1)
    first = np.ones(ids.shape, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return float(np.mean((hits & first).sum(axis=1)) / k)


def load_qrels(path: str | PathLike[str]) -> dict[int, dict[int, float]]:
    """Read ``query<TAB>doc[<TAB>grade]`` lines into ``{query: {doc: grade}}``."""
    qrels: dict[int, dict[int, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (2, 3):
                raise InputError(f"{path}:{line_no}: expected 'query<TAB>doc[<TAB>grade]'")
            try:
                grade = float(parts[2]) if len(parts) == 3 else 1.0
                qrels.setdefault(int(parts[0]), {})[int(parts[1])] = grade
            except ValueError as exc:
                raise InputError(f"{path}:{line_no}: {exc}") from exc
    return qrels


def _as_graded(rel: Any) -> Mapping[int, float]:
    return rel if isinstance(rel, Mapping) else {int(doc): 1.0 for doc in rel}


def ndcg_at_k(ids: Any, qrels: Mapping[int, Any], k: int = 10) -> float:
    """Mean nDCG@k over the queries that have relevance labels.

    Parameters
    ----------
    ids : (m, >=k) int, ranked results per query (row i is query i).
    qrels : ``{query: {doc: grade}}`` or ``{query: set_of_docs}`` (binary).
    """
    ids = np.asarray(ids)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for query, rel in qrels.items():
        if not 0 <= query < ids.shape[0]:
            continue
        graded = _as_graded(rel)
        gains = [graded.get(int(doc), 0.0) for doc in ids[query, :k]]
        dcg = float(np.dot(gains, discounts[: len(gains)]))
        ideal = sorted(graded.values(), reverse=True)[:k]
        idcg = float(np.dot(ideal, discounts[: len(ideal)]))
        if idcg > 0:
            values.append(dcg / idcg)
    return float(np.mean(values)) if values else math.nan


def relevance_recall_at_k(ids: Any, qrels: Mapping[int, Any], k: int = 10) -> float:
    """Mean fraction of each query's relevant documents found in its top k."""
    ids = np.asarray(ids)
    values = []
    for query, rel in qrels.items():
        if not 0 <= query < ids.shape[0]:
            continue
        relevant = {doc for doc, grade in _as_graded(rel).items() if grade > 0}
        if relevant:
            values.append(len(relevant & set(ids[query, :k].tolist())) / len(relevant))
    return float(np.mean(values)) if values else math.nan
