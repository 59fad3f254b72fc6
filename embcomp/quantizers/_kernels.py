"""Compiled one-pass kernels for the scalar quantizers (used when ``embcomp._jit`` is on).

Each kernel works on one C-contiguous block and writes straight into the caller's
output. Each computes what the numpy path of its quantizer computes, with the same
float32 operations in the same order, so the bytes are identical (the tests check
both paths against the same references). Encoders also return whether every input
was finite, so the caller needs no separate pass to check (it re-checks with
:func:`embcomp._validation.check_finite` only to name the bad row). Decoders take
``stream``: whether to write the output with streaming stores, row by row through a
stage (see :func:`embcomp._jit.streams`); the values are the same either way.

Bit tricks used here:

- ``np.float32(y).view(np.uint32)`` reinterprets a float's bits (no conversion).
- Round to nearest, ties to even, at bit ``s`` of an unsigned ``u``:
  ``(u + (1 << (s - 1)) - 1 + ((u >> s) & 1)) >> s``.
- ``y + 2**23`` for ``0 <= y < 2**23`` rounds ``y`` to an integer (ties to even) and
  leaves it in the float's low mantissa bits.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .._jit import finish_row, finish_stream, kernel, stream_start

_U = np.uint32
_I = np.int32
_EXP = np.uint32(0x7F800000)  # exponent bits of float32: all set means inf or NaN
_ROUNDER = np.float32(2.0**23)
_TWO_M24 = np.float32(2.0**-24)  # float16 subnormal unit
_NAN = np.int32(0x7FC00000)  # the NaN ml_dtypes decodes float8 NaN codes to (sign apart)
_INF = np.int32(0x7F800000)


# -- scalar conversions -----------------------------------------------------------------
@kernel
def float_code(y, shift, rebias, min_normal, sub_scale, sign_shift):  # type: ignore[no-untyped-def]
    """Bits of float32 ``y`` in a smaller float format, nearest-even like ml_dtypes/numpy.

    ``|y|`` must not exceed the format's max (callers clip first). For a format with
    ``m`` mantissa bits and exponent bias ``B`` (see :func:`float_format_params`):
    a normal result (``|y| >= 2**(1-B)``) is ``|y|``'s float32 bits with the exponent
    rebiased from 127 to ``B`` and rounded at bit ``shift = 23 - m``; a subnormal one
    is ``rint(|y| * 2**(B+m-1))`` (an exact scaling by a power of two). Both are
    computed and one is selected, so the loop vectorizes; every step is cast back to 32
    bits (numba computes integers in 64), so 16 lanes wide.
    """
    shift = _U(shift & _U(31))  # (< 32 lets the compiler shift in 32 bits)
    u = np.float32(y).view(np.uint32)
    a = _U(u & _U(0x7FFFFFFF))
    half = _U(_U(_U(1) << _U(shift - _U(1))) - _U(1))  # round half to even: + half + odd
    odd = _U(_U(a >> shift) & _U(1))
    normal = _U(_U(_U(_U(a - rebias) + half) + odd) >> shift)
    sub = _U(np.float32(abs(y) * sub_scale + _ROUNDER).view(np.uint32) & _U(0x7FFFFF))
    code = normal if a >= min_normal else sub
    return _U(code | _U(_U(u >> _U(31)) << _U(sign_shift & _U(31))))


def float_format_params(dtype: object) -> tuple[np.uint32, np.uint32, np.uint32, np.float32]:
    """``(shift, rebias, min_normal, sub_scale)`` of :func:`float_code` for a float dtype."""
    import ml_dtypes

    info = ml_dtypes.finfo(dtype)
    mant, bias = int(info.nmant), 1 - int(info.minexp)
    return (
        np.uint32(23 - mant),
        np.uint32((127 - bias) << 23),
        np.uint32((128 - bias) << 23),
        np.float32(2.0 ** (bias + mant - 1)),
    )


@kernel
def _row_is_finite(X, i):  # type: ignore[no-untyped-def]
    """Whether row ``i`` of ``X`` holds no inf or NaN (a max over the exponent bits).

    A loop of its own before each row's encoding loop: both vectorize, where one loop
    doing both does not (2-3x slower). The max is cast back to 32 bits: left to numba's
    64-bit integers it ran 2.5x slower on AVX2 (a Zen 3: 70 vs 28 us for 1,000 x 384,
    half of a bf16 encode's time).
    """
    top = _U(0)
    for j in range(X.shape[1]):
        top = _U(max(top, _U(np.float32(X[i, j]).view(np.uint32) & _EXP)))
    return top != _EXP


@kernel
def f16_bits_to_f32(h):  # type: ignore[no-untyped-def]
    """float32 value of float16 bits ``h`` (exact, like numpy's cast).

    All three cases are computed and one selected, so the loop vectorizes. Every step
    is cast back to 32 bits (numba computes integers in 64), so it vectorizes 16 lanes
    wide, not 8: 2.6x faster than the same steps left in 64 bits.
    """
    a = _I(_I(h) & _I(0x7FFF))
    shifted = _I(a * _I(1 << 13))  # exponent and mantissa in float32's fields
    special = _I(shifted | _I(0x7F800000))  # inf / NaN (payload kept)
    normal = _I(shifted + _I(0x38000000))  # rebias the exponent 15 -> 127
    tiny = np.float32(np.float32(a) * _TWO_M24).view(np.int32)  # zero/subnormal: exact
    bits = normal if a >= _I(0x400) else tiny
    bits = special if a >= _I(0x7C00) else bits
    sign = _U(_U(_I(h) & _I(0x8000)) * _U(1 << 16))
    return _U(_U(bits) | sign).view(np.float32)


# -- float formats ----------------------------------------------------------------------
@kernel
def encode_float(X, offset, inv_scale, fmax, shift, rebias, min_normal, sub_scale, out):  # type: ignore[no-untyped-def]
    """out (n, d) = codes of clip((X - offset) * inv_scale, -fmax, fmax) (fp16 into
    uint16, float8 into uint8); returns whether every value of X was finite."""
    n, d = X.shape
    sign_shift = _U(8 * out.itemsize - 1)
    finite = True
    for i in range(n):
        finite &= _row_is_finite(X, i)
        for j in range(d):
            x = X[i, j]
            y = min(max((x - offset[j]) * inv_scale[j], -fmax), fmax)
            out[i, j] = float_code(y, shift, rebias, min_normal, sub_scale, sign_shift)
    return finite


@kernel
def encode_float4(X, offset, inv_scale, fmax, shift, rebias, min_normal, sub_scale, out):  # type: ignore[no-untyped-def]
    """4-bit formats: two codes a byte (even dimension low); all finite?"""
    n, d = X.shape
    finite = True
    for i in range(n):
        finite &= _row_is_finite(X, i)
        for j in range(d // 2):
            a = X[i, 2 * j]
            b = X[i, 2 * j + 1]
            ya = min(max((a - offset[2 * j]) * inv_scale[2 * j], -fmax), fmax)
            yb = min(max((b - offset[2 * j + 1]) * inv_scale[2 * j + 1], -fmax), fmax)
            lo = float_code(ya, shift, rebias, min_normal, sub_scale, _U(3))
            hi = float_code(yb, shift, rebias, min_normal, sub_scale, _U(3))
            out[i, j] = lo | (hi << _U(4))
        if d % 2:
            a = X[i, d - 1]
            ya = min(max((a - offset[d - 1]) * inv_scale[d - 1], -fmax), fmax)
            out[i, d // 2] = float_code(ya, shift, rebias, min_normal, sub_scale, _U(3))
    return finite


@kernel
def encode_bf16(X, offset, inv_scale, fmax, out):  # type: ignore[no-untyped-def]
    """out (n, d) uint16 = bfloat16 bits of clip((X - offset) * inv_scale, -fmax, fmax);
    all finite?

    bfloat16 has float32's exponent range, so rounding the float32 bits at bit 16
    is the whole conversion (subnormals included).
    """
    n, d = X.shape
    finite = True
    for i in range(n):
        finite &= _row_is_finite(X, i)
        for j in range(d):
            x = X[i, j]
            y = min(max((x - offset[j]) * inv_scale[j], -fmax), fmax)
            u = np.float32(y).view(np.uint32)
            out[i, j] = np.uint16((u + _U(0x7FFF) + ((u >> _U(16)) & _U(1))) >> _U(16))
    return finite


@kernel
def decode_f16(codes, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = float16 ``codes`` (n, d) uint16 * scale + offset."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            target[r, base + j] = f16_bits_to_f32(codes[i, j]) * scale[j] + offset[j]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


@kernel
def decode_bf16(codes, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = bfloat16 ``codes`` (n, d) uint16 * scale + offset."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            value = _U(_U(codes[i, j]) << _U(16)).view(np.float32)
            target[r, base + j] = value * scale[j] + offset[j]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


@kernel
def small_float(c, params):  # type: ignore[no-untyped-def]
    """float32 value of a float8/float4 code ``c`` (an int32), with the format's
    :func:`small_float_params`: the same value as ml_dtypes' table, bit for bit.

    The magnitude's bits times ``mul`` land in a float32's exponent and mantissa fields,
    and ``rebias`` moves the exponent from the format's bias to float32's; zero and
    subnormals (exponent field 0) are exact integer multiples of the smallest
    subnormal (a normal float32: no denormal arithmetic). All cases are computed and one
    selected, in 32-bit lanes, so the loop vectorizes. On one core, 1,000 x 384 codes
    in cache: fp8 1.6 -> 7.8 G values/s, fp4 2.1 -> 6.1, against looking each code up
    in the table (a gather, which the compiler left scalar).
    """
    sign_bit, sign_mul, mul, rebias, min_normal, sub_unit, nan_from, inf_mag = params
    mag = _I(c & _I(sign_bit - _I(1)))
    normal = _I(_I(mag * mul) + rebias)
    tiny = np.float32(np.float32(mag) * sub_unit).view(np.int32)
    bits = normal if mag >= min_normal else tiny
    bits = _NAN if mag >= nan_from else bits
    bits = _INF if mag == inf_mag else bits
    sign = _U(_U(c & sign_bit) * sign_mul)  # the sign bit moved to float32's
    return _U(_U(bits) | sign).view(np.float32)


@functools.cache
def small_float_params(dtype: np.dtype[Any]) -> tuple[Any, ...] | None:
    """Parameters of :func:`small_float` for a float8/float4 ml_dtypes ``dtype``, or None
    if that formula does not give exactly the float32 values ml_dtypes gives every code
    (the caller then decodes through the table).

    ``(sign_bit, sign_mul, mul, rebias, min_normal, sub_unit, nan_from, inf_mag)``:
    magnitudes from ``nan_from`` up decode to ml_dtypes' NaN, magnitude ``inf_mag`` to
    infinity (both beyond every magnitude when the format has none).
    """
    import ml_dtypes

    info = ml_dtypes.finfo(dtype)
    bits = int(info.bits)
    mant, bias = int(info.nmant), 1 - int(info.minexp)
    with np.errstate(invalid="ignore"):
        table = np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float32)
    half = 1 << (bits - 1)
    mag = np.arange(half, dtype=np.int64)
    nan = np.flatnonzero(np.isnan(table[:half]))
    inf = np.flatnonzero(np.isinf(table[:half]))
    nan_from = int(nan[0]) if nan.size else half
    inf_mag = int(inf[0]) if inf.size == 1 else half
    params = (half, 1 << (23 - mant), (127 - bias) << 23, 1 << mant, 2.0 ** (1 - bias - mant))
    sign_bit, mul, rebias, min_normal, sub_unit = params
    # the formula, in numpy
    normal = (mag * mul + rebias).astype(np.uint32)
    tiny = (mag.astype(np.float32) * np.float32(sub_unit)).view(np.uint32)
    value = np.where(mag >= min_normal, normal, tiny)
    value = np.where(mag >= nan_from, np.uint32(_NAN), value)
    value = np.where(mag == inf_mag, np.uint32(_INF), value).astype(np.uint32)
    expected = table.view(np.uint32)
    negative = value | np.uint32(1 << 31)
    if not (np.array_equal(value, expected[:half]) and np.array_equal(negative, expected[half:])):
        return None
    return (
        np.int32(sign_bit),
        np.uint32((1 << 31) // sign_bit),
        *(np.int32(v) for v in (mul, rebias, min_normal)),
        np.float32(sub_unit),
        np.int32(nan_from),
        np.int32(inf_mag),
    )


@kernel
def decode_float8(codes, params, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = value of the float8 ``codes`` (n, d) * scale + offset."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            target[r, base + j] = small_float(_I(codes[i, j]), params) * scale[j] + offset[j]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


@kernel
def decode_float4(codes, params, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = value of the float4 codes (two a byte, even dimension low)
    * scale + offset."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d // 2):
            c = _I(codes[i, j])
            low = small_float(_I(c & _I(15)), params)
            high = small_float(_I(c >> _I(4)), params)
            target[r, base + 2 * j] = low * scale[2 * j] + offset[2 * j]
            target[r, base + 2 * j + 1] = high * scale[2 * j + 1] + offset[2 * j + 1]
        if d % 2:
            last = small_float(_I(_I(codes[i, d // 2]) & _I(15)), params)
            target[r, base + d - 1] = last * scale[d - 1] + offset[d - 1]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


# -- uniform integer levels -------------------------------------------------------------
@kernel
def _int_code(x, inv_step, low, top):  # type: ignore[no-untyped-def]
    """clip(rint((x - low) * inv_step), 0, top) as an integer, like IntQuantizer's numpy path.

    ``x - low`` first: it is exact for x within a factor 2 of ``low`` (Sterbenz), where
    a folded ``x * inv_step - low * inv_step`` cancels two large rounded products (codes
    off by 3 levels for values 1e4 +- 0.04, by 26 at 1e5).
    """
    y = min(max((x - low) * inv_step, np.float32(0)), top)
    return np.float32(y + _ROUNDER).view(np.uint32) & _U(0xFF)


@kernel
def encode_int8(X, inv_step, low, top, out):  # type: ignore[no-untyped-def]
    n, d = X.shape
    finite = True
    for i in range(n):
        finite &= _row_is_finite(X, i)
        for j in range(d):
            x = X[i, j]
            out[i, j] = _int_code(x, inv_step[j], low[j], top)
    return finite


@kernel
def encode_int4(X, inv_step, low, top, out):  # type: ignore[no-untyped-def]
    n, d = X.shape
    finite = True
    for i in range(n):
        finite &= _row_is_finite(X, i)
        for j in range(d // 2):
            a = X[i, 2 * j]
            b = X[i, 2 * j + 1]
            lo = _int_code(a, inv_step[2 * j], low[2 * j], top)
            hi = _int_code(b, inv_step[2 * j + 1], low[2 * j + 1], top)
            out[i, j] = lo | (hi << _U(4))
        if d % 2:
            a = X[i, d - 1]
            out[i, d // 2] = _int_code(a, inv_step[d - 1], low[d - 1], top)
    return finite


@kernel
def decode_int8(codes, step, low, out, stream):  # type: ignore[no-untyped-def]
    """out = codes * step + low, rounded after each operation like numpy."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            target[r, base + j] = np.float32(codes[i, j]) * step[j] + low[j]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


@kernel
def decode_int4(codes, step, low, out, stream):  # type: ignore[no-untyped-def]
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d // 2):
            c = codes[i, j]
            target[r, base + 2 * j] = np.float32(c & 15) * step[2 * j] + low[2 * j]
            target[r, base + 2 * j + 1] = np.float32(c >> 4) * step[2 * j + 1] + low[2 * j + 1]
        if d % 2:
            target[r, base + d - 1] = np.float32(codes[i, d // 2] & 15) * step[d - 1] + low[d - 1]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)
