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

import numpy as np

from .._jit import finish_row, finish_stream, kernel, stream_start

_U = np.uint32
_EXP = np.uint32(0x7F800000)  # exponent bits of float32: all set means inf or NaN
_ROUNDER = np.float32(2.0**23)
_TWO_M24 = np.float32(2.0**-24)  # float16 subnormal unit


# -- scalar conversions -----------------------------------------------------------------
@kernel
def float_code(y, shift, rebias, min_normal, sub_scale, sign_shift):  # type: ignore[no-untyped-def]
    """Bits of float32 ``y`` in a smaller float format, nearest-even like ml_dtypes/numpy.

    ``|y|`` must not exceed the format's max (callers clip first). For a format with
    ``m`` mantissa bits and exponent bias ``B`` (see :func:`float_format_params`):
    a normal result (``|y| >= 2**(1-B)``) is ``|y|``'s float32 bits with the exponent
    rebiased from 127 to ``B`` and rounded at bit ``shift = 23 - m``; a subnormal one
    is ``rint(|y| * 2**(B+m-1))`` (an exact scaling by a power of two). Both are
    computed and one is selected, so the loop vectorizes.
    """
    u = np.float32(y).view(np.uint32)
    a = u & _U(0x7FFFFFFF)
    normal = (a - rebias + (_U(1) << (shift - _U(1))) - _U(1) + ((a >> shift) & _U(1))) >> shift
    sub = np.float32(abs(y) * sub_scale + _ROUNDER).view(np.uint32) & _U(0x7FFFFF)
    code = normal if a >= min_normal else sub
    return code | ((u >> _U(31)) << sign_shift)


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
    doing both does not (2-3x slower).
    """
    top = _U(0)
    for j in range(X.shape[1]):
        top = max(top, np.float32(X[i, j]).view(np.uint32) & _EXP)
    return top != _EXP


@kernel
def f16_bits_to_f32(h):  # type: ignore[no-untyped-def]
    """float32 value of float16 bits ``h`` (exact, like numpy's cast).

    All three cases are computed and one selected, so the loop vectorizes.
    """
    h = _U(h)
    sign = (h & _U(0x8000)) << _U(16)
    a = h & _U(0x7FFF)
    special = _EXP | ((a & _U(0x3FF)) << _U(13))  # inf / NaN (payload kept)
    normal = (a << _U(13)) + _U(0x38000000)  # rebias the exponent 15 -> 127
    tiny = np.float32(np.float32(a) * _TWO_M24).view(np.uint32)  # zero/subnormal: exact
    bits = special if a >= _U(0x7C00) else (normal if a >= _U(0x400) else tiny)
    return _U(sign | bits).view(np.float32)


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
def decode_table(codes, lut, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = lut[codes] * scale + offset (8-bit codes, one a byte)."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            target[r, base + j] = lut[codes[i, j]] * scale[j] + offset[j]
        if stream:
            carry = finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        finish_stream(flat, n * d, target, carry)


@kernel
def decode_table4(codes, lut, scale, offset, out, stream):  # type: ignore[no-untyped-def]
    """out (n, d) float32 = lut[nibble] * scale + offset (4-bit codes, even dimension low)."""
    n, d = out.shape
    target, base, flat, lead = stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d // 2):
            c = codes[i, j]
            target[r, base + 2 * j] = lut[c & 15] * scale[2 * j] + offset[2 * j]
            target[r, base + 2 * j + 1] = lut[c >> 4] * scale[2 * j + 1] + offset[2 * j + 1]
        if d % 2:
            target[r, base + d - 1] = lut[codes[i, d // 2] & 15] * scale[d - 1] + offset[d - 1]
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
