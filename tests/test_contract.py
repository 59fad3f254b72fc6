"""One contract suite over every registered stage and a spread of specs."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from matching import assert_codes_match

import embcomp
from embcomp import (
    DimensionMismatchError,
    InputError,
    NotFittedError,
    SpecError,
    codec_from_bytes,
    codec_to_bytes,
    make_codec,
)
from embcomp.codec import STAGE_FACTORIES
from embcomp.quantizers import FORMATS
from embcomp.spec import STAGES

QUANTIZERS = [
    name for name, info in STAGES.items() if info.kind == "quantizer" and info.arg == "none"
]
SPECS = QUANTIZERS + [
    "pca16,fp8",
    "pca24,int8",
    "pca,int4",
    "pca8,bin",
    "pca12,fp16",
    "rot,int4",
    "rot,fp8e5m2",
    "l2norm,fp8",
    "l2norm,pca20,fp8e5m2",
    "pca13,fp4",
    "mpad8,fp8",
    "l2norm,mpad6,int8",
    "pca,alloc12",
    "pca,alloc3",
    "pca16,alloc5",
    "l2norm,alloc7",
]


def test_every_stage_name_is_covered_by_the_contract_suite():
    covered = {stage.name for spec in SPECS for stage in embcomp.parse_spec(spec).stages}
    assert covered == set(STAGES) & (set(STAGE_FACTORIES) | {"l2norm"})


@pytest.fixture(scope="module", params=SPECS)
def fitted(request, rng_data):
    return make_codec(request.param).fit(rng_data)


def test_shapes_dtypes_and_code_size(fitted, rng_data):
    codes = fitted.encode(rng_data)
    assert codes.dtype == np.uint8
    assert codes.shape == (rng_data.shape[0], fitted.code_size)
    assert fitted.code_size == fitted.spec.code_size(rng_data.shape[1])
    decoded = fitted.decode(codes)
    assert decoded.dtype == np.float32 and decoded.shape == rng_data.shape
    reduced = fitted.decode(codes, reduced=True)
    assert reduced.shape == (rng_data.shape[0], fitted.d_out)
    assert np.isfinite(decoded).all()


def test_deterministic_fit_and_encode(fitted, rng_data):
    again = make_codec(str(fitted.spec)).fit(rng_data)
    assert codec_to_bytes(again) == codec_to_bytes(fitted)
    np.testing.assert_array_equal(again.encode(rng_data), fitted.encode(rng_data))


def test_save_load_gives_identical_codes(fitted, rng_data, tmp_path):
    path = embcomp.save_codec(fitted, tmp_path / "c.codec")
    loaded = embcomp.load_codec(path)
    assert str(loaded.spec) == str(fitted.spec) and loaded.options == fitted.options
    codes = fitted.encode(rng_data)
    np.testing.assert_array_equal(loaded.encode(rng_data), codes)
    np.testing.assert_array_equal(loaded.decode(codes), fitted.decode(codes))
    assert codec_to_bytes(codec_from_bytes(codec_to_bytes(fitted))) == codec_to_bytes(fitted)


def test_input_layouts_give_same_codes(fitted, rng_data):
    codes = fitted.encode(rng_data)
    np.testing.assert_array_equal(fitted.encode(rng_data.astype(np.float64)), codes)
    strided = np.asfortranarray(rng_data)
    np.testing.assert_array_equal(fitted.encode(strided), codes)
    doubled = np.repeat(rng_data, 2, axis=0)[::2]  # non-contiguous rows
    np.testing.assert_array_equal(fitted.encode(doubled), codes)
    assert_codes_match(fitted, fitted.encode(rng_data[:1]), codes[:1])  # a 2-row BLAS call
    assert fitted.encode(rng_data[:0]).shape == (0, fitted.code_size)
    assert fitted.decode(codes[:0]).shape == (0, rng_data.shape[1])


def test_encode_leaves_input_unchanged(fitted, rng_data):
    before = rng_data.copy()
    fitted.encode(rng_data)
    np.testing.assert_array_equal(rng_data, before)


def test_fit_leaves_input_unchanged_whatever_its_dtype(fitted, rng_data):
    as32 = rng_data.astype(np.float32)  # a float32 array is used without a copy
    as64 = rng_data.astype(np.float64)  # a float64 one is converted (normalized in place)
    before32, before64 = as32.copy(), as64.copy()
    codec32 = make_codec(str(fitted.spec)).fit(as32)
    codec64 = make_codec(str(fitted.spec)).fit(as64)
    np.testing.assert_array_equal(as32, before32)
    np.testing.assert_array_equal(as64, before64)
    assert codec_to_bytes(codec64) == codec_to_bytes(codec32)


def test_not_fitted():
    codec = make_codec("pca8,int8")
    for call in (
        lambda: codec.encode(np.zeros((2, 16), np.float32)),
        lambda: codec.decode(np.zeros((2, 8), np.uint8)),
        lambda: codec.code_size,
        lambda: codec_to_bytes(codec),
    ):
        with pytest.raises(NotFittedError, match="fit"):
            call()


def test_bad_input(fitted, rng_data):
    d = rng_data.shape[1]
    bad = rng_data[:10].copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError, match="row 7"):
        fitted.encode(bad)
    bad[7, 3] = np.inf
    with pytest.raises(InputError, match="row 7"):
        fitted.encode(bad)
    with pytest.raises(DimensionMismatchError, match=f"{d - 1} dims.*{d}"):
        fitted.encode(rng_data[:, :-1])
    with pytest.raises(InputError, match="dtype int64"):
        fitted.encode(np.zeros((2, d), dtype=np.int64))
    with pytest.raises(InputError, match="2-D"):
        fitted.encode(rng_data[0])
    with pytest.raises(DimensionMismatchError, match="code_size"):
        fitted.decode(np.zeros((2, fitted.code_size + 1), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        fitted.decode(np.zeros((2, fitted.code_size), np.int16))


def test_failed_refit_leaves_the_codec_as_it_was(fitted, rng_data, monkeypatch):
    # Every stage's last fitting step raises: the codec keeps its old stages, whole.
    before = codec_to_bytes(fitted)
    codes = fitted.encode(rng_data[:50])
    other = np.ascontiguousarray(rng_data[:, ::-1] * 3 + 1)

    def fail(self):
        raise RuntimeError("fit failed at its last step")

    monkeypatch.setattr(type(fitted.quantizer), "_after_load", fail)
    with pytest.raises(RuntimeError, match="last step"):
        fitted.fit(other)
    monkeypatch.undo()
    assert codec_to_bytes(fitted) == before
    np.testing.assert_array_equal(fitted.encode(rng_data[:50]), codes)


def test_refit_that_does_not_suit_new_data_keeps_the_old_fit(rng_data):
    narrow = np.ascontiguousarray(rng_data[:, :1])
    quantizer = embcomp.quantizers.AllocQuantizer(4).fit(rng_data[:, :8])
    with pytest.raises(DimensionMismatchError, match="alloc1"):
        quantizer.fit(narrow)  # 4 bytes are more than 8 bits for one dimension
    assert quantizer.d_ == 8 and quantizer.order_.shape == (8,)
    with pytest.raises(DimensionMismatchError, match="8-dim"):
        quantizer.encode(narrow[:5])  # refused, not read out of bounds
    codec = make_codec("pca4,alloc3").fit(rng_data[:, :8])
    codes = codec.encode(rng_data[:20, :8])
    with pytest.raises(InputError):
        codec.fit(rng_data[:, :16] * np.float32(1e20))  # the reducer fits, the quantizer not
    assert codec.d_in == 8
    np.testing.assert_array_equal(codec.encode(rng_data[:20, :8]), codes)
    assert codec_to_bytes(codec_from_bytes(codec_to_bytes(codec))) == codec_to_bytes(codec)


@pytest.mark.parametrize("spec", [s for s in SPECS if make_codec(s).reducer is not None])
def test_fit_with_a_fitted_reducer_equals_a_fresh_fit(spec, rng_data):
    """``fit(X, reducer=r)`` fits only the quantizer: one PCA shared by several codecs
    gives each the bytes a fresh fit gives, and the shared reducer is not touched."""
    fresh = make_codec(spec).fit(rng_data)
    shared = make_codec(spec).fit(rng_data).reducer
    before = codec_to_bytes(make_codec(spec).fit(rng_data, reducer=shared))
    assert before == codec_to_bytes(fresh)
    codec = make_codec(spec).fit(rng_data, reducer=shared)
    assert codec.reducer is not shared
    codec.fit(rng_data[::-1] * 2)  # an ordinary codec: a refit refits every stage
    assert codec_to_bytes(make_codec(spec).fit(rng_data, reducer=shared)) == before


def test_fit_refuses_a_reducer_the_codec_would_not_have_fitted(rng_data):
    pca8 = make_codec("pca8,int8").fit(rng_data).reducer
    with pytest.raises(InputError, match="no reducer stage"):
        make_codec("int8").fit(rng_data, reducer=pca8)
    with pytest.raises(InputError, match="settings of codec pca6,int8"):
        make_codec("pca6,int8").fit(rng_data, reducer=pca8)
    with pytest.raises(InputError, match="fitted PCAReducer"):
        make_codec("pca8,int8").fit(rng_data, reducer=make_codec("mpad8,int8").reducer)
    with pytest.raises(NotFittedError):
        make_codec("pca8,int8").fit(rng_data, reducer=make_codec("pca8,int8").reducer)
    with pytest.raises(InputError, match="fitted on 48 dims; the training vectors have 16"):
        make_codec("pca8,int8").fit(rng_data[:, :16], reducer=pca8)


def test_fit_rejects_bad_training_data(rng_data):
    with pytest.raises(InputError, match="empty"):
        make_codec("int8").fit(rng_data[:0])
    bad = rng_data.copy()
    bad[5, 0] = np.nan
    with pytest.raises(InputError, match="row 5"):
        make_codec("pca8,int8").fit(bad)
    with pytest.raises(DimensionMismatchError, match="pca64"):
        make_codec("pca64,int8").fit(rng_data)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(SpecError, match="percentile"):
        make_codec("int8", percentil=99)


def _float_error_bound(fmt: str, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    info = ml_dtypes.finfo(FORMATS[fmt].dtype)
    relative = 2.0 ** -(int(info.nmant) + 1)
    return np.abs(x) * relative + scale * float(info.smallest_subnormal) / 2 + 1e-7


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16", "fp8", "fp8e5m2", "fp4"])
@pytest.mark.parametrize("scale", ["dim", "global", "none"])
def test_float_error_bounds(fmt, scale, rng_data):
    codec = make_codec(fmt, scale=scale).fit(rng_data)
    decoded = codec.decode(codec.encode(rng_data))
    if fmt == "fp32":
        np.testing.assert_array_equal(decoded, rng_data)
        return
    scale_ = codec.quantizer.scale_
    offset = codec.quantizer.offset_.astype(np.float64)
    assert offset.any() == (scale != "none")  # centred whenever scaled
    # Fitted scales never clip training data; unscaled fp4 (max 6) clips |x| > 6.
    limit = codec.quantizer.format.max * scale_.astype(np.float64)
    centred = rng_data - offset
    if scale != "none":
        assert (np.abs(centred) <= limit * (1 + 1e-6)).all()
    clipped = np.clip(centred, -limit, limit)
    # the format's rounding of the centred value, plus float32's of x - offset and + offset
    float32_rounding = 2.0**-23 * (np.abs(rng_data) + np.abs(offset))
    bound = _float_error_bound(fmt, clipped, scale_) + float32_rounding
    assert (np.abs(decoded - (clipped + offset)) <= bound).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_int_error_bound(bits, rng_data):
    codec = make_codec(f"int{bits}").fit(rng_data)
    decoded = codec.decode(codec.encode(rng_data))
    step = codec.quantizer.step_
    assert (np.abs(decoded - rng_data) <= step / 2 + 1e-6).all()


def test_bin_decodes_to_side_means(rng_data):
    codec = make_codec("bin").fit(rng_data)
    decoded = codec.decode(codec.encode(rng_data))
    q = codec.quantizer
    assert np.all((decoded == q.low_) | (decoded == q.high_))
    above = rng_data > q.center_
    np.testing.assert_allclose(decoded.mean(axis=0), rng_data.mean(axis=0), atol=1e-5)
    np.testing.assert_array_equal(decoded == q.high_, above)


@pytest.mark.parametrize("spec", ["pca16,fp32", "pca16,int8", "rot,fp16", "pca,fp32"])
def test_project_queries_ranks_like_decoded_vectors(spec, rng_data):
    codec = make_codec(spec).fit(rng_data)
    base, queries = rng_data[:400], rng_data[400:450] * 1.7
    codes = codec.encode(base)
    full = queries @ codec.decode(codes).T
    reduced = codec.project_queries(queries) @ codec.decode(codes, reduced=True).T
    offset = queries @ codec.reducer.mean_ if codec.reducer is not None else 0
    np.testing.assert_allclose(reduced + offset[:, None], full, rtol=1e-4, atol=1e-3)
    l2_full = ((queries[:, None, :] - codec.decode(codes)[None]) ** 2).sum(-1)
    l2_red = (
        (
            codec.project_queries(queries, metric="l2")[:, None, :]
            - codec.decode(codes, reduced=True)[None]
        )
        ** 2
    ).sum(-1)
    if spec.startswith("pca16"):  # the dropped components add a per-query constant
        l2_red = l2_red + (l2_full - l2_red)[:, :1]
    np.testing.assert_allclose(l2_red, l2_full, rtol=1e-4, atol=1e-2)


def test_centered_ip_query_would_rank_wrongly(rng_data):
    """Guards the documented pitfall: centering the query changes IP rankings."""
    codec = make_codec("pca16,fp32").fit(rng_data)
    base, queries = rng_data[:400], rng_data[400:450]
    reduced = codec.decode(codec.encode(base), reduced=True)
    right = np.argsort(-(codec.project_queries(queries) @ reduced.T), axis=1)[:, :10]
    wrong = np.argsort(-(codec.reducer.transform(queries) @ reduced.T), axis=1)[:, :10]
    truth = np.argsort(-(queries @ codec.decode(codec.encode(base)).T), axis=1)[:, :10]
    np.testing.assert_array_equal(right, truth)
    assert (wrong != truth).any()


def test_whitened_pca_l2_projection_refused(rng_data):
    codec = make_codec("pca8,fp32", whiten=True).fit(rng_data)
    with pytest.raises(SpecError, match="orthonormal"):
        codec.project_queries(rng_data[:3], metric="l2")
