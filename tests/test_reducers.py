import numpy as np
import pytest

from embcomp import InputError, NotFittedError, PCAReducer, RandomRotation, make_codec
from embcomp.reducers._base import streamed_mean_cov


def test_pca_matches_svd_and_is_orthonormal(rng_data):
    pca = PCAReducer(10).fit(rng_data)
    centered = rng_data - rng_data.mean(axis=0)
    _, s, vt = np.linalg.svd(centered.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(pca.components_), np.abs(vt[:10]), atol=1e-4)
    np.testing.assert_allclose(
        pca.explained_variance_, s[:10] ** 2 / (len(rng_data) - 1), rtol=1e-4
    )
    gram = pca.components_ @ pca.components_.T
    np.testing.assert_allclose(gram, np.eye(10), atol=1e-5)
    rows = np.arange(10)
    assert (pca.components_[rows, np.abs(pca.components_).argmax(axis=1)] > 0).all()


def test_pca_full_round_trip(rng_data):
    pca = PCAReducer().fit(rng_data)
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(rng_data)), rng_data, atol=1e-4)


def test_pca_whitening_gives_unit_variance(rng_data):
    pca = PCAReducer(8, whiten=True).fit(rng_data)
    z = pca.transform(rng_data)
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1.0, rtol=1e-3)
    plain = PCAReducer(8).fit(rng_data)
    np.testing.assert_allclose(
        pca.inverse_transform(z), plain.inverse_transform(plain.transform(rng_data)), atol=1e-4
    )


@pytest.mark.parametrize("spec", ["pca48,int8", "pca48,fp8", "pca,int4", "pca48,bf16"])
def test_pca_components_the_training_vectors_do_not_span_are_zero(spec):
    # 40 training vectors span 39 dims (after centring), fewer than the 48 kept. The
    # other axes are arbitrary, and projections on them are float32 rounding noise: a
    # quantizer fitted per dimension spread it over all its codes, so codes changed with
    # how rows were batched (int8: by up to 193 levels). They are zero rows now.
    rng = np.random.default_rng(11)
    d = 64
    train = (rng.standard_normal((40, d)) * 0.05 + 0.3).astype(np.float32)
    codec = make_codec(spec).fit(train)
    pca = codec.reducer
    spanned = 39
    assert (pca.explained_variance_[:spanned] > 1e-6).all()
    assert (pca.explained_variance_[spanned:] == 0).all()
    assert not pca.components_[spanned : pca.n_components_].any()
    assert np.abs(pca.components_[:spanned]).max(axis=1).min() > 0.1
    # New vectors project to exactly 0 there, and their codes do not depend on batching.
    X = (rng.standard_normal((300, d)) * 0.05 + 0.3).astype(np.float32)
    assert not pca.transform(X)[:, spanned:].any()
    codes = codec.encode(X)
    for cut in (1, 77, 150):
        np.testing.assert_array_equal(
            np.concatenate([codec.encode(X[:cut]), codec.encode(X[cut:])]), codes
        )
    # The spanned axes hold all of the training vectors: nothing was lost.
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(train)), train, atol=1e-6)


def test_pca_of_identical_vectors_keeps_no_axis(rng_data):
    X = np.repeat(rng_data[:1], 20, axis=0)
    pca = PCAReducer(4).fit(X)
    assert not pca.components_.any() and not pca.explained_variance_.any()
    np.testing.assert_array_equal(pca.inverse_transform(pca.transform(X)), X)


def test_streamed_covariance_is_exact_with_a_large_mean():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((20000, 5)) * 1e-3 + 1e3).astype(np.float32)
    mean, cov, n = streamed_mean_cov(X, block_rows=1000)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(mean, X64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(X64, rowvar=False), rtol=1e-6, atol=1e-12)
    assert n == 20000


def test_pca_fit_on_memmap_streams(tmp_path, rng_data):
    path = tmp_path / "x.npy"
    np.save(path, rng_data)
    mm = np.load(path, mmap_mode="r")
    np.testing.assert_allclose(
        PCAReducer(5).fit(mm).components_, PCAReducer(5).fit(rng_data).components_, atol=1e-6
    )


def test_rotation_is_orthogonal_and_seeded(rng_data):
    a = RandomRotation(seed=1).fit(rng_data)
    b = RandomRotation(seed=1).fit(rng_data)
    c = RandomRotation(seed=2).fit(rng_data)
    np.testing.assert_allclose(a.components_ @ a.components_.T, np.eye(48), atol=1e-5)
    np.testing.assert_array_equal(a.components_, b.components_)
    assert not np.allclose(a.components_, c.components_)


def test_reducer_errors(rng_data):
    with pytest.raises(NotFittedError):
        PCAReducer(4).transform(rng_data)
    with pytest.raises(InputError, match="at least 2"):
        PCAReducer(1).fit(rng_data[:1])
    assert PCAReducer(4).get_params() == {"n_components": 4, "whiten": False}


def test_standalone_reducers_check_their_arguments_and_data():
    from embcomp import SpecError
    from embcomp.reducers import MPADReducer

    X = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(SpecError, match="n_components must be None or an integer >= 1"):
        PCAReducer(-1).fit(X)
    with pytest.raises(SpecError, match="seed must be an integer >= 0"):
        RandomRotation(seed=-1).fit(X)
    for reducer in (RandomRotation(), MPADReducer(4), PCAReducer(4)):
        with pytest.raises(InputError, match="row 5 contains NaN or inf"):
            reducer.fit(bad)
