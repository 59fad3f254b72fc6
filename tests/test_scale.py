"""Numerics across scales: a codec does the same thing to X and to 2**k * X, or says why not.

Embeddings of other models come at other scales (unit norm, norm ~10, raw features in
the thousands). Scaling by a power of two is exact in float32, so within float32's
range every quantizer must give the very same codes, and decoded values scaled by the
same power of two. Where float32 itself runs out (squares of values near 1e20, values
near 1e-38) the codec raises an InputError that says so, instead of returning garbage.
"""

from __future__ import annotations

import numpy as np
import pytest
from matching import assert_codes_match, assert_vectors_match

from embcomp import InputError, make_codec
from embcomp.quantizers import IntQuantizer
from embcomp.reducers import PCAReducer
from embcomp.search import search_codes


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """(400, 24) offset anisotropic data with a constant and an all-zero dimension."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((400, 24)) * np.logspace(0, -2, 24) + 0.3
    X[:, 5] = 0.3
    X[:, 9] = 0.0
    return X.astype(np.float32)


@pytest.mark.parametrize(
    "spec", ["fp16", "bf16", "fp8", "fp8e5m2", "fp4", "int8", "int4", "bin", "alloc10"]
)
@pytest.mark.parametrize("power", [-40, 40])
def test_codes_do_not_depend_on_a_power_of_two_scale(data, spec, power):
    scale = np.float32(2.0**power)
    plain = make_codec(spec).fit(data)
    scaled = make_codec(spec).fit(data * scale)
    codes = plain.encode(data)
    np.testing.assert_array_equal(scaled.encode(data * scale), codes)
    np.testing.assert_array_equal(scaled.decode(codes), plain.decode(codes) * scale)


@pytest.mark.parametrize("power", [-100, -60, 60, 100])
def test_l2norm_gives_unit_rows_at_any_scale(data, power):
    scale = np.float32(2.0**power)
    plain = make_codec("l2norm,int8").fit(data)
    scaled = make_codec("l2norm,int8").fit(data * scale)
    np.testing.assert_array_equal(scaled.encode(data * scale), plain.encode(data))
    rows = np.vstack([data[:3] * scale, np.zeros((1, data.shape[1]), np.float32)])
    exact = make_codec("l2norm,fp32").fit(data)
    unit = exact.decode(exact.encode(rows))
    np.testing.assert_allclose(np.linalg.norm(unit[:3], axis=1), 1.0, rtol=1e-6)
    expected = data[:3] / np.linalg.norm(data[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(unit[:3], expected, rtol=1e-6)
    assert not unit[3].any()  # a zero row stays zero


def test_l2norm_of_ordinary_rows_is_the_float32_computation(data):
    codec = make_codec("l2norm,fp32").fit(data)
    expected = data / np.sqrt(np.einsum("ij,ij->i", data, data))[:, None]
    np.testing.assert_array_equal(codec.decode(codec.encode(data)), expected)


@pytest.mark.parametrize("value", [0.3, -7.77, 123456.7, 1e30, -3.3e-15, 0.0])
@pytest.mark.parametrize("bits", [8, 4])
def test_int_constant_dimension_decodes_to_itself_at_any_magnitude(value, bits):
    train = np.full((50, 2), value, dtype=np.float32)
    train[:, 1] = np.linspace(-1, 1, 50)
    q = IntQuantizer(bits).fit(train)
    assert np.isfinite(q.step_).all() and (q.step_ > 0).all()
    np.testing.assert_array_equal(q.decode(q.encode(train))[:, 0], train[:, 0])


@pytest.mark.parametrize("spec", ["int8", "fp8", "pca,int8", "bin"])
def test_values_near_float32_underflow_are_refused_by_name(data, spec):
    with pytest.raises(InputError, match=r"2\*\*-64"):
        make_codec(spec).fit(data * np.float32(1e-30))
    # normalized first, the same vectors are fine
    make_codec("l2norm," + spec).fit(data * np.float32(1e-30))


@pytest.mark.parametrize("factor", [1e-16, 1e20])
def test_alloc_refuses_values_its_float32_distances_cannot_hold(data, factor):
    with pytest.raises(InputError, match=r"alloc10 computes squared distances in float32"):
        make_codec("alloc10").fit(data * np.float32(factor))
    codec = make_codec("l2norm,alloc10").fit(data * np.float32(factor))
    assert np.isfinite(codec.decode(codec.encode(data * np.float32(factor)))).all()


def test_pca_fits_values_whose_variance_exceeds_float32(data):
    big = data * np.float32(2.0**66)  # squares ~2**132: beyond float32's ~2**128
    pca = PCAReducer(8).fit(big)
    assert pca.explained_variance_.dtype == np.float64
    np.testing.assert_allclose(
        pca.explained_variance_, PCAReducer(8).fit(data).explained_variance_ * 2.0**132, rtol=1e-6
    )
    codec = make_codec("pca8,int8").fit(big)
    decoded = codec.decode(codec.encode(big)) / np.float32(2.0**66)
    small = make_codec("pca8,int8").fit(data)
    np.testing.assert_allclose(decoded, small.decode(small.encode(data)), rtol=1e-4, atol=1e-5)


def test_whitened_pca_of_rank_deficient_data_stays_finite(data):
    X = np.hstack([data[:, :6], data[:, :6]])  # rank 5 (column 5 is constant) of 12
    pca = PCAReducer(whiten=True).fit(X)
    assert np.isfinite(pca.components_).all() and np.isfinite(pca.inverse_components_).all()
    Z = pca.transform(X)
    np.testing.assert_allclose(Z[:, :5].std(axis=0, ddof=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(pca.inverse_transform(Z), X, atol=1e-4)


def _with_huge_row(data: np.ndarray, row: int) -> np.ndarray:
    X = data.astype(np.float64)
    X[row, 3] = 1e300  # finite in float64, inf in float32
    return X


@pytest.mark.parametrize("spec", ["int8", "pca8,int8", "l2norm,fp8"])
def test_float64_values_beyond_float32_are_named_not_warned(data, spec):
    huge = _with_huge_row(data, 17)
    message = r"row 17 holds 1e\+300, beyond float32's range"
    with pytest.raises(InputError, match="training vectors " + message):
        make_codec(spec).fit(huge)
    codec = make_codec(spec).fit(data)
    with pytest.raises(InputError, match="X " + message):
        codec.encode(huge)
    with pytest.raises(InputError, match="queries " + message):
        codec.project_queries(huge)
    with pytest.raises(InputError, match="queries " + message):
        search_codes(codec, codec.encode(data), huge, k=3)
    with pytest.raises(InputError, match="training vectors " + message):
        PCAReducer(4).fit(huge)


@pytest.mark.parametrize("spec", ["bf16", "fp16", "fp8", "fp8e5m2", "fp4"])
def test_a_dimension_of_near_zero_values_decodes_to_zero_on_both_paths(spec):
    """amax / target below float32's smallest normal made 1 / scale inf, and 0 * inf NaN."""
    from embcomp import _jit

    X = np.array([[1.0, 1e-40], [-1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    results = []
    for compiled in (True, False) if _jit.AVAILABLE else (False,):
        old = _jit.set_enabled(compiled)
        try:
            codec = make_codec(spec).fit(X)
            codes = codec.encode(X)
            results.append((codes, codec.decode(codes)))
        finally:
            _jit.set_enabled(old)
    for codes, decoded in results:
        assert np.isfinite(decoded).all() and (np.abs(decoded[:, 1]) <= 1e-39).all()
        np.testing.assert_array_equal(codes, results[0][0])


@pytest.mark.parametrize("spec", ["rot,fp32", "pca,fp32", "pca20,int8"])
def test_a_fitted_codec_computes_what_it_computes_after_save_and_load(spec):
    from embcomp import codec_from_bytes, codec_to_bytes

    X = np.random.default_rng(1).standard_normal((300, 40)).astype(np.float32)
    fitted = make_codec(spec).fit(X)
    loaded = codec_from_bytes(codec_to_bytes(fitted))
    codes = fitted.encode(X)
    np.testing.assert_array_equal(loaded.encode(X), codes)
    np.testing.assert_array_equal(loaded.decode(codes), fitted.decode(codes))
    np.testing.assert_array_equal(loaded.project_queries(X), fitted.project_queries(X))


@pytest.mark.parametrize(
    "spec",
    ["l2norm,pca16,fp16", "pca,fp8", "rot,int8", "mpad4,int8", "pca5,int8", "pca13,fp16", "fp8"],
)
def test_a_vector_alone_gets_the_codes_it_gets_in_a_batch(data, spec):
    """Up to BLAS rounding (see tests/matching.py): a one-row product, which BLAS would
    take down its matrix-vector path, is computed as two rows, and a value's code can
    only move to a neighbouring level (a service encodes one query at a time)."""
    codec = make_codec(spec).fit(data)
    codes = codec.encode(data)
    one_by_one = np.concatenate([codec.encode(data[i : i + 1]) for i in range(len(data))])
    assert_codes_match(codec, one_by_one, codes)
    decoded = np.concatenate([codec.decode(codes[i : i + 1]) for i in range(len(data))])
    assert_vectors_match(codec, decoded, codec.decode(codes))
    queries = np.concatenate([codec.project_queries(data[i : i + 1]) for i in range(50)])
    assert_vectors_match(codec, queries, codec.project_queries(data[:50]))


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_int_codes_are_exact_roundings_even_far_from_zero(offset):
    """(x - min) / step, not x / step - min / step: the latter cancels two big rounded
    products (codes were off by 3 levels at 1e4 +- 0.04, by 26 at 1e5)."""
    X = (offset + 0.01 * np.random.default_rng(0).standard_normal((5000, 8))).astype(np.float32)
    q = IntQuantizer(8).fit(X)
    levels = (X.astype(np.float64) - q.min_) / q.step_.astype(np.float64)
    exact = np.clip(np.rint(levels), 0, 255)
    tie = np.abs(levels - np.floor(levels) - 0.5) < 1e-3  # float32's 1/step may tip these
    codes = q.encode(X)
    assert np.abs(codes.astype(int) - exact).max() <= 1
    np.testing.assert_array_equal(codes[~tie], exact[~tie])


def test_training_rows_that_overflow_in_the_reducer_are_named():
    X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    X[:, :3] = np.where(np.arange(200) % 2, 3e38, -3e38)[:, None]  # finite; their sum is not
    with pytest.raises(InputError, match="training row 0 becomes inf after the reducer"):
        make_codec("pca8,int8").fit(X)
