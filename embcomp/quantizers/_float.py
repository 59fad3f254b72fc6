"""Floating-point quantizers: fp32, fp16, bf16, fp8 (E4M3, E5M2) and fp4 (E2M1).

Each fits an offset and a scale per dimension (by default) so the centred data uses the
format's range, then encodes ``clip((x - offset) / scale, -max, max)`` cast to the
format; decoding computes ``value * scale + offset``. The clip comes before the cast
because ml_dtypes turns out-of-range float8 E4M3 into NaN (and E5M2 into inf).

Why centre: a float format's steps grow with |value|, so a dimension whose values sit
far from 0 is stored coarsely. Embedding models are often anisotropic (every vector
shares a common component: random pairs at cosine 0.7-0.85), and there centring is
the difference between fp8 recall@10 0.87 and 0.96, fp4 0.64 and 0.87 (MiniLM with a
common component added). But a sparse or lopsided dimension (mostly exact zeros, as
ReLU features are) is stored better uncentred, where its zeros stay exact. So the
offset is the training mean where that lowers the training sample's squared error,
else 0 (``tests/test_quantizers.py`` has both kinds). ``center=False`` (and every
artifact saved before the option existed) stores ``x / scale``, as FAISS's SQfp16 does.

Speed: with numba installed, one compiled pass per block does it all
(``_kernels.encode_float``: the format's bits computed from the float32 bits; decoding,
``_kernels.small_float``: the float32 bits computed from the code's). The numpy path,
bit-identical: ml_dtypes casts float8/float4 one element at a time (~0.4 GB/s), so
encoding them is a lookup in a small table indexed by the top bits of the float32
pattern (:class:`_SmallFloatTable`), bit-identical to clip + cast. Decoding 8- and 4-bit
formats is a 256-entry table lookup (for fp4, a table of value pairs, one lookup per byte).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal

import ml_dtypes
import numpy as np

from .. import _jit
from .._blocks import Scratch
from .._stage import expect_array
from .._validation import column_range
from ..exceptions import ArtifactError, SpecError
from . import _kernels
from ._base import Quantizer, pack_nibbles_into

ScaleMode = Literal["dim", "global", "none"]
# Rows of the training sample on which a fit decides which dimensions to centre.
_CENTRING_SAMPLE_ROWS = 16384


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
    scale : ``"dim"`` (default) fits one scale per dimension from its max |x - offset|;
        ``"global"`` one scale for all; ``"none"`` stores x as is (the RAG paper's
        plain cast: no scale, no offset). ``fp32`` is always stored as is.
    center : subtract the training mean of each dimension before scaling (default).

    Attributes
    ----------
    scale_ : ndarray (d,) float32
    offset_ : ndarray (d,) float32
        Decoded value = stored value * scale_ + offset_ (offset_ is 0 without centring).
    """

    _state = ("scale_", "offset_")
    scale_: np.ndarray | None = None
    offset_: np.ndarray | None = None

    def __init__(self, fmt: str = "fp8", *, scale: ScaleMode = "dim", center: bool = True) -> None:
        self.fmt = fmt
        self.scale = scale
        self.center = center

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

    def _min_fit_rows(self) -> int:
        # fp32 and scale="none" learn no range; fp16/bf16 map the fitted max to 1 with
        # range to spare, so one vector's scales clip nothing
        return 2 if self.format.bits <= 8 and self.scale != "none" else 1

    def _fit(self, X: np.ndarray) -> None:
        if self.scale not in ("dim", "global", "none"):
            raise SpecError(f"scale must be 'dim', 'global' or 'none'; got {self.scale!r}")
        if not isinstance(self.center, (bool, np.bool_)):
            raise SpecError(f"center must be True or False; got {self.center!r}")
        d = X.shape[1]
        self.offset_ = np.zeros(d, dtype=np.float32)
        if self.scale == "none" or self.fmt == "fp32":
            self.scale_ = np.ones(d, dtype=np.float32)
            return
        lo, hi = column_range(X)  # max |x| and max |x - mean| from these: no copy of X
        self.scale_ = self._scales(np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64))
        if not self.center:
            return
        # Centre where it stores the training sample better. Most dimensions of dense
        # embeddings gain; a sparse or lopsided one (most values 0, e.g. ReLU outputs)
        # loses, because its zeros decode exactly only uncentred. Ties (constant
        # dimensions) stay uncentred.
        mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            # max |x - mean| over a column, with x - mean in float32 as encoding computes
            # it: rounding is monotone, so it is at the column's max or min
            reach_up, reach_down = hi - mean, mean - lo
            scale = self._scales(np.maximum(reach_up, reach_down).astype(np.float64))
            # decoding the training range (target * scale about the mean) stays finite
            reach = np.abs(mean) + np.float32(self.format.target) * scale
        usable = np.isfinite(scale) & np.isfinite(reach)
        sample = X[:: max(1, X.shape[0] // _CENTRING_SAMPLE_ROWS)]
        plain = self._squared_error(sample, np.zeros_like(mean), self.scale_)
        centred_error = self._squared_error(sample, mean, scale)
        gain = usable & (centred_error < plain)
        if self.scale == "global":  # one scale: centre all dimensions or none
            gain[:] = bool(usable.all() and centred_error.sum() < plain.sum())
        self.offset_ = np.where(gain, mean, np.float32(0)).astype(np.float32)
        self.scale_ = np.where(gain, scale, self.scale_).astype(np.float32)

    def _scales(self, amax: np.ndarray) -> np.ndarray:
        """float32 scales mapping ``amax`` (per dimension, float64) to the format's target."""
        if self.scale == "global":
            amax = np.full_like(amax, amax.max())
        # A constant-zero dimension gets scale 1: any scale stores 0 exactly. So does one
        # whose values are all so close to 0 that amax / target would not be a normal
        # float32 (1 / scale would overflow to inf, and 0 * inf is NaN): it decodes to 0,
        # an error below float32's smallest normal number times the format's max.
        tiny = float(np.finfo(np.float32).tiny) * self.format.target
        amax = np.where(amax >= tiny, amax, self.format.target)
        return (amax / self.format.target).astype(np.float32)

    def _squared_error(self, X: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Per-dimension sum of squared errors of coding ``X`` with ``offset`` and ``scale``
        (by the reference cast; float64 sums; inf where a value does not fit).

        In row blocks of ~1 MiB of float64: the whole sample at once made a dozen
        temporaries its size (1.3 GB over the input for 16,384 x 3,072 rows, and 12 s
        for fp8 where blocks take 1 s)."""
        fmt = self.format
        inv = (1.0 / scale.astype(np.float64)).astype(np.float32)
        total = np.zeros(X.shape[1], dtype=np.float64)
        rows = max(1, (1 << 17) // max(1, X.shape[1]))
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, X.shape[0], rows):
                block = X[start : start + rows]
                y = np.clip((block - offset) * inv, -fmt.max, fmt.max)
                decoded = self._rounded(y) * scale + offset
                error = (decoded.astype(np.float64) - block) ** 2
                total += np.where(np.isfinite(error), error, np.inf).sum(axis=0)
        return total

    def _rounded(self, y: np.ndarray) -> np.ndarray:
        """``y.astype(format).astype(float32)`` for clipped, non-NaN float32 ``y``, without
        ml_dtypes' one-value-at-a-time casts (~10x faster; the same values)."""
        fmt = self.format
        if fmt.bits <= 8:  # the encode table (exhaustively equal to the cast), then its values
            codes = np.empty(y.shape, dtype=np.uint8)
            _small_float_table(self.fmt).encode(np.ascontiguousarray(y), codes, Scratch())
            values = np.arange(1 << fmt.bits, dtype=np.uint8).view(fmt.dtype)
            return values.astype(np.float32)[codes]
        if self.fmt == "bf16":  # round the float32 bits to their top 16, ties to even
            bits = np.ascontiguousarray(y).view(np.uint32)
            top = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
            return (top << np.uint32(16)).astype(np.uint32).view(np.float32)
        return y.astype(fmt.dtype).astype(np.float32)

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        # Artifacts saved before centring existed hold no offset_; they load with
        # center=False (see embcomp.artifacts.LEGACY_OPTIONS), which is an offset of 0,
        # one per scale (whose shape the base class then checks against d_).
        scale = arrays.get("scale_")
        if "offset_" not in arrays and not self.center and isinstance(scale, np.ndarray):
            if scale.ndim == 1:
                arrays = {**arrays, "offset_": np.zeros(scale.shape, dtype=np.float32)}
        super().set_state(arrays)

    def _check_state(self) -> None:
        assert self.d_ is not None and self.scale_ is not None and self.offset_ is not None
        expect_array(self.scale_, "scale_", (self.d_,))
        expect_array(self.offset_, "offset_", (self.d_,))
        if not (self.scale_ >= np.finfo(np.float32).tiny).all():  # 1 / scale must be finite
            raise ArtifactError("state array 'scale_' holds a scale below 1.2e-38")
        uncentred = not self.center or self.scale == "none" or self.fmt == "fp32"
        if uncentred and self.offset_.any():
            raise ArtifactError(
                f"state array 'offset_' is not zero, but this {self.fmt} codec is not centred "
                f"(center={self.center!r}, scale={self.scale!r})"
            )

    def _after_load(self) -> None:
        assert self.scale_ is not None
        fmt = self.format
        self._inv_scale = (1.0 / self.scale_.astype(np.float64)).astype(np.float32)
        # scale_ == 1 (fp32, scale="none"): x * 1 == x and v * 1 == v exactly; skip them.
        self._unit_scale = bool(np.all(self.scale_ == 1))
        # The offset as each direction applies it, with its zeros signed so that they
        # change nothing: x - (+0.0) == x and v + (-0.0) == v for every float, -0.0
        # included (v + (+0.0) would turn -0.0 into +0.0). Uncentred codecs decode
        # bit-identically to before centring existed.
        assert self.offset_ is not None
        zero = np.equal(self.offset_, 0)
        self._encode_offset = np.where(zero, np.float32(0.0), self.offset_).astype(np.float32)
        self._decode_offset = np.where(zero, np.float32(-0.0), self.offset_).astype(np.float32)
        self._centred = not bool(np.all(zero))  # the numpy path skips a zero offset
        self._clip = self._clip_limit()
        self._table = _small_float_table(self.fmt) if fmt.bits <= 8 else None
        # bf16 has float32's exponent range: its kernel needs no format parameters
        self._jit_params: tuple[Any, Any, Any, Any] | None = None
        if fmt.bits < 16 or self.fmt == "fp16":
            self._jit_params = _kernels.float_format_params(fmt.dtype)
        self._small_params = _kernels.small_float_params(fmt.dtype) if fmt.bits <= 8 else None
        self._lut: np.ndarray | None = None
        if fmt.bits <= 8:
            n_codes = 1 << fmt.bits
            self._lut = np.arange(n_codes, dtype=np.uint8).view(fmt.dtype).astype(np.float32)
            # fp4: one byte holds two codes; a 256-entry table of value pairs decodes it
            # with one lookup.
            if fmt.bits == 4:
                byte = np.arange(256)
                pairs = np.stack([self._lut[byte & 0x0F], self._lut[byte >> 4]], axis=1)
                self._pair_lut = np.ascontiguousarray(pairs).view(np.uint64).ravel()

    def _jit_encode(self, X: np.ndarray, out: np.ndarray) -> bool | None:
        if not _jit.ENABLED or self.fmt == "fp32" or sys.byteorder != "little":
            return None
        fmt = self.format
        fmax = self._clip
        affine = (self._encode_offset, self._inv_scale)
        if self.fmt == "bf16":
            return bool(_kernels.encode_bf16(X, *affine, fmax, out.view(np.uint16)))
        assert self._jit_params is not None
        shift, rebias, min_normal, sub_scale = self._jit_params
        params = (*affine, fmax, shift, rebias, min_normal, sub_scale)
        if fmt.bits == 4:
            return bool(_kernels.encode_float4(X, *params, out))
        codes = out.view(np.uint16) if fmt.bits == 16 else out
        return bool(_kernels.encode_float(X, *params, codes))

    def _jit_decode(self, codes: np.ndarray, out: np.ndarray, stream: bool) -> bool:
        if not _jit.ENABLED or self.fmt == "fp32" or sys.byteorder != "little":
            return False
        fmt = self.format
        affine = (self.scale_, self._decode_offset)
        if self.fmt == "fp16":
            _kernels.decode_f16(codes.view(np.uint16), *affine, out, stream)
        elif self.fmt == "bf16":
            _kernels.decode_bf16(codes.view(np.uint16), *affine, out, stream)
        elif self._small_params is None:  # a format the formula does not fit: the table
            return False
        else:
            decode = _kernels.decode_float8 if fmt.bits == 8 else _kernels.decode_float4
            decode(codes, self._small_params, *affine, out, stream)
        return True

    def _clip_limit(self) -> np.float32:
        """The largest magnitude a scaled value is clipped to before the cast.

        The format's max, except that fp16 and bf16 (whose fitted range ends at 1, far
        below their max) stop at the largest value that decodes (``v * scale_ +
        offset_``) below float32's max in every dimension: an input near 3.4e38 decodes
        to a large finite value, not inf. Fitted data always maps under the limit.
        """
        fmt = self.format
        if fmt.bits != 16:  # 8/4 bits map the fitted max to the format's max
            return np.float32(fmt.max)
        assert self.scale_ is not None and self.offset_ is not None
        top = float(np.finfo(np.float32).max) * (1 - 2.0**-10)  # room for rounding
        room = (top - np.abs(self.offset_.astype(np.float64))) / self.scale_.astype(np.float64)
        limit = max(fmt.target, min(fmt.max, float(room.min(initial=np.inf))))
        value = np.array(limit, dtype=np.float32).astype(fmt.dtype)  # nearest: maybe above
        if float(value) > limit:
            value = (value.view(np.uint16) - np.uint16(1)).view(fmt.dtype)  # one code down
        return np.float32(value)

    def _scaled(self, X: np.ndarray, scratch: Scratch, *, overwrite: bool) -> np.ndarray:
        """``(X - offset_) * (1 / scale_)`` in float32 (overflow gives inf: callers clip)."""
        if self._unit_scale and not self._centred:
            return X
        y = X if overwrite else scratch.get("scaled", X.shape, np.float32)
        with np.errstate(over="ignore"):
            if self._centred:
                np.subtract(X, self._encode_offset, out=y)
                X = y
            if not self._unit_scale:
                np.multiply(X, self._inv_scale, out=y)
        return y

    def _encode_into(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool
    ) -> None:
        fmt = self.format
        if self._jit_encode(X, out) is not None:
            return
        if self.fmt == "fp32":
            np.copyto(out.view("<f4"), X)
            return
        y = self._scaled(X, scratch, overwrite=overwrite)
        if self._table is not None:  # 8 and 4 bits: the table clips, rounds and signs
            if fmt.bits == 8:
                self._table.encode(y, out, scratch)
                return
            n, d = X.shape
            nibbles = scratch.get("nibbles", (n, d + d % 2), np.uint8)
            if d % 2:
                nibbles[:, d] = 0
            self._table.encode(y, nibbles[:, :d], scratch)
            pack_nibbles_into(nibbles, out, scratch)
            return
        scaled = y
        if y is X and not overwrite:  # unscaled and uncentred: X is the caller's
            y = scratch.get("scaled", X.shape, np.float32)
        np.clip(scaled, -self._clip, self._clip, out=y)
        # 16 bits: ml_dtypes' bfloat16 cast and numpy's float16 cast round to nearest even
        np.copyto(out.view(np.uint16).view(fmt.dtype), y, casting="unsafe")
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            out.view(np.uint16).byteswap(inplace=True)

    def _decode_into(
        self, codes: np.ndarray, out: np.ndarray, scratch: Scratch, *, stream: bool = False
    ) -> None:
        fmt = self.format
        assert self.d_ is not None and self.scale_ is not None
        if self._jit_decode(codes, out, stream):
            return
        n, d = out.shape
        if self.fmt == "fp32":
            np.copyto(out, codes.view("<f4"))
            return
        if fmt.bits == 16:
            np.copyto(out, codes.view("<u2").view(fmt.dtype), casting="unsafe")
        elif fmt.bits == 8 and d % 2 == 0 and sys.byteorder == "little":
            # two codes read as one uint16 index a table of value pairs: half the lookups
            index = scratch.get("index", (n, d // 2), np.intp)
            np.copyto(index, codes.view(np.uint16))
            # mode="wrap" skips the bounds check; every uint16 is a valid index anyway
            np.take(_byte_pair_table(self.fmt), index, out=out.view(np.uint64), mode="wrap")
        elif fmt.bits == 8:
            assert self._lut is not None
            index = scratch.get("index", codes.shape, np.intp)
            np.copyto(index, codes)
            np.take(self._lut, index, out=out, mode="wrap")
        else:
            index = scratch.get("index", codes.shape, np.intp)
            np.copyto(index, codes)
            if d % 2 == 0:
                np.take(self._pair_lut, index, out=out.view(np.uint64), mode="wrap")
            else:
                pairs = scratch.get("pairs", codes.shape, np.uint64)
                np.take(self._pair_lut, index, out=pairs, mode="wrap")
                np.copyto(out, pairs.view(np.float32)[:, :d])
        if not self._unit_scale:
            np.multiply(out, self.scale_, out=out)
        if self._centred:
            np.add(out, self._decode_offset, out=out)


class _SmallFloatTable:
    """Encode float32 to a float8/float4 format by one table lookup on its top bits.

    Rounding ``|y|`` to nearest (ties to even) on a format with ``m`` mantissa bits
    depends only on the bits above the half-ulp position, the half-ulp bit, and
    whether any bit below is set (the sticky bit). The half-ulp bit of a normal
    number is bit ``22 - m``; subnormals round at a higher bit. So the index
    ``bits >> (21 - m)`` with its lowest bit replaced by "any of bits 21-m..0 set"
    determines the result, and a table of ``2**(11 + m)`` codes (16 KiB for E4M3)
    built with ml_dtypes' own cast maps every index to the reference code. The table
    also folds in the sign and the clip to ``[-max, max]`` (inf included), so the
    kernel is five passes; it is exhaustively equal to ``clip`` + ``astype`` for every
    non-NaN float32.
    """

    def __init__(self, fmt: FloatFormat) -> None:
        mant = int(ml_dtypes.finfo(fmt.dtype).nmant)
        self.shift = 21 - mant
        self.mask = (1 << self.shift) - 1
        index = np.arange(1 << (32 - self.shift), dtype=np.uint64)
        # a representative float32 of each index: sticky bit -> lowest bit set
        bits = ((index >> 1) << (self.shift + 1)) | (index & 1)
        values = bits.astype(np.uint32).view(np.float32)
        with np.errstate(invalid="ignore"):  # the NaN rows are never looked up
            clipped = np.clip(values, -fmt.max, fmt.max)
            self.codes = clipped.astype(fmt.dtype).view(np.uint8)

    def encode(self, y: np.ndarray, out: np.ndarray, scratch: Scratch) -> None:
        """Codes of non-NaN float32 ``y`` (n, d) into ``out`` (n, d) uint8; keeps ``y``."""
        bits = y.view(np.uint32)
        index = scratch.get("index", y.shape, np.uint32)
        np.bitwise_and(bits, self.mask, out=index)
        np.add(index, self.mask, out=index)  # carries into bit `shift` iff any bit is set
        np.bitwise_or(index, bits, out=index)
        # np.take wants intp indices: shift straight into them (it would copy otherwise)
        wide = scratch.get("index_intp", y.shape, np.intp)
        np.right_shift(index, self.shift, out=wide)
        np.take(self.codes, wide, out=out, mode="wrap")  # wrap: no bounds check


_TABLES: dict[str, _SmallFloatTable] = {}
_PAIR_TABLES: dict[str, np.ndarray] = {}
_TABLES_LOCK = threading.Lock()


def _byte_pair_table(name: str) -> np.ndarray:
    """float8 decoding of two codes at once: uint16 (little-endian pair) -> 2 float32.

    65536 entries of 8 bytes (512 KiB), as uint64 so that np.take moves a pair at once.
    """
    key = f"{name}:pairs"
    with _TABLES_LOCK:
        if key not in _PAIR_TABLES:
            fmt = FORMATS[name]
            with np.errstate(invalid="ignore"):  # NaN codes decode to NaN, as the LUT does
                values = np.arange(256, dtype=np.uint8).view(fmt.dtype).astype(np.float32)
            index = np.arange(1 << 16)
            pairs = np.stack([values[index & 0xFF], values[index >> 8]], axis=1)
            _PAIR_TABLES[key] = np.ascontiguousarray(pairs).view(np.uint64).ravel()
        return _PAIR_TABLES[key]


def _small_float_table(name: str) -> _SmallFloatTable:
    with _TABLES_LOCK:
        if name not in _TABLES:
            _TABLES[name] = _SmallFloatTable(FORMATS[name])
        return _TABLES[name]
