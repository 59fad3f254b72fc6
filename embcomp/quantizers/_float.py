"""Floating-point quantizers: fp32, fp16, bf16, fp8 (E4M3, E5M2) and fp4 (E2M1).

Each fits a scale (per dimension by default) so the data uses the format's range,
then encodes ``clip(x / scale, -max, max)`` cast to the format. The clip comes
before the cast because ml_dtypes turns out-of-range float8 E4M3 into NaN (and E5M2
into inf). Decoding 8- and 4-bit formats is a 256- or 16-entry table lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import ml_dtypes
import numpy as np

from ..exceptions import SpecError
from ._base import Quantizer, pack_nibbles, unpack_nibbles

ScaleMode = Literal["dim", "global", "none"]


@dataclass(frozen=True)
class FloatFormat:
    """A storage format: its numpy dtype, bits, and the value fitted data maps to."""

    dtype: Any
    bits: int
    target: float  # |x| max after scaling: the format max where range is tight

    @property
    def max(self) -> float:
        return float(ml_dtypes.finfo(self.dtype).max)


FORMATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat(np.dtype(np.float32), 32, 1.0),
    # fp16/bf16 have range to spare: map the fitted max to 1 to stay far from overflow.
    "fp16": FloatFormat(np.dtype(np.float16), 16, 1.0),
    "bf16": FloatFormat(np.dtype(ml_dtypes.bfloat16), 16, 1.0),
    # float8/float4 have little range: use all of it.
    "fp8": FloatFormat(np.dtype(ml_dtypes.float8_e4m3fn), 8, 448.0),
    "fp8e5m2": FloatFormat(np.dtype(ml_dtypes.float8_e5m2), 8, 57344.0),
    "fp4": FloatFormat(np.dtype(ml_dtypes.float4_e2m1fn), 4, 6.0),
}


class FloatQuantizer(Quantizer):
    """Scale, clip and cast to a float format.

    Parameters
    ----------
    fmt : one of ``fp32, fp16, bf16, fp8, fp8e5m2, fp4``.
    scale : ``"dim"`` (default) fits one scale per dimension from its max |x|;
        ``"global"`` one scale for all; ``"none"`` stores x as is (the RAG paper's
        plain cast). ``fp32`` is always stored unscaled.

    Attributes
    ----------
    scale_ : ndarray (d,) float32
        Decoded value = stored value * scale_.
    """

    _state = ("scale_",)
    scale_: np.ndarray | None = None

    def __init__(self, fmt: str = "fp8", *, scale: ScaleMode = "dim") -> None:
        self.fmt = fmt
        self.scale = scale

    @property
    def format(self) -> FloatFormat:
        try:
            return FORMATS[self.fmt]
        except KeyError:
            raise SpecError(
                f"unknown float format {self.fmt!r}; valid: {sorted(FORMATS)}"
            ) from None

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.format.bits

    def _fit(self, X: np.ndarray) -> None:
        if self.scale not in ("dim", "global", "none"):
            raise SpecError(f"scale must be 'dim', 'global' or 'none'; got {self.scale!r}")
        d = X.shape[1]
        if self.scale == "none" or self.fmt == "fp32":
            self.scale_ = np.ones(d, dtype=np.float32)
            return
        amax = np.abs(X).max(axis=0).astype(np.float64)
        if self.scale == "global":
            amax = np.full(d, amax.max())
        # A constant-zero dimension gets scale 1: any scale stores 0 exactly.
        amax = np.where(amax > 0, amax, self.format.target)
        self.scale_ = (amax / self.format.target).astype(np.float32)

    def _after_load(self) -> None:
        self._inv_scale = (1.0 / self.scale_.astype(np.float64)).astype(np.float32)
        self._lut: np.ndarray | None = None
        if self.format.bits <= 8:
            n_codes = 1 << self.format.bits
            self._lut = (
                np.arange(n_codes, dtype=np.uint8).view(self.format.dtype).astype(np.float32)
            )

    def _encode_block(self, X: np.ndarray) -> np.ndarray:
        fmt = self.format
        if self.fmt == "fp32":
            return X.astype("<f4", copy=False).view(np.uint8)
        with np.errstate(over="ignore"):  # overflow to inf is clipped just below
            y = X * self._inv_scale
        np.clip(y, -fmt.max, fmt.max, out=y)
        stored = y.astype(fmt.dtype)
        if fmt.bits == 16:
            return stored.view(np.uint16).astype("<u2", copy=False).view(np.uint8)
        raw = stored.view(np.uint8)
        return pack_nibbles(raw) if fmt.bits == 4 else raw

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        fmt = self.format
        assert self.d_ is not None and self.scale_ is not None
        if self.fmt == "fp32":
            return codes.view("<f4").astype(np.float32, copy=False)
        if fmt.bits == 16:
            values = codes.view("<u2").view(fmt.dtype).astype(np.float32)
        else:
            assert self._lut is not None
            raw = unpack_nibbles(codes, self.d_) if fmt.bits == 4 else codes
            values = self._lut[raw]
        values *= self.scale_
        return values
