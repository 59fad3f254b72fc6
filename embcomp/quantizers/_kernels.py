"""Compiled one-pass kernels for the scalar quantizers (used when ``embcomp._jit`` is on).

Each kernel works on one C-contiguous block and writes straight into the caller's
output. Each computes what the numpy path of its quantizer computes, with the same
float32 operations in the same order, so the bytes are identical (the tests check
both paths against the same references). Encoders also return whether every input
was finite, so the caller needs no separate pass to check (it re-checks with
:func:`embcomp._validation.check_finite` only to name the bad row).

Bit tricks used here:

- ``np.float32(y).view(np.uint32)`` reinterprets a float's bits (no conversion).
- Round to nearest, ties to even, at bit ``s`` of an unsigned ``u``:
  ``(u + (1 << (s - 1)) - 1 + ((u >> s) & 1)) >> s``.
- ``y + 2**23`` for ``0 <= y < 2**23`` rounds ``y`` to an integer (ties to even) and
  leaves it in the float's low mantissa bits.
"""

from __future__ import annotations

import numpy as np

from .._jit import kernel

_U = np.uint32
_EXP = np.uint32(0x7F800000)  # exponent bits of float32: all set means inf or NaN
_ROUNDER = np.float32(2.0**23)
_TWO_M24 = np.float32(2.0**-24)  # float16 subnormal unit


# -- scalar conversions -----------------------------------------------------------------
@kernel
def f32_to_f16_bits(y):  # type: ignore[no-untyped-def]
    """float16 bits of float32 ``y`` (|y| <= 65504), nearest-even like numpy's cast."""
    u = np.float32(y).view(np.uint32)
    sign = (u >> _U(16)) & _U(0x8000)
    a = u & _U(0x7FFFFFFF)
    if a >= _U(0x38800000):  # normal float16 (|y| >= 2**-14): rebias exponent 127 -> 15
        h = (a - _U(0x38000000) + _U(0xFFF) + ((a >> _U(13)) & _U(1))) >> _U(13)
    elif a < _U(0x33000000):  # |y| <= 2**-25 rounds to zero (2**-25 itself: tie to even)
        h = _U(0)
    else:  # subnormal float16: the 24-bit significand shifted down 14..24 bits
        s = _U(126) - (a >> _U(23))
        m = (a & _U(0x7FFFFF)) | _U(0x800000)
        h = (m + (_U(1) << (s - _U(1))) - _U(1) + ((m >> s) & _U(1))) >> s
    return np.uint16(sign | h)


@kernel
def f16_bits_to_f32(h):  # type: ignore[no-untyped-def]
    """float32 value of float16 bits ``h`` (exact, like numpy's cast)."""
    h = _U(h)
    sign = (h & _U(0x8000)) << _U(16)
    a = h & _U(0x7FFF)
    if a >= _U(0x7C00):  # inf / NaN (payload kept)
        return _U(sign | _EXP | ((a & _U(0x3FF)) << _U(13))).view(np.float32)
    if a >= _U(0x400):  # normal: rebias exponent 15 -> 127
        return _U(sign | ((a << _U(13)) + _U(0x38000000))).view(np.float32)
    v = np.float32(a) * _TWO_M24  # zero / subnormal: a * 2**-24, exact
    return -v if sign else v


@kernel
def f32_to_bf16_bits(y):  # type: ignore[no-untyped-def]
    """bfloat16 bits of finite float32 ``y`` (|y| <= bf16 max), nearest-even like ml_dtypes."""
    u = np.float32(y).view(np.uint32)
    return np.uint16((u + _U(0x7FFF) + ((u >> _U(16)) & _U(1))) >> _U(16))


# -- float formats ----------------------------------------------------------------------
@kernel
def encode_f16(X, inv_scale, fmax, out):  # type: ignore[no-untyped-def]
    """out (n, d) uint16 = float16 bits of clip(X * inv_scale, -fmax, fmax); all finite?"""
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d):
            x = X[i, j]
            bad |= _U((np.float32(x).view(np.uint32) & _EXP) == _EXP)
            y = min(max(x * inv_scale[j], -fmax), fmax)
            out[i, j] = f32_to_f16_bits(y)
    return bad == 0


@kernel
def encode_bf16(X, inv_scale, fmax, out):  # type: ignore[no-untyped-def]
    """out (n, d) uint16 = bfloat16 bits of clip(X * inv_scale, -fmax, fmax); all finite?"""
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d):
            x = X[i, j]
            bad |= _U((np.float32(x).view(np.uint32) & _EXP) == _EXP)
            y = min(max(x * inv_scale[j], -fmax), fmax)
            out[i, j] = f32_to_bf16_bits(y)
    return bad == 0


@kernel
def _small_float_code(y, table, shift, mask):  # type: ignore[no-untyped-def]
    """float8/float4 code of ``y`` by the table of ``_SmallFloatTable`` (clip included)."""
    u = np.float32(y).view(np.uint32)
    return table[(((u & mask) + mask) | u) >> shift]


@kernel
def encode_small_float(X, inv_scale, table, shift, mask, out):  # type: ignore[no-untyped-def]
    """8-bit formats: out (n, d) uint8 = table code of X * inv_scale; all finite?"""
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d):
            x = X[i, j]
            bad |= _U((np.float32(x).view(np.uint32) & _EXP) == _EXP)
            out[i, j] = _small_float_code(x * inv_scale[j], table, shift, mask)
    return bad == 0


@kernel
def encode_small_float4(X, inv_scale, table, shift, mask, out):  # type: ignore[no-untyped-def]
    """4-bit formats: two codes a byte (even dimension low); all finite?"""
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d // 2):
            a = X[i, 2 * j]
            b = X[i, 2 * j + 1]
            bad |= _U((np.float32(a).view(np.uint32) & _EXP) == _EXP)
            bad |= _U((np.float32(b).view(np.uint32) & _EXP) == _EXP)
            lo = _small_float_code(a * inv_scale[2 * j], table, shift, mask)
            hi = _small_float_code(b * inv_scale[2 * j + 1], table, shift, mask)
            out[i, j] = lo | (hi << 4)
        if d % 2:
            a = X[i, d - 1]
            bad |= _U((np.float32(a).view(np.uint32) & _EXP) == _EXP)
            out[i, d // 2] = _small_float_code(a * inv_scale[d - 1], table, shift, mask)
    return bad == 0


@kernel
def decode_f16(codes, scale, out):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = float16 ``codes`` (n, d) uint16 * scale."""
    n, d = out.shape
    for i in range(n):
        for j in range(d):
            out[i, j] = f16_bits_to_f32(codes[i, j]) * scale[j]


@kernel
def decode_bf16(codes, scale, out):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = bfloat16 ``codes`` (n, d) uint16 * scale."""
    n, d = out.shape
    for i in range(n):
        for j in range(d):
            out[i, j] = _U(_U(codes[i, j]) << _U(16)).view(np.float32) * scale[j]


@kernel
def decode_table(codes, lut, scale, out):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = lut[codes] * scale (8-bit codes, one a byte)."""
    n, d = out.shape
    for i in range(n):
        for j in range(d):
            out[i, j] = lut[codes[i, j]] * scale[j]


@kernel
def decode_table4(codes, lut, scale, out):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = lut[nibble] * scale (4-bit codes, even dimension low)."""
    n, d = out.shape
    for i in range(n):
        for j in range(d // 2):
            c = codes[i, j]
            out[i, 2 * j] = lut[c & 15] * scale[2 * j]
            out[i, 2 * j + 1] = lut[c >> 4] * scale[2 * j + 1]
        if d % 2:
            out[i, d - 1] = lut[codes[i, d // 2] & 15] * scale[d - 1]


# -- uniform integer levels -------------------------------------------------------------
@kernel
def _int_code(x, inv_step, offset, top):  # type: ignore[no-untyped-def]
    """clip(rint(x * inv_step + offset), 0, top) as an integer, like IntQuantizer's numpy path."""
    y = min(max(x * inv_step + offset, np.float32(0)), top)
    return np.float32(y + _ROUNDER).view(np.uint32) & _U(0xFF)


@kernel
def encode_int8(X, inv_step, offset, top, out):  # type: ignore[no-untyped-def]
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d):
            x = X[i, j]
            bad |= _U((np.float32(x).view(np.uint32) & _EXP) == _EXP)
            out[i, j] = _int_code(x, inv_step[j], offset[j], top)
    return bad == 0


@kernel
def encode_int4(X, inv_step, offset, top, out):  # type: ignore[no-untyped-def]
    n, d = X.shape
    bad = _U(0)
    for i in range(n):
        for j in range(d // 2):
            a = X[i, 2 * j]
            b = X[i, 2 * j + 1]
            bad |= _U((np.float32(a).view(np.uint32) & _EXP) == _EXP)
            bad |= _U((np.float32(b).view(np.uint32) & _EXP) == _EXP)
            lo = _int_code(a, inv_step[2 * j], offset[2 * j], top)
            hi = _int_code(b, inv_step[2 * j + 1], offset[2 * j + 1], top)
            out[i, j] = lo | (hi << _U(4))
        if d % 2:
            a = X[i, d - 1]
            bad |= _U((np.float32(a).view(np.uint32) & _EXP) == _EXP)
            out[i, d // 2] = _int_code(a, inv_step[d - 1], offset[d - 1], top)
    return bad == 0


@kernel
def decode_int8(codes, step, low, out):  # type: ignore[no-untyped-def]
    """out = codes * step + low, rounded after each operation like numpy."""
    n, d = out.shape
    for i in range(n):
        for j in range(d):
            out[i, j] = np.float32(codes[i, j]) * step[j] + low[j]


@kernel
def decode_int4(codes, step, low, out):  # type: ignore[no-untyped-def]
    n, d = out.shape
    for i in range(n):
        for j in range(d // 2):
            c = codes[i, j]
            out[i, 2 * j] = np.float32(c & 15) * step[2 * j] + low[2 * j]
            out[i, 2 * j + 1] = np.float32(c >> 4) * step[2 * j + 1] + low[2 * j + 1]
        if d % 2:
            out[i, d - 1] = np.float32(codes[i, d // 2] & 15) * step[d - 1] + low[d - 1]
