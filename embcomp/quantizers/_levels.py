"""Per-component scalar quantizer levels, fitted on training data, all columns at once.

Every fit here works on :class:`SortedColumns`: each training column sorted once, with
prefix sums of x and x**2, so the mean squared error of *any* set of levels (nearest
level decoding) costs one vectorized ``searchsorted`` of the cell boundaries instead of
a pass over the data. That makes it cheap to fit, for every component and every bit
width, the three level families compared in the study:

* ``uniform``: ``2**b`` equally spaced levels about the mean; the clipping range is
  chosen to minimise the MSE (golden-section search), not set to the min/max.
* ``lloyd``: Lloyd-Max levels (1-D k-means), started from the uniform optimum.
* ``float``: the values of a small float format (fp4 E2M1, fp6 E2M3, fp8 E4M3 from
  ml_dtypes) times a per-component scale chosen to minimise the MSE; widths with no
  such format fall back to ``uniform``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import ml_dtypes
import numpy as np

from ..exceptions import SpecError

__all__ = [
    "LEVEL_KINDS",
    "LevelIndex",
    "SortedColumns",
    "fit_levels",
    "float_format_values",
    "nearest_level_codes",
]

LevelKind = Literal["uniform", "lloyd", "float"]
LEVEL_KINDS: tuple[str, ...] = ("uniform", "lloyd", "float")

_FLOAT_FORMATS = {
    4: ml_dtypes.float4_e2m1fn,
    6: ml_dtypes.float6_e2m3fn,
    8: ml_dtypes.float8_e4m3fn,
}
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


class SortedColumns:
    """Training columns sorted once, for exact MSE of any level set in O(levels log n).

    Parameters
    ----------
    X : ndarray (n, c) float
        Training values, one column per component.

    Attributes
    ----------
    n : int, rows.
    mean, std : ndarray (c,) float64.
    """

    def __init__(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        n, c = X.shape
        self.n = n
        self.c = c
        xs = np.sort(X, axis=0)
        self.mean = xs.mean(axis=0)
        self.std = np.sqrt(np.maximum(xs.var(axis=0), 0.0))
        self._low = xs[0]
        self._high = xs[-1]
        span = xs[-1] - xs[0]
        self._span = np.where(span > 0, span, 1.0)
        # One flat sorted key array: column j's values map into [j, j + 1), so a single
        # searchsorted answers per-column queries.
        self._keys = (np.arange(c) + 0.5 * (xs - self._low) / self._span).T.ravel()
        zeros = np.zeros((1, c))
        self._s1 = np.concatenate([zeros, np.cumsum(xs, axis=0)]).T  # (c, n + 1)
        self._s2 = np.concatenate([zeros, np.cumsum(xs * xs, axis=0)]).T

    @property
    def low(self) -> np.ndarray:
        """Per column, the smallest training value: (c,) float64."""
        return self._low

    @property
    def high(self) -> np.ndarray:
        """Per column, the largest training value: (c,) float64."""
        return self._high

    def sorted_values(self, column: int) -> np.ndarray:
        """Column ``column``'s training values, sorted (rebuilt from the keys: equal to
        the originals to within a few units in the last place): (n,) float64."""
        keys = self._keys[column * self.n : (column + 1) * self.n] - column
        return self._low[column] + 2.0 * keys * self._span[column]

    def _rank(self, thresholds: np.ndarray) -> np.ndarray:
        """Per column, how many training values lie below each threshold: (c, m) int."""
        cols = np.arange(self.c)[:, None]
        rel = np.clip((thresholds - self._low[:, None]) / self._span[:, None], -0.5, 1.5)
        # Values below a column's minimum map to j - 0.25 (< all of its keys), above its
        # maximum to j + 0.75 (> all of its keys): searchsorted then counts 0 or n.
        keys = cols + np.where(rel < 0, -0.25, np.where(rel > 1, 0.75, 0.5 * rel))
        flat = np.searchsorted(self._keys, keys.ravel(), side="left").reshape(keys.shape)
        return np.clip(flat - cols * self.n, 0, self.n)

    def cells(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares of the values in each cell between thresholds.

        Parameters
        ----------
        thresholds : ndarray (c, m), sorted along axis 1.

        Returns
        -------
        count, sum, sumsq : ndarrays (c, m + 1) float64.
        """
        rank = self._rank(thresholds)
        edges = np.concatenate(
            [np.zeros((self.c, 1), np.int64), rank, np.full((self.c, 1), self.n)], axis=1
        )
        rows = np.arange(self.c)[:, None]
        count = np.diff(edges, axis=1).astype(np.float64)
        s1 = np.diff(self._s1[rows, edges], axis=1)
        s2 = np.diff(self._s2[rows, edges], axis=1)
        return count, s1, s2

    def mse(self, levels: np.ndarray) -> np.ndarray:
        """Mean squared error per column of nearest-level decoding: (c,) float64.

        Parameters
        ----------
        levels : ndarray (c, K), sorted along axis 1.
        """
        if levels.shape[1] == 1:
            return self.std**2 + (self.mean - levels[:, 0]) ** 2
        count, s1, s2 = self.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))
        sse = s2 - 2.0 * levels * s1 + count * levels * levels
        return np.maximum(sse.sum(axis=1), 0.0) / self.n


def _golden_min(
    f: Callable[[np.ndarray], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    iters: int,
) -> np.ndarray:
    """Per-column golden-section minimisation of ``f(t) -> (c,)`` on [lo, hi]."""
    a, b = lo.copy(), hi.copy()
    x1 = b - _GOLDEN * (b - a)
    x2 = a + _GOLDEN * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        left = f1 <= f2  # minimum in [a, x2]
        b = np.where(left, x2, b)
        a = np.where(left, a, x1)
        new_x1 = np.where(left, b - _GOLDEN * (b - a), x2)
        new_x2 = np.where(left, x1, a + _GOLDEN * (b - a))
        probe = np.where(left, new_x1, new_x2)
        fp = f(probe)
        f1, f2 = np.where(left, fp, f2), np.where(left, f1, fp)
        x1, x2 = new_x1, new_x2
    return np.where(f1 <= f2, x1, x2)


def _uniform(sc: SortedColumns, n_levels: int, half_width: np.ndarray) -> np.ndarray:
    grid = np.linspace(-1.0, 1.0, n_levels)
    return sc.mean[:, None] + (half_width * sc.std)[:, None] * grid


def float_format_values(bits: int) -> np.ndarray:
    """The distinct finite values of the ``bits``-wide float format, sorted, padded by
    repeating the largest to ``2**bits`` entries (duplicate levels are never chosen)."""
    dtype = _FLOAT_FORMATS[bits]
    raw = np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float64)
    values = np.unique(raw[np.isfinite(raw)])
    return np.concatenate([values, np.full((1 << bits) - values.size, values[-1])])


def fit_levels(
    sc: SortedColumns, bits: int, kind: str = "uniform", *, iters: int = 24
) -> np.ndarray:
    """Fit ``2**bits`` sorted levels per column.

    Parameters
    ----------
    sc : the training columns.
    bits : 0..8 (0 gives the single level at the mean).
    kind : ``"uniform"``, ``"lloyd"`` or ``"float"`` (see the module docstring).
    iters : golden-section / Lloyd iterations.

    Returns
    -------
    levels : ndarray (c, 2**bits) float64, sorted along axis 1.
    """
    if kind not in LEVEL_KINDS:
        raise SpecError(f"levels must be one of {LEVEL_KINDS}; got {kind!r}")
    n_levels = 1 << bits
    if bits == 0:
        return sc.mean[:, None].copy()
    # Uniform: optimise the half width in units of the column's standard deviation.
    # The MSE-optimal clipping range for Gaussian data is ~1.6 std at 2 levels and
    # ~4.7 std at 256; the bracket leaves room for heavier tails.
    half = _golden_min(
        lambda t: sc.mse(_uniform(sc, n_levels, t)),
        np.full(sc.c, 0.3),
        np.full(sc.c, 12.0),
        iters,
    )
    levels = _uniform(sc, n_levels, half)
    if kind == "float" and bits in _FLOAT_FORMATS:
        table = float_format_values(bits)
        top = float(table[-1])
        log_scale = _golden_min(
            lambda t: sc.mse(sc.mean[:, None] + (np.exp(t) * sc.std)[:, None] * table),
            np.log(np.full(sc.c, 0.3 / top)),
            np.log(np.full(sc.c, 24.0 / top)),
            iters,
        )
        levels = sc.mean[:, None] + (np.exp(log_scale) * sc.std)[:, None] * table
    elif kind == "lloyd":
        levels = _lloyd(sc, levels, iters)
        # A level whose cell is empty never moves: on skewed data the symmetric start
        # leaves levels outside the data's range, wasted (a lognormal column at 4 bits
        # used 9 of 16, 7 below its minimum). Columns with a quarter of their levels
        # outside go on with each empty level moved to the far end of the cell with the
        # largest error (as k-means re-seeds), until no level moves; the set with the
        # lower error is kept (lognormal, 6 bits: MSE 0.185 -> 0.018).
        outside = (levels < sc.low[:, None]) | (levels > sc.high[:, None])
        stuck = np.nonzero(4 * outside.sum(axis=1) >= n_levels)[0]
        errors = sc.mse(levels) if stuck.size else np.zeros(0)
        for j in stuck:
            xs = sc.sorted_values(int(j))
            again = _lloyd_reseeding(xs, levels[j], 10 * iters)
            if _mse_1d(xs, again) < errors[j]:
                levels[j] = again
        # Levels still outside move to the range's ends: closer to every value, so no
        # value's error grows (and a ratio's levels are never negative).
        levels = np.clip(levels, sc.low[:, None], sc.high[:, None])
    return levels


def _lloyd_reseeding(xs: np.ndarray, levels: np.ndarray, iters: int) -> np.ndarray:
    """Lloyd-Max on one column's sorted values ``xs`` from ``levels`` (K,), moving a
    level whose cell is empty to the far end of the cell with the largest squared
    error (splitting it); up to ``iters`` iterations, until no level moves."""
    n = xs.size
    c1 = np.concatenate([[0.0], np.cumsum(xs)])
    c2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    levels = np.sort(np.asarray(levels, dtype=np.float64))
    for _ in range(iters):
        cuts = np.searchsorted(xs, 0.5 * (levels[1:] + levels[:-1]), side="left")
        edges = np.concatenate([[0], cuts, [n]])
        count = np.diff(edges).astype(np.float64)
        s1, s2 = np.diff(c1[edges]), np.diff(c2[edges])
        moved = np.where(count > 0, s1 / np.maximum(count, 1.0), levels)
        sse = s2 - 2.0 * moved * s1 + count * moved * moved
        for k in np.flatnonzero(count == 0):
            worst = int(np.argmax(sse))
            if count[worst] < 2 or sse[worst] <= 0:
                break
            low, high = xs[edges[worst]], xs[edges[worst + 1] - 1]
            moved[k] = high if high - moved[worst] >= moved[worst] - low else low
            sse[worst] = 0.0  # one split per cell and iteration
        moved = np.sort(moved)
        if np.array_equal(moved, levels):
            break
        levels = moved
    return levels


def _mse_1d(xs: np.ndarray, levels: np.ndarray) -> float:
    """Mean squared error of nearest-level decoding of sorted ``xs`` (sorted levels)."""
    cells = np.searchsorted(0.5 * (levels[1:] + levels[:-1]), xs, side="right")
    return float(np.mean((xs - levels[cells]) ** 2))


def _lloyd(sc: SortedColumns, levels: np.ndarray, iters: int) -> np.ndarray:
    """Up to ``iters`` Lloyd-Max iterations from ``levels`` (c, K): each level moves to
    the mean of its cell (a level whose cell is empty stays); stops once none moves."""
    for _ in range(iters):
        count, s1, _ = sc.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))
        moved = np.where(count > 0, s1 / np.maximum(count, 1.0), levels)
        moved = np.maximum.accumulate(moved, axis=1)  # keep sorted
        if np.array_equal(moved, levels):
            break
        levels = moved
    return levels


def nearest_level_codes(X: np.ndarray, thresholds: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Index of the nearest level, by binary search on per-column cell boundaries.

    Parameters
    ----------
    X : ndarray (n, c) float32.
    thresholds : ndarray (c, 255) float32, column j's ``2**bits[j] - 1`` boundaries
        (midpoints of its sorted levels) followed by ``+inf`` padding.
    bits : ndarray (c,) int, at most 8.

    Returns
    -------
    codes : ndarray (n, c) int64, in ``[0, 2**bits[j])`` for column j.
    """
    n, c = X.shape
    codes = np.zeros((n, c), dtype=np.int64)
    flat = thresholds.ravel()
    base = np.arange(c, dtype=np.int64) * thresholds.shape[1]
    for bit in range(int(bits.max(initial=0)) - 1, -1, -1):
        candidate = codes + (1 << bit)
        # Columns narrower than this step read +inf padding and never move.
        index = np.minimum(candidate - 1, thresholds.shape[1] - 1) + base
        codes = np.where(X >= flat[index], candidate, codes)
    return codes


_MAX_CELLS = 1 << 14  # per column; beyond it a cell may hold several boundaries


class LevelIndex:
    """Exact nearest-level codes for many columns at once, in a few passes.

    A uniform grid over each column's boundaries (one cell narrower than the closest
    pair of boundaries, capped at 16,384 cells) gives, by table lookup, a lower bound on
    the number of boundaries below x; a few compare-and-increment steps (the most
    boundaries any cell holds, usually 1) make it exact. Same codes as
    :func:`nearest_level_codes`, without its ``bits`` rounds of gathers.

    Parameters
    ----------
    thresholds : ndarray (c, 255) float32, as for :func:`nearest_level_codes`.
    bits : ndarray (c,) int, at most 8.
    """

    def __init__(self, thresholds: np.ndarray, bits: np.ndarray) -> None:
        c, width = thresholds.shape
        # One more +inf column: a code that reached its column's last level reads it.
        width += 1
        self._thresholds = np.full((c, width), np.inf, dtype=np.float32)
        self._thresholds[:, :-1] = thresholds
        self._row = (np.arange(c, dtype=np.int32) * width).astype(np.int32)
        starts = np.zeros(c, dtype=np.float32)
        inv_widths = np.zeros(c, dtype=np.float32)
        cells = np.ones(c, dtype=np.int32)
        tables, steps = [], 0
        for j in range(c):
            t = self._thresholds[j, : (1 << int(bits[j])) - 1].astype(np.float64)
            if t.size == 0:
                tables.append(np.zeros(1, dtype=np.int16))
                continue
            span = float(t[-1] - t[0])
            gaps = np.diff(t)
            gaps = gaps[gaps > 0]
            narrowest = float(gaps.min()) if gaps.size else max(span, 1.0)
            n_cells = int(min(_MAX_CELLS, np.ceil(span / narrowest) + 3)) if span > 0 else 3
            cell = max(span, narrowest) / max(n_cells - 2, 1)
            start = float(t[0]) - cell
            edges = start + cell * np.arange(n_cells)
            # Count boundaries below a slightly lowered edge: float32 rounding of the
            # cell index can then only under-count, which the steps below repair.
            table = np.searchsorted(t, edges - 0.01 * cell, side="left")
            upper = np.searchsorted(t, edges + 1.01 * cell, side="left")
            steps = max(steps, int((upper - table).max()))
            starts[j], inv_widths[j], cells[j] = start, 1.0 / cell, n_cells
            tables.append(table.astype(np.int16))
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in tables])[:-1]])
        self._table = np.concatenate(tables) if tables else np.zeros(0, np.int16)
        self._offset = offsets.astype(np.int32)
        self._start = starts
        self._inv_width = inv_widths
        self._top_cell = (cells - 1).astype(np.float32)
        self._steps = steps

    def codes(self, X: np.ndarray) -> np.ndarray:
        """Nearest-level codes (n, c) int32 of ``X`` (n, c) float32."""
        position = X - self._start
        position *= self._inv_width
        np.floor(position, out=position)
        np.clip(position, 0.0, self._top_cell, out=position)
        index = position.astype(np.int32)
        index += self._offset
        codes = self._table[index].astype(np.int32)
        flat = self._thresholds.ravel()
        for _ in range(self._steps):  # the most any cell needs; most need one or none
            moved = X >= flat[codes + self._row]
            if not moved.any():  # nothing moved, so nothing would in a later step either
                break
            codes += moved
        return codes
