"""Transform coding under an exact byte budget: ``alloc{bytes}`` (e.g. ``pca,alloc96``).

After a rotation that decorrelates the input (``pca``), component variances differ by
orders of magnitude, and a fixed bit width per dimension wastes most of its bits on
components that carry almost nothing. This quantizer spends exactly ``8 * budget``
bits per vector where the variance is, weighted by what queries see of it (reverse
water-filling):

1. Rates. Each component gets a target rate ``r_i = clip(0.5 log2(v_i / theta), 0, 8)``
   bits, with the water level ``theta`` set so the rates sum to the budget. ``v_i`` is
   the component's variance times a weight ``energy_i ** weight``: the error that
   matters for search is the error of inner products with queries, and queries have
   most of their energy where the data has it (``weight=1`` assumes queries distributed
   like the data, ``weight=0`` plain MSE; the default 0.5 sits between the two). For
   inner-product (and cosine) search (``metric="ip"``, the default) a query's energy
   along a component is its variance plus its squared mean, the data's mean seen from
   the origin of the codec's input space: embeddings often sit in a narrow cone, and
   the components along the cone's axis vary little while every query weighs them
   heavily (synthetic 1536-d cone data, ``pca,alloc768``: recall@10 0.80 by variance
   alone, 0.86 with the mean; MiniLM: unchanged). ``metric="l2"`` leaves the mean out:
   L2 distances between vectors do not see it.
2. Scalar part. Components with ``r_i >= vq_below`` bits each get their own quantizer
   with an integer width (0..8 bits) chosen by greedy marginal gain on the *measured*
   distortion of that component at every width (uniform levels with an MSE-optimal
   clipping range, Lloyd-Max levels, or a small float format: option ``levels``).
3. Vector part. At low rates scalar codes waste bits (a scalar code cannot spend less
   than a whole bit on a component, and a grid of cells fills space worse than a
   codebook), so the components below ``vq_below`` bits (default 3), consecutive in
   variance order, are grouped until a group's rates add up to ``vq_bits`` (8: a
   256-entry codebook) and each group is coded by k-means: product quantization whose
   sub-vectors are sized by their variance (2-3 components where the rate is high,
   tens where it is low).
4. Norm code. ``norm_bits`` bits (default 4) store, per vector, the ratio of its
   (centred) norm to the norm of its reconstruction, fitted by Lloyd-Max on the
   training ratios. Decoding rescales the reconstruction by it: coarse codes shrink
   vectors towards the mean by an amount that varies from vector to vector, and that
   variation, not the shrinkage itself, is what reorders search results. Where the
   code would lower the training sample's own recall (tiny budgets), the fit leaves it
   out and plans again with its bits given to the components.

The unit codes and the norm code are bit-packed (``_bitpack``) so ``code_size`` is
exactly the budget: 8-bit fields first, then 4-bit ones, then the rest, each group in
unit order with the norm code last. Without a preceding rotation the same procedure
runs on the raw dimensions, sorted by variance (it then allocates by per-dimension
variance).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _jit
from .._blocks import Scratch, map_blocks
from .._cancel import checkpoint
from .._stage import expect_array
from .._validation import column_range
from ..evaluation import blocked_knn
from ..exceptions import ArtifactError, DimensionMismatchError, InputError, SpecError
from . import _alloc_kernels
from ._base import Quantizer
from ._bitpack import BitLayout
from ._kmeans import kmeans
from ._levels import LEVEL_KINDS, LevelIndex, SortedColumns, fit_levels

__all__ = ["AllocQuantizer", "greedy_bits", "water_fill"]

MAX_BITS = 8  # per scalar component and per codebook
_LEVEL_CHUNK = 64  # columns fitted together
_METRICS = ("ip", "l2")  # the searches a fit can weigh its errors for
_BATCH_UNITS = 16  # k-means units encoded by one batched matmul
_VQ_ROWS = 128  # rows per distance block of a batch
# k-means scores products and squares of values in float32: exact (no underflow, no
# overflow) for values from about 2**-60 to 2**60 in magnitude. Training vectors must
# have their largest value well inside that (in a unit-norm embedding it is ~0.1-1).
_SMALLEST_TOP, _LARGEST_TOP = 2.0**-48, 2.0**56
# Largest |mean| / spread of a dimension (see AllocQuantizer._check_offsets): float32
# scores then keep 2**-24 * 2**20 = 1/16 of the spread.
_MAX_OFFSET = 2**10


def water_fill(variances: np.ndarray, total_bits: float, max_bits: int = MAX_BITS) -> np.ndarray:
    """Reverse water-filling rates for independent Gaussian components.

    Parameters
    ----------
    variances : ndarray (d,) float, non-negative (weighted) variances.
    total_bits : rate budget; must not exceed ``max_bits * d``.

    Returns
    -------
    rates : ndarray (d,) float64, ``clip(0.5 log2(v / theta), 0, max_bits)`` summing to
        ``total_bits`` (up to bisection precision). More variance never gets fewer bits.
    """
    v = np.asarray(variances, dtype=np.float64)
    positive = v > 0
    if total_bits <= 0 or not positive.any():
        return np.zeros_like(v)
    log_v = np.where(positive, np.log2(np.where(positive, v, 1.0)), -np.inf)

    def rates(log_theta: float) -> np.ndarray:
        return np.clip(0.5 * (log_v - log_theta), 0.0, max_bits)

    lo = float(log_v[positive].min()) - 2.0 * max_bits - 2.0
    hi = float(log_v[positive].max())
    for _ in range(100):  # bisection on log(theta): the rate sum is monotone in it
        mid = 0.5 * (lo + hi)
        if rates(mid).sum() > total_bits:
            lo = mid
        else:
            hi = mid
    return rates(hi)


def greedy_bits(
    distortion: np.ndarray, weights: np.ndarray, total_bits: int, max_bits: int = MAX_BITS
) -> np.ndarray:
    """Integer bits per component by greedy marginal gain.

    Parameters
    ----------
    distortion : ndarray (c, max_bits + 1), MSE of component i quantized with b bits
        (column 0: its variance).
    weights : ndarray (c,), importance of each component's error.
    total_bits : bits to hand out; must not exceed ``max_bits * c``.

    Returns
    -------
    bits : ndarray (c,) int64 summing to ``total_bits``. Each step gives one bit to the
        component whose weighted distortion drops most (ties: lower index).
    """
    c = distortion.shape[0]
    if total_bits > max_bits * c:
        raise ValueError(f"cannot place {total_bits} bits on {c} components of <= {max_bits}")
    bits = np.zeros(c, dtype=np.int64)
    gain = weights[:, None] * (distortion[:, :-1] - distortion[:, 1:])  # (c, max_bits)
    heap = [(-float(gain[i, 0]), i) for i in range(c)]
    heapq.heapify(heap)
    for _ in range(int(total_bits)):
        _, i = heapq.heappop(heap)
        bits[i] += 1
        if bits[i] < max_bits:
            heapq.heappush(heap, (-float(gain[i, bits[i]]), i))
    return bits


@dataclass(frozen=True)
class _Plan:
    """What a fit allocates bits by: ``weighted`` (the variance times ``importance``, the
    weight of a component's error) in variance order; ``variance`` and ``mean``, float64,
    in input order."""

    weighted: np.ndarray
    importance: np.ndarray
    variance: np.ndarray
    mean: np.ndarray


class _SampleRecall:
    """The training sample's own nearest neighbours, to compare reconstructions of it:
    a fifth of the rows (at most 1,000) as queries against all the others, by inner
    product (``blocked_knn`` scores them in blocks: with 10,000 rows the scores alone
    would be 40 MB). ``usable`` is False for samples too small to say anything."""

    def __init__(self, X: np.ndarray) -> None:
        n = X.shape[0]
        self.m = min(1000, n // 5)
        self.usable = self.m >= 1 and n - self.m >= 10
        self.queries = X[: self.m]
        self.truth = blocked_knn(X[self.m :], self.queries, 10)[0] if self.usable else None

    def hits(self, reconstruction: np.ndarray) -> np.ndarray:
        """True top-10 neighbours found in the reconstruction's top 10, per query."""
        assert self.truth is not None
        found = blocked_knn(reconstruction[self.m :], self.queries, 10)[0]
        pairs = zip(self.truth, found, strict=True)
        return np.array([np.intersect1d(t, f).size for t, f in pairs], dtype=np.float64)


class _Batch:
    """k-means units of one size and codebook length, encoded by one batched product.

    Attributes
    ----------
    units : ndarray (G,) int64, unit indices.
    columns : ndarray (G * g,) int64, their input columns, unit by unit.
    centroids : ndarray (G, K, g) float32.
    deviation : ndarray (G, K) float32, |centroid - mean|^2 (for the norm code).
    """

    def __init__(
        self, units: np.ndarray, columns: np.ndarray, centroids: np.ndarray, mean: np.ndarray
    ) -> None:
        G, _, g = centroids.shape
        self.units = units
        self.columns = columns
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.rows = np.arange(G)[None, :]
        # Distances up to |x|^2 as one product: [x, 1] @ [[-2 c^T], [|c|^2]].
        squared = np.einsum("gkd,gkd->gk", self.centroids, self.centroids)
        self._augmented = np.ascontiguousarray(
            np.concatenate([-2.0 * self.centroids.transpose(0, 2, 1), squared[:, None, :]], 1)
        )
        centred = self.centroids - mean[columns].reshape(G, 1, g)
        self.deviation = np.einsum("gkd,gkd->gk", centred, centred)
        # Rounding error of a score, BLAS's or the exact one (both are sums of g + 1
        # products, the exact one fused): at most about (g + 1) 2**-24 (|x|^2 +
        # 2 |c|^2); twice the sum of both, again doubled for safety, per unit of
        # (|x|^2 + 2 max |c|^2).
        self._tolerance = np.float32(8 * (g + 2) * 2.0**-24)
        self._reach = (2.0 * squared.max(axis=1)).astype(np.float32)

    def encode(self, X: np.ndarray, scratch: Scratch) -> np.ndarray:
        """Nearest centroid of each unit: (n, G) int64 for vectors X (n, d)."""
        n, (G, K, g) = X.shape[0], self.centroids.shape
        labels = np.empty((G, n), dtype=np.int64)
        near_units: list[np.ndarray] = []
        near_rows: list[np.ndarray] = []
        pending = 0
        # Rows in small chunks: the (G, rows, K) distance block then stays in cache.
        for start in range(0, n, _VQ_ROWS):
            stop = min(start + _VQ_ROWS, n)
            rows = stop - start
            parts = scratch.get("vq_parts", (G, rows, g + 1), np.float32)
            parts[:, :, g] = 1.0
            chunk = X[start:stop, self.columns].reshape(rows, G, g)
            np.copyto(parts[:, :, :g], chunk.transpose(1, 0, 2))
            scores = scratch.get("vq_scores", (G, rows, K), np.float32)
            np.matmul(parts, self._augmented, out=scores)
            found = labels[:, start:stop]
            np.argmin(scores, axis=2, out=found)
            unit, row = self._near_ties(parts, scores, found)
            near_units.append(unit)
            near_rows.append(row + start)
            pending += unit.size
            # Near ties wait and are settled together (a call of fma32 costs tens of
            # microseconds, whatever its size), at most a chunk's worth of scores.
            if pending >= G * _VQ_ROWS or stop == n:
                self._settle(X, np.concatenate(near_units), np.concatenate(near_rows), labels)
                near_units, near_rows, pending = [], [], 0
        return labels.T

    def _near_ties(
        self, parts: np.ndarray, scores: np.ndarray, found: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(unit, row) indices where the BLAS argmin ``found`` (G, rows) may not be that
        of the exact scores (see ``_settle``)."""
        g = parts.shape[2] - 1
        head = parts[:, :, :g]
        norms = np.einsum("grj,grj->gr", head, head)
        norms += self._reach[:, None]
        norms *= self._tolerance
        lowest = np.take_along_axis(scores, found[:, :, None], axis=2)[:, :, 0]
        norms += lowest  # now the highest score that may still win
        np.put_along_axis(scores, found[:, :, None], np.inf, axis=2)
        # (not >: NaN scores, from overflow, also take the exact path)
        unit, row = np.nonzero(~(scores.min(axis=2) > norms))
        return unit, row

    def _settle(self, X: np.ndarray, unit: np.ndarray, row: np.ndarray, labels: np.ndarray) -> None:
        """Make ``labels[unit, row]`` the argmin of the exact scores of those units.

        BLAS sums each score in an order of its own. Where the runner-up is within the
        rounding error of both sums (rare), the exact scores of all centroids,
        ``|c_k|^2 + sum_j x_j (-2 c_jk)`` accumulated in j order by float32 fused
        multiply-adds (what the compiled kernel computes), decide; elsewhere the BLAS
        argmin is the exact one. So codes do not depend on the BLAS build or on whether
        the compiled kernels are on.
        """
        if unit.size == 0:
            return
        g = self.centroids.shape[2]
        head = X[row[:, None], self.columns.reshape(-1, g)[unit]]  # (m, g) float32
        exact = self._augmented[unit, g, :].copy()
        for j in range(g):
            exact = _jit.fma32(head[:, j, None], self._augmented[unit, j, :], exact)
        labels[unit, row] = np.argmin(exact, axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, G * g) float32 reconstruction of the units from their codes (n, G)."""
        return self.centroids[self.rows, codes].reshape(codes.shape[0], -1)


def _column_variance(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``X.var(axis=0)`` in float64 about ``mean``, by row blocks of ~1 MiB (``np.var``
    subtracts the mean from a float64 copy of all of ``X``: 1.2 GB for 50,000 x 3,072)."""
    total = np.zeros(X.shape[1], dtype=np.float64)
    rows = max(1, (1 << 17) // max(1, X.shape[1]))
    for start in range(0, X.shape[0], rows):
        centred = X[start : start + rows] - mean  # float64, as mean is
        total += np.einsum("ij,ij->j", centred, centred)
    return total / X.shape[0]


class AllocQuantizer(Quantizer):
    """Bit allocation + per-component scalar levels + variance-sized k-means groups.

    Parameters
    ----------
    budget : int
        Bytes per encoded vector (``code_size``), from the spec (``alloc96`` -> 96).
    levels : ``"lloyd"`` (default), ``"uniform"`` or ``"float"``; the scalar levels.
    weight : float in [0, 1]
        Exponent of the query-energy weighting of each component's error (see the
        module docstring); default 0.5.
    metric : ``"ip"`` (default; also for cosine) or ``"l2"``, the search the codes
        are for: whether the data's mean counts in the queries' energy (see the module
        docstring).
    vq_below : float
        Components whose target rate is below this many bits (default 3) go to k-means
        groups; ``0`` makes every coded component scalar, ``9`` everything
        vector-quantized.
    vq_bits : int in [1, 8], bits per k-means codebook (``2**vq_bits`` centroids).
    norm_bits : int in [0, 8], bits of the per-vector norm-ratio code (0 disables it).
    kmeans_iters : Lloyd iterations per codebook.
    train_sample : at most this many training rows (a seeded sample) fit the levels,
        codebooks and norm code.
    seed : seed of the sampling and of k-means++.

    Attributes
    ----------
    order_ : ndarray (d,) int64, input dimensions by decreasing weighted variance.
    mean_, variance_ : ndarray (d,) float32, per input dimension.
    units_ : ndarray (u, 3) int64, one row per coded unit: first position in
        ``order_``, number of components, bits. Size 1 is a scalar quantizer.
    codebooks_ : ndarray float32, the ``2**bits x size`` codebooks (levels for
        scalar units) of all units, flattened and concatenated in unit order.
    norm_levels_ : ndarray (2**norm_bits,) float32, decoded norm ratios; a single 1.0
        when the fit left the norm code out (see :attr:`norm_bits_`).
    """

    bits = 0  # not a fixed-rate quantizer: code_size is the budget
    _state = ("order_", "mean_", "variance_", "units_", "codebooks_", "norm_levels_")
    order_: np.ndarray | None = None
    mean_: np.ndarray | None = None
    variance_: np.ndarray | None = None
    units_: np.ndarray | None = None
    codebooks_: np.ndarray | None = None
    norm_levels_: np.ndarray | None = None
    _origin: np.ndarray | None = None  # only during fit

    def __init__(
        self,
        budget: int,
        *,
        levels: str = "lloyd",
        weight: float = 0.5,
        metric: str = "ip",
        vq_below: float = 3.0,
        vq_bits: int = 8,
        norm_bits: int = 4,
        kmeans_iters: int = 16,
        train_sample: int = 32768,
        seed: int = 0,
    ) -> None:
        self.budget = budget
        self.levels = levels
        self.weight = weight
        self.metric = metric
        self.vq_below = vq_below
        self.vq_bits = vq_bits
        self.norm_bits = norm_bits
        self.kmeans_iters = kmeans_iters
        self.train_sample = train_sample
        self.seed = seed

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector: exactly the budget."""
        self._check_fitted()
        return int(self.budget)

    @property
    def norm_bits_(self) -> int:
        """Bits the fitted code spends on the norm code: ``norm_bits``, or 0 when the fit
        found that it lowers recall and gave its bits to the components."""
        self._check_fitted()
        assert self.norm_levels_ is not None
        return int(self.norm_levels_.size).bit_length() - 1

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X: Any, *, origin: Any = None) -> AllocQuantizer:
        """Fit on training vectors ``X`` (n, d); ``origin`` (d,) is where the codec's input
        space has its origin in ``X``'s coordinates (``reducer.transform(0)``), for
        ``metric="ip"``: see :meth:`Quantizer.fit`."""
        self._origin = None if origin is None else np.asarray(origin, dtype=np.float64)
        try:
            super().fit(X)
        finally:
            self._origin = None
        return self

    def _check_params(self, d: int) -> None:
        numbers = {"budget": int, "weight": float, "vq_below": float, "vq_bits": int}
        numbers.update(norm_bits=int, kmeans_iters=int, train_sample=int, seed=int)
        for name, kind in numbers.items():  # standalone use: make_codec checks these too
            value = getattr(self, name)
            allowed = (int, float) if kind is float else (int,)
            if isinstance(value, bool) or not isinstance(value, allowed):
                what = "a number" if kind is float else "an integer"
                raise SpecError(f"{name} must be {what}; got {value!r}")
        if self.levels not in LEVEL_KINDS:
            raise SpecError(f"levels must be one of {LEVEL_KINDS}; got {self.levels!r}")
        if self.metric not in _METRICS:
            raise SpecError(f"metric must be one of {_METRICS}; got {self.metric!r}")
        if self._origin is not None and (
            self._origin.shape != (d,) or not np.isfinite(self._origin).all()
        ):
            raise InputError(
                f"origin must be {d} finite values (the input space's origin after the "
                f"reducer); got shape {self._origin.shape}"
            )
        if not 0.0 <= float(self.weight) <= 1.0:
            raise SpecError(f"weight must be in [0, 1]; got {self.weight!r}")
        if not 1 <= int(self.vq_bits) <= MAX_BITS:
            raise SpecError(f"vq_bits must be in [1, {MAX_BITS}]; got {self.vq_bits!r}")
        if not 0 <= int(self.norm_bits) <= MAX_BITS:
            raise SpecError(f"norm_bits must be in [0, {MAX_BITS}]; got {self.norm_bits!r}")
        if int(self.kmeans_iters) < 1 or int(self.train_sample) < 2:
            raise SpecError("kmeans_iters must be >= 1 and train_sample >= 2")
        component_bits = 8 * int(self.budget) - int(self.norm_bits)
        if component_bits < 1:
            raise SpecError(
                f"alloc{self.budget} has {8 * int(self.budget)} bits, not enough for "
                f"norm_bits={self.norm_bits} plus any component; use a larger budget"
            )
        if component_bits > MAX_BITS * d:
            most = (MAX_BITS * d + int(self.norm_bits)) // 8
            raise DimensionMismatchError(
                f"alloc{self.budget} would spend more than {MAX_BITS} bits on each of the "
                f"{d} dims it receives; use at most alloc{most} (or int8/fp16 for more)"
            )

    def _fit(self, X: np.ndarray) -> None:
        n, d = X.shape
        self._check_params(d)
        lo, hi = column_range(X)
        top = float(np.maximum(np.abs(lo), np.abs(hi)).max(initial=0.0))
        if top and not _SMALLEST_TOP <= top <= _LARGEST_TOP:
            raise InputError(
                f"alloc{self.budget} computes squared distances in float32, exact for "
                f"values from 2**-48 to 2**56 in magnitude; the training vectors' largest "
                f"is {top:.3g}: rescale them (l2norm, or a constant factor)"
            )
        rng = np.random.default_rng([int(self.seed), 1])
        sample = X
        if n > int(self.train_sample):
            sample = X[np.sort(rng.choice(n, int(self.train_sample), replace=False))]
        mean = X.mean(axis=0, dtype=np.float64)
        variance = _column_variance(X, mean)
        importance = np.power(self._query_energy(mean, variance), float(self.weight))
        weighted = variance * importance
        order = np.argsort(-weighted, kind="stable")
        self.order_ = order.astype(np.int64)
        self.mean_ = mean.astype(np.float32)
        self.variance_ = variance.astype(np.float32)

        def reordered() -> np.ndarray:
            """The sample in variance order, for _fit_units. ``np.take`` writes it C-ordered
            at once; ``sample[:, order]`` came out Fortran-ordered and was copied again
            (2x the sample at once, and 2.1 s instead of 0.06 s for 32,768 x 1,536)."""
            return np.take(sample, order, axis=1).astype(np.float32, copy=False)

        norm_bits = int(self.norm_bits)
        bits = 8 * int(self.budget) - norm_bits
        plan = _Plan(weighted[order], importance[order], variance, mean)
        self._fit_units(reordered(), plan, bits)
        self.norm_levels_ = np.ones(1 << norm_bits, dtype=np.float32)
        self._after_load()
        if not norm_bits:
            return
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        self._fit_norm_code(sample, reordered, plan)
        self._after_load()

    def _query_energy(self, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """Per input dimension, the second moment of queries distributed like the data
        (``metric="ip"``: about the input space's origin) or their variance (``"l2"``)."""
        if self.metric == "l2":
            return variance
        offset = mean if self._origin is None else mean - self._origin
        return variance + offset * offset

    def _fit_norm_code(
        self, sample: np.ndarray, reordered: Callable[[], np.ndarray], plan: _Plan
    ) -> None:
        """Fit the norm code's levels, or leave the code out and give its bits to the
        components (``_fit_units`` again), by recall@10 on the training sample itself
        (see :class:`_SampleRecall`).

        The code is meant for search: it raises the squared error a little where the
        reconstruction is rich, yet lifts recall (MiniLM, ``pca,alloc48``: 0.752 against
        0.722). Where the reconstruction spans only a few components (tiny budgets), the
        ratios reach hundreds and rescaling wrecks both. So the code is left out if its
        recall is lower than the plain reconstruction's by more than twice the paired
        standard error; and where its bits are 1/32 of the budget or more (up to
        ``alloc16`` with 4 bits), also if the components do better with those bits than
        the code does (alloc1 on 200 distinct 8-d vectors: recall 0.08 with the code, 1.0
        with its 4 bits as 4 more bits of codebook). Larger budgets skip that second fit:
        there the code's few bits change the components little.
        """
        assert self.mean_ is not None
        norm_bits = int(self.norm_bits)
        codes = self._encode_units(sample, Scratch())
        ratios = self._norm_ratios(sample, codes)
        levels = fit_levels(SortedColumns(ratios[:, None]), norm_bits, "lloyd")[0]
        levels = levels.astype(np.float32)
        judge = _SampleRecall(sample)
        if not judge.usable:
            self.norm_levels_ = levels
            return
        plain = self._decode_units(codes)
        thresholds = 0.5 * (levels[1:] + levels[:-1])
        scale = levels[np.searchsorted(thresholds, ratios)][:, None]
        with_plain = judge.hits(plain)
        with np.errstate(over="ignore", invalid="ignore"):  # in place: one sample-sized array
            scaled = np.subtract(plain, self.mean_, out=plain)
            scaled *= scale
            scaled += self.mean_
        with_code = judge.hits(scaled)
        del plain, scaled  # (one array) before a refit makes the reordered sample again
        gaps = with_code - with_plain
        helps = bool(gaps.mean() >= -2.0 * gaps.std() / np.sqrt(gaps.size))
        if helps and 32 * norm_bits < 8 * int(self.budget):
            self.norm_levels_ = levels
            return
        kept = (self.units_, self.codebooks_)
        self._fit_units(reordered(), plan, 8 * int(self.budget))
        self.norm_levels_ = np.ones(1, dtype=np.float32)
        if helps:
            self._after_load()
            without = judge.hits(self._decode_units(self._encode_units(sample, Scratch())))
            if without.mean() < with_code.mean():
                self.units_, self.codebooks_ = kept
                self.norm_levels_ = levels

    def _fit_units(self, Z: np.ndarray, plan: _Plan, component_bits: int) -> None:
        """Plan the units for ``component_bits`` bits and fit their levels and codebooks
        (``units_``, ``codebooks_``) on ``Z``, the sample in variance order."""
        assert self.order_ is not None
        order = self.order_
        units, tables = self._plan(Z, plan.weighted, plan.importance, component_bits)
        dims = [order[f : f + g] for f, g, _ in units if g > 1]
        self._check_offsets(plan.mean, plan.variance, dims)
        codebooks: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(units)
        groups = []
        for index, (first, size, bits) in enumerate(units):
            checkpoint()
            if size > 1:
                groups.append(index)
                continue
            if (first, bits) not in tables:  # a one-component k-means group
                column = SortedColumns(Z[:, first : first + 1])
                tables[(first, bits)] = fit_levels(column, bits, "lloyd")[0]
            codebooks[index] = tables[(first, bits)].astype(np.float32).ravel()

        def fit_groups(start: int, stop: int, _scratch: Scratch) -> None:
            for index in groups[start:stop]:
                first, size, bits = units[index]
                centroids = kmeans(
                    Z[:, first : first + size],
                    1 << bits,
                    iters=int(self.kmeans_iters),
                    seed=[int(self.seed), 2, index],
                )
                codebooks[index] = centroids.ravel()

        # The groups' k-means on every core (1.5x on two): each is seeded by its own
        # index, so what a codebook is does not depend on which thread fits it.
        map_blocks(len(groups), 1, fit_groups, uses_blas=True)
        self.units_ = np.asarray(units, dtype=np.int64).reshape(-1, 3)
        self.codebooks_ = np.concatenate(codebooks) if codebooks else np.zeros(0, dtype=np.float32)

    def _check_offsets(
        self, mean: np.ndarray, variance: np.ndarray, groups: list[np.ndarray]
    ) -> None:
        """Refuse a k-means group whose values sit far from 0 for their spread: its
        scores ``|c|^2 - 2 x.c`` are float32 sums about ``|x|^2``, so they keep only
        ``2**-24 * |mean|^2 / variance`` of the spread. At 1,000x (mean 10, spread 0.01)
        codes were 5% worse than centred; at 3,000x only 5% of rows got their nearest
        centroid. Over 1,024x is refused. (Scalar components compare values with
        thresholds, exact in float32, and components without bits decode to their mean.)
        """
        for dims in groups:
            ratio = float(np.sum(mean[dims] ** 2) / max(float(np.sum(variance[dims])), 1e-300))
            if ratio > float(_MAX_OFFSET) ** 2:
                spread = np.sqrt(variance[dims])
                j = int(dims[np.argmax(np.abs(mean[dims]) / np.maximum(spread, 1e-300))])
                raise InputError(
                    f"alloc{self.budget} codes groups of dimensions in float32 about their "
                    f"values, and dimension {j} has mean {mean[j]:.4g} but spread "
                    f"{np.sqrt(variance[j]):.3g} (its group: over {_MAX_OFFSET}x): its codes "
                    "would be near-random; centre the vectors first (pca,alloc or rot,alloc "
                    "do), or subtract the mean"
                )

    def _plan(
        self, Z: np.ndarray, weighted: np.ndarray, weights: np.ndarray, component_bits: int
    ) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int], np.ndarray]]:
        """Units (first, size, bits) in variance order, and the levels of scalar units."""
        d = Z.shape[1]
        vq_bits = int(self.vq_bits)
        rates = water_fill(weighted, component_bits)
        n_scalar = int(np.count_nonzero(rates >= float(self.vq_below)))
        coded = int(np.count_nonzero(rates > 1e-9))
        groups: list[list[int]] = []  # [first, size, bits]
        first, total = n_scalar, 0.0
        for position in range(n_scalar, coded):
            rate = rates[position]
            # Close the group before this component if adding it would overshoot the
            # codebook's bits by more than stopping now falls short of them.
            if position > first and total + rate - vq_bits > vq_bits - total:
                groups.append([first, position - first, vq_bits])
                first, total = position, 0.0
            total += rate
            if total >= vq_bits - 1e-9:
                groups.append([first, position + 1 - first, vq_bits])
                first, total = position + 1, 0.0
        if first < coded:  # a last, partial group
            bits = int(round(total))
            if bits >= 1:
                groups.append([first, coded - first, min(bits, vq_bits)])
            elif groups:
                groups[-1][1] = coded - groups[-1][0]
        left = component_bits - sum(g[2] for g in groups)
        while left < 0:  # rounding overspent: drop the weakest group
            left += groups.pop()[2]
        while left > MAX_BITS * n_scalar:  # more bits than scalars can hold
            if groups:
                group = groups.pop(0)
                left += group[2]
                n_scalar = group[0] + group[1]
            else:
                n_scalar = d
        tables: dict[tuple[int, int], np.ndarray] = {}
        units: list[tuple[int, int, int]] = []
        if n_scalar:
            distortion = np.empty((n_scalar, MAX_BITS + 1))
            # Columns in chunks: the sorted copies and prefix sums stay ~40 MB.
            for start in range(0, n_scalar, _LEVEL_CHUNK):
                stop = min(start + _LEVEL_CHUNK, n_scalar)
                sorted_columns = SortedColumns(Z[:, start:stop])
                for bits in range(MAX_BITS + 1):
                    levels = fit_levels(sorted_columns, bits, self.levels)
                    distortion[start:stop, bits] = sorted_columns.mse(levels)
                    for position in range(start, stop):
                        tables[(position, bits)] = levels[position - start]
            # Measured distortions may wiggle; never let an extra bit look harmful.
            distortion = np.minimum.accumulate(distortion, axis=1)
            scalar_bits = greedy_bits(distortion, weights[:n_scalar], left)
            # Near-equal variances can swap places in measured distortion; keep the
            # invariant that more (weighted) variance never gets fewer bits.
            scalar_bits = np.sort(scalar_bits)[::-1]
            units += [(p, 1, int(b)) for p, b in enumerate(scalar_bits) if b > 0]
        units += [(g[0], g[1], g[2]) for g in groups]
        return units, tables

    # -- encoding -----------------------------------------------------------------------
    def _check_state(self) -> None:
        d = self.d_
        assert d is not None and self.order_ is not None and self.units_ is not None
        expect_array(self.order_, "order_", (d,), np.int64)
        if not np.array_equal(np.sort(self.order_), np.arange(d)):
            raise ArtifactError(f"state array 'order_' is not a permutation of 0..{d - 1}")
        expect_array(self.mean_, "mean_", (d,))  # type: ignore[arg-type]
        expect_array(self.variance_, "variance_", (d,))  # type: ignore[arg-type]
        units = self.units_
        expect_array(units, "units_", (units.shape[0], 3), np.int64)
        first, size, bits = units.T
        if not (
            ((first >= 0) & (size >= 1) & (first + size <= d)).all()
            and ((bits >= 1) & (bits <= MAX_BITS)).all()
        ):
            raise ArtifactError(
                f"state array 'units_' has a unit outside the {d} components or with bits "
                f"outside 1..{MAX_BITS}"
            )
        expect_array(self.codebooks_, "codebooks_", (int((size << bits).sum()),))  # type: ignore[arg-type]
        if not 0 <= int(self.norm_bits) <= MAX_BITS:
            raise ArtifactError(f"norm_bits must be in 0..{MAX_BITS}; got {self.norm_bits!r}")
        assert self.norm_levels_ is not None
        # 2**norm_bits levels, or a single 1.0 where the fit left the code out
        levels = 1 if self.norm_levels_.size == 1 else 1 << int(self.norm_bits)
        expect_array(self.norm_levels_, "norm_levels_", (levels,))
        # The kernels square these in float32: values beyond what a fit can produce (the
        # training range is capped at 2**56) would overflow into NaN scores, and a NaN
        # score picks no valid centroid.
        for name in ("mean_", "codebooks_", "norm_levels_"):
            if np.abs(getattr(self, name)).max(initial=0.0) > _LARGEST_TOP:
                raise ArtifactError(f"state array {name!r} holds values beyond 2**56")

    def _after_load(self) -> None:
        assert self.units_ is not None and self.order_ is not None and self.mean_ is not None
        units = self.units_
        # Units are planned in variance order; encoding and decoding address the input
        # columns directly (order_ maps one to the other), so no block is permuted.
        order = self.order_
        self._norm_field = self.norm_bits_  # read per block by encode and decode
        widths = np.append(units[:, 2], self._norm_field)
        # Field order in the code: 8-bit fields first, then 4-bit ones, then the rest,
        # each in unit order (the norm code last among its width): byte and nibble
        # runs pack without the per-bit path.
        rank = np.where(widths == 8, 0, np.where(widths == 4, 1, 2))
        self._field_order = np.argsort(rank, kind="stable")
        self._layout = BitLayout(widths[self._field_order])
        if self._layout.n_bytes != int(self.budget) or self._layout.n_bits != 8 * int(self.budget):
            raise SpecError(
                f"allocation uses {self._layout.n_bits} bits, budget is {8 * int(self.budget)}"
            )
        sizes = units[:, 1] * (1 << units[:, 2])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        assert self.codebooks_ is not None and self.codebooks_.size == offsets[-1]
        scalar = np.flatnonzero(units[:, 1] == 1)
        self._scalar_units = scalar
        self._scalar_columns = order[units[scalar, 0]]
        self._scalar_bits = units[scalar, 2]
        # Scalar levels padded to 256 per unit: decode = one gather.
        table = np.zeros((scalar.size, 1 << MAX_BITS), dtype=np.float32)
        thresholds = np.full((scalar.size, (1 << MAX_BITS) - 1), np.inf, dtype=np.float32)
        for row, unit in enumerate(scalar):
            n_levels = 1 << int(units[unit, 2])
            values = self.codebooks_[offsets[unit] : offsets[unit] + n_levels]
            table[row, :n_levels] = values
            thresholds[row, : n_levels - 1] = 0.5 * (values[1:] + values[:-1])
        self._scalar_table = table
        self._scalar_thresholds = thresholds
        self._table_base = (np.arange(scalar.size) << MAX_BITS).astype(np.int64)
        self._uniform: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if self.levels == "uniform" and scalar.size:
            # Equally spaced levels: the nearest one is a rounding, no search needed.
            top = (1 << self._scalar_bits) - 1
            low = table[:, 0].astype(np.float64)
            high = table[np.arange(scalar.size), top].astype(np.float64)
            step = np.maximum((high - low) / np.maximum(top, 1), 1e-30)
            self._uniform = (
                low.astype(np.float32),
                (1.0 / step).astype(np.float32),
                top.astype(np.float32),
            )
        else:
            self._level_index = LevelIndex(thresholds, self._scalar_bits)
        vector = np.flatnonzero(units[:, 1] > 1)
        self._batches = []
        # k-means units of equal shape are encoded together: one batched product each.
        for size, n_bits in sorted({(int(units[u, 1]), int(units[u, 2])) for u in vector}):
            members = [u for u in vector if (units[u, 1], units[u, 2]) == (size, n_bits)]
            for start in range(0, len(members), _BATCH_UNITS):
                chosen = np.asarray(members[start : start + _BATCH_UNITS], dtype=np.int64)
                books = [self.codebooks_[offsets[u] : offsets[u + 1]] for u in chosen]
                centroids = np.stack(books).reshape(len(chosen), -1, size)
                columns = order[(units[chosen, 0][:, None] + np.arange(size)).ravel()]
                self._batches.append(_Batch(chosen, columns, centroids, self.mean_))
        assert self.norm_levels_ is not None
        self._norm_thresholds = 0.5 * (self.norm_levels_[1:] + self.norm_levels_[:-1])
        # Squared distance of every level from the mean, for the norm code.
        self._scalar_sq = (table - self.mean_[self._scalar_columns, None]) ** 2
        self._kernel_arrays()

    def _kernel_arrays(self) -> None:
        """Flat arrays of the compiled kernels (``_alloc_kernels``), in numpy-path order."""
        assert self.units_ is not None and self.mean_ is not None
        assert self.norm_levels_ is not None
        f32, i64 = np.float32, np.int64
        if self._uniform is not None:
            low, inv_step, top = self._uniform
            index = None
        else:
            low = inv_step = top = np.zeros(0, f32)
            index = self._level_index
        level_arrays = (
            (
                index._start,
                index._inv_width,
                index._top_cell,
                index._offset,
                index._table,
                index._thresholds.ravel(),
                index._row,
                int(index._steps),
            )
            if index is not None
            else (
                np.zeros(0, f32),
                np.zeros(0, f32),
                np.zeros(0, f32),
                np.zeros(0, np.int32),
                np.zeros(0, np.int16),
                np.zeros(0, f32),
                np.zeros(0, np.int32),
                0,
            )
        )
        fields, sizes, col_start, cols, book, ks, augmented = [], [], [], [], [], [], []
        deviation, dev, centroids, centroid, batch_start = [], [], [], [], [0]
        n_cols = n_book = n_dev = n_centroid = 0
        for batch in self._batches:
            G, K, g = batch.centroids.shape
            for member in range(G):
                fields.append(int(batch.units[member]))
                sizes.append(g)
                ks.append(K)
                col_start.append(n_cols)
                cols.append(batch.columns[member * g : (member + 1) * g])
                n_cols += g
                book.append(n_book)
                augmented.append(batch._augmented[member].ravel())
                n_book += (g + 1) * K
                dev.append(n_dev)
                deviation.append(batch.deviation[member])
                n_dev += K
                centroid.append(n_centroid)
                centroids.append(batch.centroids[member].ravel())
                n_centroid += K * g
            batch_start.append(len(fields))

        def flat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0), dtype)

        vector = (
            np.asarray(fields, i64),
            np.asarray(sizes, i64),
            np.asarray(col_start, i64),
            flat(cols, i64),
            np.asarray(book, i64),
            np.asarray(ks, i64),
        )
        pack = (self._field_order.astype(i64), np.asarray(self._layout.widths, i64))
        n_fields = int(self.units_.shape[0]) + 1
        scalar_columns = self._scalar_columns.astype(i64)
        scalar_fields = self._scalar_units.astype(i64)
        self._encode_args = (
            n_fields,
            scalar_columns,
            scalar_fields,
            self._uniform is not None,
            *level_arrays,
            np.ascontiguousarray(low, f32),
            np.ascontiguousarray(inv_step, f32),
            np.ascontiguousarray(top, f32),
            *vector,
            flat(augmented, f32),
            self._overflow_free(flat(augmented, f32), max(sizes, default=0)),
            flat(deviation, f32),
            np.asarray(dev, i64),
            np.asarray(batch_start, i64),
            self._norm_field,
            np.ascontiguousarray(self.mean_, f32),
            np.ascontiguousarray(self._scalar_sq, f32),
            np.ascontiguousarray(self._norm_thresholds, f32),
            *pack,
        )
        self._decode_args = (
            n_fields,
            scalar_columns,
            scalar_fields,
            np.ascontiguousarray(self._scalar_table, f32),
            *vector[:4],
            flat(centroids, f32),
            np.asarray(centroid, i64),
            self._norm_field,
            np.ascontiguousarray(self.mean_, f32),
            np.ascontiguousarray(self.norm_levels_, f32),
            *pack,
        )

    @staticmethod
    def _overflow_free(augmented: np.ndarray, group: int) -> np.float32:
        """Largest |x| for which no k-means score can overflow (then none is NaN)."""
        with np.errstate(over="ignore", invalid="ignore"):
            largest = float(np.abs(augmented).max(initial=0.0))
        if not np.isfinite(largest) or largest > 1e30:
            return np.float32(0.0)  # always the careful path
        return np.float32(min(1e36 / ((group + 1) * max(largest, 1.0)), 1e36))

    def _jit_encode(self, X: np.ndarray, out: np.ndarray) -> bool | None:
        if not _jit.ENABLED:
            return None
        return bool(_alloc_kernels.encode_alloc(X, out, *self._encode_args))

    def _jit_decode(self, codes: np.ndarray, out: np.ndarray, stream: bool) -> bool:
        if not _jit.ENABLED:
            return False
        _alloc_kernels.decode_alloc(codes, out, *self._decode_args)
        return True

    def _encode_units(self, X: np.ndarray, scratch: Scratch) -> np.ndarray:
        """Unit codes (n, u + 1) uint16 of vectors X (n, d); the last column is left 0."""
        assert self.units_ is not None
        codes = np.zeros((X.shape[0], self.units_.shape[0] + 1), dtype=np.uint16)
        if self._scalar_units.size:
            values = X[:, self._scalar_columns]
            if self._uniform is not None:
                low, inv_step, top = self._uniform
                values = (values - low) * inv_step
                np.rint(values, out=values)
                np.clip(values, 0.0, top, out=values)
                codes[:, self._scalar_units] = values.astype(np.uint16)
            else:
                codes[:, self._scalar_units] = self._level_index.codes(values)
        for batch in self._batches:
            codes[:, batch.units] = batch.encode(X, scratch)
        return codes

    def _decode_units(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruction (n, d) float32 from unit codes, before the norm correction."""
        assert self.mean_ is not None
        out = np.empty((codes.shape[0], self.mean_.shape[0]), dtype=np.float32)
        out[:] = self.mean_  # components without bits decode to their mean
        if self._scalar_units.size:
            flat = codes[:, self._scalar_units].astype(np.int64) + self._table_base
            out[:, self._scalar_columns] = self._scalar_table.ravel()[flat]
        for batch in self._batches:
            out[:, batch.columns] = batch.decode(codes[:, batch.units])
        return out

    def _norm_ratios(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Per row, |x - mean| / |reconstruction - mean| (1 if the latter is 0)."""
        centered = X - self.mean_
        np.multiply(centered, centered, out=centered)
        true = np.ascontiguousarray(centered).sum(axis=1)  # pairwise, as the kernel
        coded = self._coded_sq_norms(codes)
        safe = coded > 0
        return np.where(safe, np.sqrt(true / np.where(safe, coded, 1.0)), 1.0)

    def _coded_sq_norms(self, codes: np.ndarray) -> np.ndarray:
        """|reconstruction - mean|^2 per row, from tables (no full decode).

        Each sum runs over a C-contiguous row (numpy then sums pairwise along it, in the
        order ``_alloc_kernels.pairwise_sum`` repeats; over a column-major gather it
        would add whole columns one after another instead).
        """
        total = np.zeros(codes.shape[0], dtype=np.float32)
        if self._scalar_units.size:
            flat = codes[:, self._scalar_units].astype(np.int64) + self._table_base
            total += np.ascontiguousarray(self._scalar_sq.ravel()[flat]).sum(axis=1)
        for batch in self._batches:
            parts = batch.deviation[batch.rows, codes[:, batch.units]]
            total += np.ascontiguousarray(parts).sum(axis=1)
        return total

    def _encode_into(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool
    ) -> None:
        if self._jit_encode(X, out) is not None:
            return
        # Finite values near float32's limits may overflow a score or a norm: inf is
        # clipped to the last level, NaN scores settle as in the compiled kernel.
        with np.errstate(over="ignore", invalid="ignore"):
            codes = self._encode_units(X, scratch)
            if self._norm_field:
                ratios = self._norm_ratios(X, codes)
                codes[:, -1] = np.searchsorted(self._norm_thresholds, ratios)
        out[...] = self._layout.pack(codes[:, self._field_order])

    def _decode_into(
        self, codes: np.ndarray, out: np.ndarray, scratch: Scratch, *, stream: bool = False
    ) -> None:
        if not self._jit_decode(codes, out, stream):
            out[...] = self._decode_block(codes)

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        fields = np.empty((codes.shape[0], self._field_order.size), dtype=np.uint16)
        fields[:, self._field_order] = self._layout.unpack(codes)
        out = self._decode_units(fields)
        if self._norm_field:
            assert self.norm_levels_ is not None
            out -= self.mean_
            out *= self.norm_levels_[fields[:, -1]][:, None]
            out += self.mean_
        return out

    # -- inspection ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Summary of the allocation: scalar bit histogram and k-means group sizes."""
        self._check_fitted()
        assert self.units_ is not None and self.order_ is not None
        scalar = self.units_[self.units_[:, 1] == 1]
        groups = self.units_[self.units_[:, 1] > 1]
        return {
            "budget_bits": 8 * int(self.budget),
            "norm_bits": self.norm_bits_,
            "scalar_components": int(scalar.shape[0]),
            "scalar_bits_histogram": np.bincount(scalar[:, 2], minlength=MAX_BITS + 1).tolist(),
            "vq_groups": int(groups.shape[0]),
            "vq_group_sizes": groups[:, 1].tolist(),
            "uncoded_components": int(self.order_.shape[0] - self.units_[:, 1].sum()),
        }
