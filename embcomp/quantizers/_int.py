"""Uniform integer quantizers (int8, int4) with per-dimension calibrated ranges.

code = clip(round((x - min_) * (1 / step_)), 0, 2**bits - 1); decode = min_ + code * step_.
Rounding and clipping come before the cast: a float-to-int cast truncates and wraps.
"""

from __future__ import annotations

import numpy as np

from .. import _jit
from .._blocks import Scratch
from .._stage import expect_array
from ..exceptions import ArtifactError, InputError, SpecError
from . import _kernels
from ._base import Quantizer, pack_nibbles_into, unpack_nibbles_into

# A dimension whose calibrated range is empty (a constant) or narrower than one float32
# step of its values still needs a positive step: the range is widened to that float32
# resolution (2**-23 of the values' magnitude), and for an all-zero dimension to the
# smallest range whose step is a normal float32 (so that 1 / step stays finite).
_RESOLUTION = 2.0**-23
_TINY = float(np.finfo(np.float32).tiny)
# float32 2**23: adding it to 0 <= y < 2**23 rounds y to an integer, ties to even.
_ROUNDER = np.float32(2.0**23)


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
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in (4, 8):
            raise SpecError(f"IntQuantizer supports 4 or 8 bits; got {self.bits}")
        if self.percentile is None:
            lo, hi = X.min(axis=0), X.max(axis=0)
        else:
            p = float(self.percentile)
            if not 50.0 < p <= 100.0:
                raise SpecError(f"percentile must be in (50, 100]; got {p}")
            lo, hi = np.percentile(X, [100.0 - p, p], axis=0)
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        magnitude = np.maximum(np.abs(lo), np.abs(hi))
        width = np.maximum(hi - lo, np.maximum(magnitude * _RESOLUTION, _TINY * self.levels))
        self.min_ = lo.astype(np.float32)
        self.step_ = (width / self.levels).astype(np.float32)
        beyond = np.flatnonzero(~self._top_is_finite())
        if beyond.size:
            j = int(beyond[0])
            raise InputError(
                f"dimension {j} spans {lo[j]:.3g} to {hi[j]:.3g}, more than float32 can hold "
                f"(its largest value is {np.finfo(np.float32).max:.3g}): its codes would "
                "decode to inf; rescale the vectors"
            )

    def _top_is_finite(self) -> np.ndarray:
        """Per dimension, whether the top code decodes (min_ + levels * step_, in float32
        as the decoders compute it) to a finite value."""
        assert self.min_ is not None and self.step_ is not None
        with np.errstate(over="ignore", invalid="ignore"):
            return np.isfinite(self.min_ + np.float32(self.levels) * self.step_)

    def _check_state(self) -> None:
        assert self.d_ is not None and self.min_ is not None and self.step_ is not None
        expect_array(self.min_, "min_", (self.d_,))
        expect_array(self.step_, "step_", (self.d_,))
        if not (self.step_ >= np.finfo(np.float32).tiny).all():  # 1 / step must be finite
            raise ArtifactError("state array 'step_' holds a step below 1.2e-38")
        if not self._top_is_finite().all():
            raise ArtifactError("state arrays 'min_' and 'step_' decode the top code to inf")

    def _after_load(self) -> None:
        assert self.min_ is not None and self.step_ is not None
        self._inv_step = (1.0 / self.step_.astype(np.float64)).astype(np.float32)

    def _jit_encode(self, X: np.ndarray, out: np.ndarray) -> bool | None:
        if not _jit.ENABLED:
            return None
        encode = _kernels.encode_int8 if self.bits == 8 else _kernels.encode_int4
        assert self.min_ is not None
        return bool(encode(X, self._inv_step, self.min_, np.float32(self.levels), out))

    def _jit_decode(self, codes: np.ndarray, out: np.ndarray, stream: bool) -> bool:
        if not _jit.ENABLED:
            return False
        decode = _kernels.decode_int8 if self.bits == 8 else _kernels.decode_int4
        decode(codes, self.step_, self.min_, out, stream)
        return True

    def _encode_into(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool
    ) -> None:
        if self._jit_encode(X, out) is not None:
            return
        y = X if overwrite else scratch.get("scaled", X.shape, np.float32)
        assert self.min_ is not None
        with np.errstate(over="ignore", invalid="ignore"):  # inf is clipped just below
            np.subtract(X, self.min_, out=y)  # exact near min_ (see _kernels._int_code)
            np.multiply(y, self._inv_step, out=y)
        # clip(rint(y), 0, L) == rint(clip(y, 0, L)) as rint is monotone and fixes the
        # integers 0 and L. For 0 <= y <= L < 2**23, y + 2**23 rounds y to an integer
        # (ties to even, exactly as rint) and leaves it in the low bits of the float32.
        np.clip(y, 0, self.levels, out=y)
        np.add(y, _ROUNDER, out=y)
        bits = y.view(np.uint32)
        if self.bits == 8:
            np.copyto(out, bits, casting="unsafe")  # low byte: the code
            return
        n, d = X.shape
        nibbles = scratch.get("nibbles", (n, d + d % 2), np.uint8)
        if d % 2:
            nibbles[:, d] = 0
        np.copyto(nibbles[:, :d], bits, casting="unsafe")
        pack_nibbles_into(nibbles, out, scratch)

    def _decode_into(
        self, codes: np.ndarray, out: np.ndarray, scratch: Scratch, *, stream: bool = False
    ) -> None:
        assert self.d_ is not None and self.step_ is not None and self.min_ is not None
        if self._jit_decode(codes, out, stream):
            return
        d = self.d_
        if self.bits == 8:
            values = codes
        else:
            values = scratch.get("nibbles", (codes.shape[0], 2 * codes.shape[1]), np.uint8)
            unpack_nibbles_into(codes, values, scratch)
            values = values[:, :d]
        np.multiply(values, self.step_, out=out)  # uint8 -> float32, then * step
        np.add(out, self.min_, out=out)
