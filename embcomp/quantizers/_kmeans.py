"""Seeded, deterministic k-means in numpy (no FAISS in the core library).

k-means++ initialisation (Arthur & Vassilvitskii 2007) on a sample of the points, then a
fixed number of Lloyd iterations (stopping early once no assignment changes). Empty
clusters are re-seeded with the points that are currently worst represented, so all
``k`` codewords stay useful. Distances are computed block by block with one matrix
product per block (``|c|^2 - 2 x.c``; ``|x|^2`` does not change the argmin), so memory
stays at one (block, k) float32 array whatever the number of points.
"""

from __future__ import annotations

import numpy as np

from .._cancel import checkpoint

__all__ = ["assign", "kmeans"]

_ASSIGN_BLOCK = 256  # rows per distance block: 256 x 256 float32 = 256 KiB, cache-resident
_SEED_POINTS_PER_CENTROID = 16


def assign(X: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2) for each row.

    Parameters
    ----------
    X : ndarray (n, g) float32.
    centroids : ndarray (k, g) float32.

    Returns
    -------
    labels : ndarray (n,) int64; ties go to the lower index.
    """
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int64)
    minus_two_ct = np.ascontiguousarray(-2.0 * centroids.T, dtype=np.float32)
    squared = np.einsum("ij,ij->i", centroids, centroids, dtype=np.float32)
    scratch = np.empty((min(n, _ASSIGN_BLOCK), centroids.shape[0]), dtype=np.float32)
    for start in range(0, n, _ASSIGN_BLOCK):
        block = X[start : start + _ASSIGN_BLOCK]
        out = scratch[: block.shape[0]]
        np.matmul(block, minus_two_ct, out=out)
        out += squared
        labels[start : start + block.shape[0]] = np.argmin(out, axis=1)
    return labels


def _plus_plus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability ~ squared distance."""
    n, g = X.shape
    centroids = np.empty((k, g), dtype=np.float32)
    centroids[0] = X[rng.integers(n)]
    closest = np.einsum("ij,ij->i", X - centroids[0], X - centroids[0], dtype=np.float64)
    draws = rng.random(k)
    for j in range(1, k):
        cumulative = np.cumsum(closest)
        total = cumulative[-1]
        if total <= 0.0:  # fewer distinct points than centres: repeat the first
            centroids[j:] = centroids[0]
            break
        index = min(int(np.searchsorted(cumulative, draws[j] * total, side="right")), n - 1)
        centroids[j] = X[index]
        diff = X - centroids[j]
        np.minimum(closest, np.einsum("ij,ij->i", diff, diff, dtype=np.float64), out=closest)
    return centroids


def kmeans(X: np.ndarray, k: int, *, iters: int = 16, seed: int | list[int] = 0) -> np.ndarray:
    """Fit ``k`` centroids to the rows of ``X``.

    Parameters
    ----------
    X : ndarray (n, g) float32, training points.
    k : number of centroids (may exceed n: surplus centroids repeat points).
    iters : Lloyd iterations after seeding (fewer if assignments stop changing).
    seed : seed (or seed sequence) of the numpy Generator; same inputs, same output.

    Returns
    -------
    centroids : ndarray (k, g) float32.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, g = X.shape
    rng = np.random.default_rng(seed)
    # Seeding is sequential in k; on a sample of ~16 points per centroid it costs little
    # and the Lloyd iterations on all points wash out the difference.
    seeds = X
    if n > _SEED_POINTS_PER_CENTROID * k:
        seeds = X[np.sort(rng.choice(n, _SEED_POINTS_PER_CENTROID * k, replace=False))]
    centroids = _plus_plus(seeds, k, rng)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iters):
        checkpoint()
        new_labels = assign(X, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        counts = np.bincount(labels, minlength=k)
        sums = np.empty((k, g), dtype=np.float64)
        for j in range(g):
            sums[:, j] = np.bincount(labels, weights=X[:, j], minlength=k)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        n_empty = int(k - filled.sum())
        if n_empty and n > k:
            residual = X - centroids[labels]
            error = np.einsum("ij,ij->i", residual, residual)
            worst = np.argsort(-error, kind="stable")[:n_empty]
            centroids[~filled] = X[worst]
            labels[worst] = -1  # force another assignment pass
    return centroids
