"""Comparing results that pass through a BLAS matrix product.

BLAS rounds a product's last bit differently with the shape of the call: how many rows
it holds and where a row sits in it (OpenBLAS on an AMD EPYC: 5% of the values of a
384 -> 192 projection change between a 2-row and a 1,024-row call). So the same vector
encoded alone, in another block, by another engine or through the service can be
reduced to values an ulp apart, and a value near a rounding boundary of the quantizer
then gets the neighbouring code. Codecs without a reducer are element-wise: their
results never depend on grouping and are compared exactly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from embcomp import Codec
from embcomp.quantizers import FloatQuantizer, IntQuantizer

# Share of values that may take a neighbouring level (measured: up to 0.08% of codes).
MAX_CHANGED = 0.01


def _equal_without_reducer(codec: Codec, got: np.ndarray, want: np.ndarray) -> bool:
    """Same shape and dtype; for an element-wise codec (no reducer) equal, and True."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if codec.reducer is None:
        np.testing.assert_array_equal(got, want)
    return codec.reducer is None


def assert_vectors_match(codec: Codec, got: np.ndarray, want: np.ndarray) -> None:
    """Float outputs (decoded vectors, projected queries): equal up to float32 rounding."""
    got, want = np.asarray(got), np.asarray(want)
    if _equal_without_reducer(codec, got, want):
        return
    top = float(np.abs(want).max(initial=0.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * top)


def assert_codes_match(codec: Codec, got: np.ndarray, want: np.ndarray) -> None:
    """Codes: equal, except that a few values may take a neighbouring level."""
    got, want = np.asarray(got), np.asarray(want)
    if _equal_without_reducer(codec, got, want):
        return
    a = codec.decode(got, reduced=True).astype(np.float64)
    b = codec.decode(want, reduced=True).astype(np.float64)
    q = codec.quantizer
    if isinstance(q, FloatQuantizer) and q.fmt == "fp32":  # the reduced values themselves
        assert_vectors_match(codec, a, b)
        return
    assert np.mean(a != b) <= MAX_CHANGED, f"{np.mean(a != b):.2%} of values changed"
    if isinstance(q, IntQuantizer):
        level = q.step_.astype(np.float64)
    elif isinstance(q, FloatQuantizer):
        info = ml_dtypes.finfo(q.format.dtype)
        # one step of the format at the centred value, or its smallest step near 0
        steps = 2.0 ** (1 - int(info.nmant)) * np.abs(b - q.offset_)
        level = steps + q.scale_.astype(np.float64) * float(info.smallest_subnormal)
    else:  # other quantizers: only the share of changes is bounded
        return
    assert (np.abs(a - b) <= level * (1 + 1e-6) + 1e-12).all()
