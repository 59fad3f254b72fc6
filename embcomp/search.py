"""Brute-force search over encoded vectors, in one stage or two.

Two-stage search keeps two codes per vector: a small one scanned for every query, and a
larger one read only for the few candidates the small one nominates::

    ids, scores = two_stage_search(small, small_codes, large, large_codes, Q, k=10, rerank=4)

finds the top ``rerank * k`` candidates by the small code, decodes their large codes
and returns the top ``k`` of those. The storage cost is both codes
(``small.code_size + large.code_size`` bytes per vector); the gain is that the large
code's accuracy is bought for ``rerank * k`` decodes per query instead of ``n``.
Rescoring with the float32 originals is the same call with an ``fp32`` codec as the
large one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import (
    check_codes,
    check_finite,
    check_matrix,
    normalize_rows,
    to_float32,
    unit_rows,
)
from .codec import Codec
from .evaluation import _scores, _top_k, check_metric, l2_centre, l2_or_score
from .exceptions import InputError, NotFittedError

__all__ = ["search_codes", "two_stage_search"]

_BASE_BLOCK = 16384  # decoded base rows per step: 16384 x 768 float32 = 48 MiB
_QUERY_BLOCK = 1024


def _check(codec: Codec, codes: Any, name: str) -> np.ndarray:
    if not isinstance(codec, Codec):
        raise InputError(f"{name} codec must be an embcomp Codec; got {type(codec).__name__}")
    if not codec.is_fitted:
        raise NotFittedError(f"{name} codec {str(codec.spec)!r} is not fitted")
    return check_codes(codes, code_size=codec.code_size, name=f"{name} codes")


def _prepare(queries: Any, d: int, k: int, metric: str) -> np.ndarray:
    """Checked float32 queries (unit rows, a copy, for ``"cos"``)."""
    check_metric(metric)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer >= 1; got {k!r}")
    Q = check_matrix(queries, name="queries", d=d, allow_empty=True)
    Q32 = to_float32(Q, name="queries")
    check_finite(Q32, name="queries")
    if metric == "cos":
        return unit_rows(Q32)
    return Q32


def _finish(ids: np.ndarray, scores: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    return ids.astype(np.int64), l2_or_score(scores.astype(np.float32), metric)


def search_codes(
    codec: Codec, codes: Any, queries: Any, k: int, *, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of float queries over the decoded vectors of ``codes``.

    Parameters
    ----------
    codec : a fitted Codec.
    codes : ndarray (n, codec.code_size) uint8.
    queries : (m, d_in) float array.
    k : neighbours per query (capped at n).
    metric : ``"ip"`` (larger inner product is nearer), ``"l2"`` or ``"cos"`` (cosine
        similarity: queries and decoded vectors scaled to unit norm).

    Returns
    -------
    ids : ndarray (m, k) int64, nearest first, ties to the lower id.
    scores : ndarray (m, k) float32, inner products (cosines), or squared L2 distances.
    """
    codes = _check(codec, codes, "the")
    d_in = codec._check_fitted()
    Q = _prepare(queries, d_in, k, metric)
    n, m = codes.shape[0], Q.shape[0]
    k = min(k, n)
    best_ids = np.zeros((m, 0), dtype=np.int64)
    best_scores = np.zeros((m, 0), dtype=np.float32)
    # One buffer for every block's decoded vectors: fresh memory would page-fault anew.
    buffer = np.empty((min(n, _BASE_BLOCK), d_in), dtype=np.float32)
    for start in range(0, n, _BASE_BLOCK):
        block = codes[start : start + _BASE_BLOCK]
        vectors = codec.decode(block, out=buffer[: block.shape[0]])
        if metric == "cos":
            normalize_rows(vectors)
        elif metric == "l2":  # distances from a point near the vectors (see l2_centre)
            if start == 0:
                centre = l2_centre(vectors)
                if centre is not None:
                    Q = Q - centre
            if centre is not None:
                vectors -= centre
        block_ids = np.arange(start, start + vectors.shape[0], dtype=np.int64)
        merged = []
        for q0 in range(0, m, _QUERY_BLOCK):
            rows = slice(q0, q0 + _QUERY_BLOCK)
            scores = _scores(Q[rows], vectors, metric)
            ids = np.broadcast_to(block_ids, scores.shape)
            merged.append(
                _top_k(
                    np.concatenate([best_scores[rows], scores], axis=1),
                    np.concatenate([best_ids[rows], ids], axis=1),
                    k,
                )
            )
        if merged:
            best_ids = np.concatenate([ids for ids, _ in merged])
            best_scores = np.concatenate([scores for _, scores in merged])
    if m == 0:
        best_ids, best_scores = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return _finish(best_ids, best_scores, metric)


def two_stage_search(
    small_codec: Codec,
    small_codes: Any,
    large_codec: Codec,
    large_codes: Any,
    queries: Any,
    k: int,
    *,
    rerank: int = 4,
    metric: str = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from the small code, final ranking from the large one.

    Parameters
    ----------
    small_codec, small_codes : codec and its codes (n, small_codec.code_size) uint8,
        scanned in full.
    large_codec, large_codes : codec and its codes (n, large_codec.code_size) uint8 of
        the same n vectors, decoded only for the candidates.
    queries : (m, d_in) float array; both codecs must take width d_in.
    k : neighbours to return per query.
    rerank : candidates per query = ``rerank * k`` (at least k).
    metric : ``"ip"``, ``"l2"`` or ``"cos"``.

    Returns
    -------
    ids : ndarray (m, k) int64, nearest first by the large code's reconstruction.
    scores : ndarray (m, k) float32, inner products (cosines), or squared L2 distances
        by it.
    """
    small_codes = _check(small_codec, small_codes, "small")
    large_codes = _check(large_codec, large_codes, "large")
    if small_codes.shape[0] != large_codes.shape[0]:
        raise InputError(
            f"small and large codes must describe the same vectors; got "
            f"{small_codes.shape[0]} and {large_codes.shape[0]} rows"
        )
    d = small_codec._check_fitted()
    if large_codec._check_fitted() != d:
        raise InputError(
            f"the small codec takes {d}-dim vectors but the large one "
            f"{large_codec.d_in}-dim; fit both on the same vectors"
        )
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
        raise InputError(f"rerank must be an integer >= 1; got {rerank!r}")
    Q = _prepare(queries, d, k, metric)
    n = small_codes.shape[0]
    k = min(k, n)
    candidates, _ = search_codes(small_codec, small_codes, Q, min(n, rerank * k), metric=metric)
    m, c = candidates.shape
    if m == 0 or c == 0:
        return _finish(np.zeros((m, k), np.int64), np.zeros((m, k), np.float32), metric)
    vectors = large_codec.decode(large_codes[candidates.ravel()])
    if metric == "cos":
        normalize_rows(vectors)
    elif metric == "l2":  # distances from a point near the vectors (see l2_centre)
        centre = l2_centre(vectors)
        if centre is not None:
            vectors -= centre
            Q = Q - centre
    vectors = vectors.reshape(m, c, d)
    ip = np.einsum("mcd,md->mc", vectors, Q)
    if metric != "l2":
        scores = ip
    else:
        scores = 2.0 * ip - np.einsum("mcd,mcd->mc", vectors, vectors)
        scores -= np.einsum("md,md->m", Q, Q)[:, None]
    ids, top = _top_k(scores, candidates, k)
    return _finish(ids, top, metric)
