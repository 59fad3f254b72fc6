"""MPAD reducer (arXiv 2504.16335): greedy axes that keep the close pairs of points apart.

For a unit direction ``v`` the training vectors project to ``p = X_c @ v``; MPAD's
utility is the mean of the b% tail (smallest gaps by default, as in the paper's first
version; largest as an option, as in a later version of the authors' code) of the
absolute gaps ``|p_i - p_j|`` over all pairs ``i < j``. Axes are chosen one at a time:
axis ``k`` maximizes

    Phi_k(v) = tail_mean(|p_i - p_j|) - alpha * sum_{m<k} <v, w_m>^2,   v = w / ||w||

with L-BFGS from a seeded start, and earlier axes stay frozen.

Scaling (the authors' code uses 600 points, all pairs, finite differences): the tail
mean and its subgradient are computed *exactly over all N(N-1)/2 pairs* in
O(N log N + N d) time and O(N) extra memory per evaluation by sorting the projections.
With ``s`` sorted, every pair is ``s_j - s_i`` for ``i < j``; the number of pairs with a
gap <= t is a vectorized ``searchsorted`` count, the tail threshold is found by a
bracketed search on that count, and the tail sum is ``weights @ s`` where each point's
weight is (#tail pairs in which it is the larger) - (#tail pairs in which it is the
smaller). The gradient is ``X_c.T @ weights`` in the sorted point order.

Two choices beyond the paper, both stated in the docs: the training vectors are
divided by their RMS centered norm before the gaps are measured (the optimum is the
paper's with ``alpha`` in units of that norm, which is ~1 for unit-norm embeddings,
so ``alpha`` means the same for embeddings of any scale); and above 2,048 training
vectors each axis is optimized on a seeded 2,048-vector subsample first and then
refined on the exact all-pairs objective of all of them (on 20,000 MiniLM vectors
this reached the objective values of 150 full-data iterations with 1/10 of the CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from .._cancel import checkpoint
from .._validation import check_finite
from ..exceptions import DimensionMismatchError, InputError, SpecError
from ._base import LinearReducer, flip_signs, streamed_mean_cov

__all__ = ["MPADReducer"]

_TAILS = ("lower", "upper")
_INITS = ("random", "pca")
# Pairs in the final bracket around the tail threshold are listed explicitly; at most
# max(this, 4 n) of them, so memory stays O(n).
_ENUMERATION_CAP = 1 << 16
_PROBE_PAIRS = 4096
_COARSE_ROWS = 2048


class MPADReducer(LinearReducer):
    """MPAD: a linear projection, built axis by axis, that preserves nearest neighbours.

    Parameters
    ----------
    n_components : int
        Dimensions to keep (the ``d`` of the ``mpad{d}`` spec stage).
    alpha : float
        Weight of the soft orthogonality penalty ``alpha * sum_m <v, w_m>^2``. The gap
        term is measured on training vectors divided by their RMS centered norm, so
        ``alpha`` means the same for embeddings of any scale.
    b : float
        Size of the tail, in percent of all pairs, in (0, 100].
    tail : {"lower", "upper"}
        ``"lower"``: mean of the b% smallest gaps (paper v1, default; b in 60..100 there).
        ``"upper"``: mean of the b% largest gaps (later code; b in 0.5..8 there).
    init : {"random", "pca"}
        Start of each axis: a seeded Gaussian direction (paper) or the principal
        direction of the same rank.
    n_train : int or None
        Training vectors used (a seeded uniform sample); ``None`` uses all.
    n_pairs : int or None
        ``None``: the exact objective over all pairs of the training vectors.
        An int: the objective over that many seeded random pairs (cheaper per step,
        approximate).
    max_iter : int
        L-BFGS iterations per axis. With more than 2,048 training vectors (exact
        objective), these run on a seeded 2,048-vector subsample and are followed by
        ``max(5, max_iter // 10)`` iterations on all of them.
    seed : int
        Seeds the training sample, the random starts and the pair sample.

    Attributes
    ----------
    components_ : ndarray (n_components, d_in) float32
        The learned unit axes ``w_k`` (rows), signs fixed deterministically.
    mean_ : ndarray (d_in,) float32
        Mean of the training vectors.
    inverse_components_ : ndarray (n_components, d_in) float32
        Moore-Penrose pseudo-inverse of ``components_.T``: ``inverse_transform`` maps a
        reduced vector to the least-squares point of the span of the axes.
    fit_info_ : dict
        Diagnostics of the last ``fit`` (per-axis L-BFGS iterations, evaluations,
        tail values, seconds); not stored in artifacts.
    """

    def __init__(
        self,
        n_components: int,
        *,
        alpha: float = 10.0,
        b: float = 80.0,
        tail: str = "lower",
        init: str = "random",
        n_train: int | None = 20000,
        n_pairs: int | None = None,
        max_iter: int = 100,
        seed: int = 0,
    ) -> None:
        self.n_components = n_components
        self.alpha = alpha
        self.b = b
        self.tail = tail
        self.init = init
        self.n_train = n_train
        self.n_pairs = n_pairs
        self.max_iter = max_iter
        self.seed = seed

    def _check_params(self, d: int) -> None:
        k = self.n_components
        if not _is_int(k) or k < 1:
            raise SpecError(f"MPAD n_components must be a positive int; got {k!r}")
        if k > d:
            raise DimensionMismatchError(
                f"mpad{k} keeps more dimensions than the {d} the training vectors have; "
                f"use at most mpad{d}"
            )
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise SpecError(f"MPAD alpha must be a finite number >= 0; got {self.alpha!r}")
        if not _is_number(self.b) or not 0.0 < self.b <= 100.0:
            raise SpecError(f"MPAD b is a percentage of pairs in (0, 100]; got {self.b!r}")
        if self.tail not in _TAILS:
            raise SpecError(f"MPAD tail must be 'lower' or 'upper'; got {self.tail!r}")
        if self.init not in _INITS:
            raise SpecError(f"MPAD init must be 'random' or 'pca'; got {self.init!r}")
        for name, low in (("n_train", 2), ("n_pairs", 1)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < low):
                raise SpecError(f"MPAD {name} must be null or an int >= {low}; got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise SpecError(f"MPAD seed must be an int >= 0; got {self.seed!r}")
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise SpecError(f"MPAD max_iter must be an int >= 1; got {self.max_iter!r}")

    def _fit(self, X: np.ndarray) -> None:
        n, d = X.shape
        self._check_params(d)
        if n < 3:
            # Two vectors make one pair, and every axis leans towards its direction:
            # mpad256 of 2 MiniLM-like vectors had condition number 3e6 and lost 6% of
            # them on decoding (from 3 vectors up: condition ~2, exact).
            raise InputError(
                f"MPAD learns its axes from pairs of training vectors and needs at least 3; got {n}"
            )
        started, started_cpu = time.perf_counter(), time.process_time()
        # Independent streams: what one draw consumes never shifts another, so the
        # first k axes of mpad{m} are exactly mpad{k} (greedy and nested).
        streams = np.random.SeedSequence(int(self.seed)).spawn(3)
        sample_rng, stage_rng, start_rng = (np.random.default_rng(s) for s in streams)
        # Products run in the input's precision (float32 from the codec: half the
        # memory traffic); sorting, tail selection and sums run in float64.
        work_dtype = np.float64 if X.dtype == np.float64 else np.float32
        mean, train = _centered_sample(X, self.n_train, sample_rng, work_dtype)
        if not np.isfinite(mean).all():  # name the first NaN/inf row of X
            for start in range(0, X.shape[0], 8192):
                block = np.asarray(X[start : start + 8192])
                check_finite(block, name="training vectors", row_offset=start)
            raise InputError("training vectors: their mean overflows; rescale them")
        rms = float(np.sqrt(np.einsum("ij,ij->", train, train, dtype=np.float64) / len(train)))
        if rms > 0:
            train /= np.asarray(rms, dtype=work_dtype)
        stages = self._stages(train, stage_rng)
        starts = self._starting_directions(train, start_rng)
        final = stages[-1][0]
        axes = np.zeros((self.n_components, d))
        info: dict[str, Any] = {"n_train": len(train)}
        for key in ("nit", "nfev", "tail_mean", "seconds_to_axis", "cpu_seconds_to_axis"):
            info[key] = []
        with _one_blas_thread():
            for k in range(self.n_components):
                checkpoint()
                axis, nit, nfev = _fit_axis(stages, axes[:k], starts[k], float(self.alpha))
                axes[k] = axis
                info["nit"].append(nit)
                info["nfev"].append(nfev)
                info["tail_mean"].append(float(final(axis)[0]) * rms)
                # cumulative, so a prefix of the axes has its own fit time (greedy: the
                # first k axes are exactly what mpad{k} would fit)
                info["seconds_to_axis"].append(time.perf_counter() - started)
                info["cpu_seconds_to_axis"].append(time.process_time() - started_cpu)
        components = flip_signs(axes).astype(np.float32)
        self.mean_ = mean.astype(np.float32)
        self.components_ = components
        self.inverse_components_ = np.linalg.pinv(components.T.astype(np.float64)).astype(
            np.float32
        )
        info["seconds"] = time.perf_counter() - started
        self.fit_info_ = info

    def _stages(
        self, train: np.ndarray, rng: np.random.Generator
    ) -> list[tuple[GapTailObjective, int]]:
        """(objective, L-BFGS iterations) to run in turn for every axis.

        With the exact objective on more than ``_COARSE_ROWS`` vectors, each axis is
        first optimized on a seeded subsample of ``_COARSE_ROWS`` of them (``max_iter``
        cheap steps), then refined on all of them (``max(5, max_iter // 10)`` steps),
        so the optimum found is one of the exact all-pairs objective at a fraction of
        the cost (measured on 20,000 MiniLM vectors: the same objective values as 150
        full steps, 10x less CPU).
        """
        b, tail, max_iter = float(self.b), self.tail, int(self.max_iter)
        if self.n_pairs is not None:
            pairs = _sample_pairs(len(train), int(self.n_pairs), rng)
            return [(GapTailObjective(train, b=b, tail=tail, pairs=pairs), max_iter)]
        full = GapTailObjective(train, b=b, tail=tail)
        if len(train) <= _COARSE_ROWS:
            return [(full, max_iter)]
        rows = np.sort(rng.choice(len(train), size=_COARSE_ROWS, replace=False))
        coarse = GapTailObjective(train[rows], b=b, tail=tail)
        return [(coarse, max_iter), (full, max(5, max_iter // 10))]

    def _starting_directions(self, train: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit starting vectors (n_components, d) float64, one per axis."""
        d = train.shape[1]
        if self.init == "pca":
            _, cov, _ = streamed_mean_cov(train)
            eigvals, eigvecs = np.linalg.eigh(cov)
            order = np.argsort(eigvals)[::-1][: self.n_components]
            return flip_signs(eigvecs[:, order].T)
        starts = rng.standard_normal((self.n_components, d))
        return starts / np.linalg.norm(starts, axis=1, keepdims=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread while fitting, when threadpoolctl is installed.

    The fit makes thousands of small BLAS calls (matrix-vector products, and L-BFGS-B's
    own). A threaded OpenBLAS spins and waits at every one of them; on 2 busy cores
    that made a 4-axis fit 2x slower, and scipy's L-BFGS-B alone 100x slower, than one
    thread (measured). The products are memory-bound, so one thread loses little.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the fit is only slower on busy machines
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _centered_sample(
    X: np.ndarray, n_train: int | None, rng: np.random.Generator, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of all of ``X`` (d,) float64 and a centered seeded row sample in ``dtype``."""
    n = X.shape[0]
    mean = _streamed_mean(X)
    sample: np.ndarray
    if n_train is not None and n_train < n:
        rows = np.sort(rng.choice(n, size=int(n_train), replace=False))
        sample = np.array(X[rows], dtype=dtype)
    else:
        sample = np.array(X, dtype=dtype)
    sample -= mean.astype(dtype)
    return mean, sample


def _streamed_mean(X: np.ndarray, block_rows: int = 8192) -> np.ndarray:
    """Column means (d,) float64 of ``X`` (n, d), summed block by block (X may be a memmap)."""
    total = np.zeros(X.shape[1])
    for start in range(0, X.shape[0], block_rows):
        total += np.asarray(X[start : start + block_rows]).sum(axis=0, dtype=np.float64)
    return total / X.shape[0]


def _sample_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` seeded random pairs ``(a, b)`` of distinct indices below ``n``."""
    first = rng.integers(0, n, size=n_pairs)
    second = rng.integers(0, n - 1, size=n_pairs)
    second += second >= first  # uniform over the other n - 1 points
    return first, second


def _fit_axis(
    stages: list[tuple[GapTailObjective, int]],
    previous: np.ndarray,
    start: np.ndarray,
    alpha: float,
) -> tuple[np.ndarray, int, int]:
    """Maximize Phi_k from ``start`` through the stages.

    Returns the unit axis (d,) float64 and the L-BFGS iterations and evaluations spent.
    """
    w, nit, nfev = start, 0, 0
    for objective, max_iter in stages:

        def negative_phi(x: np.ndarray, objective: GapTailObjective = objective) -> Any:
            value, grad = axis_objective(objective, previous, alpha, x)
            return -value, -grad

        result = minimize(
            negative_phi,
            w,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "maxfun": 3 * max_iter + 10},
        )
        norm = float(np.linalg.norm(result.x))
        if norm > 0:
            w = result.x / norm
        nit += int(result.nit)
        nfev += int(result.nfev)
    return w, nit, nfev


def axis_objective(
    objective: GapTailObjective, previous: np.ndarray, alpha: float, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Phi_k at an unnormalized ``w`` (d,) and its gradient with respect to ``w``.

    Parameters
    ----------
    objective : the tail-mean objective of the training vectors.
    previous : ndarray (k, d) float64, the frozen unit axes chosen so far.
    alpha : penalty weight.
    w : ndarray (d,) float64, nonzero.

    Returns
    -------
    value : float, ``tail_mean(v) - alpha * ||previous @ v||^2`` with ``v = w / ||w||``.
    grad : ndarray (d,) float64. Phi depends on ``w`` only through ``v``, so the
        gradient is the one in ``v`` with its radial part removed, divided by ``||w||``.
    """
    norm = float(np.linalg.norm(w))
    v = w / norm
    value, grad_v = objective(v)
    if len(previous):
        overlaps = previous @ v
        value -= alpha * float(overlaps @ overlaps)
        grad_v = grad_v - 2.0 * alpha * (overlaps @ previous)
    return value, (grad_v - v * float(v @ grad_v)) / norm


@dataclass(frozen=True)
class _BracketEnd:
    """A candidate tail threshold ``t``, the pairs with gap <= t, and their count."""

    t: float
    starts: np.ndarray  # (n,) int: pair (i, j) has gap <= t iff starts[j] <= i < j
    count: int


class GapTailObjective:
    """Mean of the b% tail of ``|p_i - p_j|`` for ``p = X @ v``, and its (sub)gradient.

    Parameters
    ----------
    X : ndarray (n, d) float32 or float64, centered training vectors (n >= 2).
    b : tail size in percent of the pairs, in (0, 100].
    tail : "lower" (smallest gaps) or "upper" (largest gaps).
    pairs : optional ``(a, b)`` int arrays (P,): use these pairs instead of all
        ``n (n - 1) / 2``.
    """

    def __init__(
        self,
        X: np.ndarray,
        *,
        b: float,
        tail: str,
        pairs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.X = X
        self.tail = tail
        self.pairs = pairs
        n = X.shape[0]
        self.total_pairs = len(pairs[0]) if pairs is not None else n * (n - 1) // 2
        self.k = int(min(self.total_pairs, max(1, round(b / 100.0 * self.total_pairs))))
        self._index = np.arange(n)
        self._cap = max(_ENUMERATION_CAP, 4 * n)
        probe = np.random.default_rng(0)  # only speeds up the search; never the result
        m = min(max(_PROBE_PAIRS, n), self.total_pairs)
        self._probe = (probe.integers(0, n, size=m), probe.integers(0, n, size=m))

    def __call__(self, v: np.ndarray) -> tuple[float, np.ndarray]:
        """Tail mean (float) and its gradient (d,) float64 at the unit direction ``v``."""
        p = (self.X @ v.astype(self.X.dtype)).astype(np.float64)
        if self.pairs is not None:
            total, weights = self._sampled_tail(p)
        else:
            order = np.argsort(p)
            total, sorted_weights = self._exact_tail(p[order])
            weights = np.empty_like(sorted_weights)
            weights[order] = sorted_weights
        grad = (weights.astype(self.X.dtype) @ self.X).astype(np.float64)
        return total / self.k, grad / self.k

    # -- all pairs, via the sorted projections -------------------------------------------
    def _exact_tail(self, s: np.ndarray) -> tuple[float, np.ndarray]:
        """Sum of the tail gaps and per-point weights, for sorted projections ``s``."""
        if self.tail == "lower":
            return self._lower_sum(s, self.k)
        n = len(s)
        all_weights = (2 * self._index - (n - 1)).astype(np.float64)
        rest, rest_weights = self._lower_sum(s, self.total_pairs - self.k)
        return float(all_weights @ s) - rest, all_weights - rest_weights

    def _lower_sum(self, s: np.ndarray, k: int) -> tuple[float, np.ndarray]:
        """Sum of the ``k`` smallest gaps of sorted ``s`` (n,), and its gradient weights."""
        n = len(s)
        if k <= 0:
            return 0.0, np.zeros(n)
        weights: np.ndarray
        if k >= self.total_pairs:
            weights = (2 * self._index - (n - 1)).astype(np.float64)
            return float(weights @ s), weights
        low, high = self._bracket(s, k)
        low_weights = self._pair_weights(low.starts)
        if high.count - low.count > self._cap:
            # The bracket is one float wide: all its pairs tie at the threshold, so
            # take the missing ones as an equal fraction of them (a convex combination
            # of subgradients is a subgradient).
            fraction = (k - low.count) / (high.count - low.count)
            weights = low_weights + fraction * (self._pair_weights(high.starts) - low_weights)
            return float(weights @ s), weights
        # List the pairs with low.t < gap <= high.t and select the threshold among them.
        lengths = low.starts - high.starts
        total = int(lengths.sum())
        larger = np.repeat(self._index, lengths)
        offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        smaller = np.repeat(high.starts, lengths) + offsets
        gaps = s[larger] - s[smaller]
        rank = k - low.count - 1
        threshold = np.partition(gaps, rank)[rank]
        inside = gaps < threshold
        tied = gaps == threshold
        inside_weight = np.where(inside, 1.0, 0.0)
        # Equal gaps at the threshold share the remaining slots (a valid subgradient).
        inside_weight[tied] = (rank + 1 - int(inside.sum())) / int(tied.sum())
        weights = (
            low_weights
            + np.bincount(larger, inside_weight, minlength=n)
            - np.bincount(smaller, inside_weight, minlength=n)
        )
        return float(weights @ s), weights

    def _ends(self, s: np.ndarray, t: float) -> _BracketEnd:
        """Pairs with gap <= t: for each j the first i of them, and their number."""
        starts = np.minimum(np.searchsorted(s, s - t, side="left"), self._index)
        return _BracketEnd(t, starts, int((self._index - starts).sum()))

    def _pair_weights(self, starts: np.ndarray) -> np.ndarray:
        """Weights (n,) float64 of the pair set {(i, j): starts[j] <= i < j}."""
        as_larger = self._index - starts
        # point i is the smaller end of the pairs j with starts[j] <= i < j
        as_smaller = np.cumsum(np.bincount(starts, minlength=len(starts)) - 1)
        return (as_larger - as_smaller).astype(np.float64)

    def _bracket(self, s: np.ndarray, k: int) -> tuple[_BracketEnd, _BracketEnd]:
        """Thresholds with fewer than ``k`` pairs at or below one, at least ``k`` at the
        other, and at most ``self._cap`` pairs in between (unless one float apart)."""
        # "No pairs" (not even equal values); t = 0 only seeds the interpolation.
        low = _BracketEnd(0.0, self._index, 0)
        high = _BracketEnd(float(s[-1] - s[0]), np.zeros_like(self._index), self.total_pairs)
        # Quantiles of a fixed random sample of pairs bracket the threshold cheaply.
        probe = np.abs(s[self._probe[0]] - s[self._probe[1]])
        q, m = k / self.total_pairs, len(probe)
        spread = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
        guesses = np.quantile(probe, [max(q - spread, 0.0), min(q + spread, 1.0)])
        targets = [float(g) for g in guesses]
        stalled = False
        while high.count - low.count > self._cap:
            if targets:
                t = targets.pop(0)
            else:
                # Interpolate towards a count a quarter cap inside k on the far side.
                if k - low.count > high.count - k:
                    target = k - self._cap // 4
                else:
                    target = k + self._cap // 4
                fraction = (target - low.count) / (high.count - low.count)
                t = low.t + (0.5 if stalled else fraction) * (high.t - low.t)
            if not low.t < t < high.t:
                t = 0.5 * (low.t + high.t)
                if not low.t < t < high.t:
                    break  # one float apart
            width = high.count - low.count
            end = self._ends(s, t)
            if end.count < k:
                low = end
            else:
                high = end
            stalled = not targets and high.count - low.count > width / 2
        return low, high

    # -- a fixed sample of pairs ----------------------------------------------------------
    def _sampled_tail(self, p: np.ndarray) -> tuple[float, np.ndarray]:
        assert self.pairs is not None
        first, second = self.pairs
        diffs = p[first] - p[second]
        gaps = np.abs(diffs)
        if self.k >= len(gaps):
            chosen = np.arange(len(gaps))
        elif self.tail == "lower":
            chosen = np.argpartition(gaps, self.k - 1)[: self.k]
        else:
            chosen = np.argpartition(gaps, len(gaps) - self.k)[len(gaps) - self.k :]
        signs = np.sign(diffs[chosen])
        n = len(p)
        weights = np.bincount(first[chosen], signs, minlength=n) - np.bincount(
            second[chosen], signs, minlength=n
        )
        return float(gaps[chosen].sum()), weights
