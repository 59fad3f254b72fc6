"""Uniform integer quantizers (int8, int4) with per-dimension calibrated ranges.

code = clip(round((x - min_) / step_), 0, 2**bits - 1); decode = min_ + code * step_.
Rounding and clipping come before the cast: a float-to-int cast truncates and wraps.
"""

from __future__ import annotations

import numpy as np

from ..exceptions import SpecError
from ._base import Quantizer, pack_nibbles, unpack_nibbles

# A dimension whose calibrated range is (almost) empty still needs a positive step.
_MIN_WIDTH = 1e-12


class IntQuantizer(Quantizer):
    """Per-dimension uniform quantizer on ``2**bits`` levels.

    Parameters
    ----------
    bits : 8 or 4 (4-bit codes are packed two per byte).
    percentile : ``None`` (default) calibrates each dimension's range on its min and
        max; a value such as ``99.9`` uses the ``100-p`` and ``p`` percentiles
        instead, clipping rare outliers to spend the levels on the bulk.

    Attributes
    ----------
    min_ : ndarray (d,) float32, value of code 0.
    step_ : ndarray (d,) float32, width of one level.
    """

    _state = ("min_", "step_")
    min_: np.ndarray | None = None
    step_: np.ndarray | None = None

    def __init__(self, bits: int = 8, *, percentile: float | None = None) -> None:
        self.bits = bits  # type: ignore[misc]
        self.percentile = percentile

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _fit(self, X: np.ndarray) -> None:
        if self.bits not in (4, 8):
            raise SpecError(f"IntQuantizer supports 4 or 8 bits; got {self.bits}")
        if self.percentile is None:
            lo, hi = X.min(axis=0), X.max(axis=0)
        else:
            p = float(self.percentile)
            if not 50.0 < p <= 100.0:
                raise SpecError(f"percentile must be in (50, 100]; got {p}")
            lo, hi = np.percentile(X, [100.0 - p, p], axis=0)
        width = np.maximum(hi.astype(np.float64) - lo, _MIN_WIDTH)
        self.min_ = lo.astype(np.float32)
        self.step_ = (width / self.levels).astype(np.float32)

    def _after_load(self) -> None:
        assert self.min_ is not None and self.step_ is not None
        self._inv_step = (1.0 / self.step_.astype(np.float64)).astype(np.float32)
        # (x - min) / step folded into one multiply-add: x * inv_step + offset
        self._offset = (-self.min_.astype(np.float64) * self._inv_step).astype(np.float32)

    def _encode_block(self, X: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # inf is clipped just below
            y = X * self._inv_step
            y += self._offset
        np.rint(y, out=y)
        np.clip(y, 0, self.levels, out=y)
        codes = y.astype(np.uint8)
        return pack_nibbles(codes) if self.bits == 4 else codes

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        assert self.d_ is not None
        values = unpack_nibbles(codes, self.d_) if self.bits == 4 else codes
        out = values.astype(np.float32)
        out *= self.step_
        out += self.min_
        return out
