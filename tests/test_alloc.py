"""The byte-budget transform coder ``alloc{bytes}``: exact sizes, allocation invariants,
determinism, level and k-means fitting, and recall floors on real embeddings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from memory import peak_bytes

import embcomp
import embcomp._jit as jit
from embcomp import DimensionMismatchError, InputError, SpecError, codec_to_bytes, make_codec
from embcomp._blocks import Scratch
from embcomp.evaluation import exact_knn, recall_at_k
from embcomp.quantizers import AllocQuantizer, _alloc_kernels
from embcomp.quantizers._alloc import _Batch, greedy_bits, water_fill
from embcomp.quantizers._alloc_kernels import row_sums
from embcomp.quantizers._kmeans import assign, kmeans
from embcomp.quantizers._levels import (
    SortedColumns,
    fit_levels,
    float_format_values,
    nearest_level_codes,
)


def _gaussian(n: int, d: int, seed: int = 0, decay: float = 0.9) -> np.ndarray:
    """Correlated Gaussian data whose principal variances fall geometrically."""
    rng = np.random.default_rng(seed)
    scales = decay ** np.arange(d)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return ((rng.standard_normal((n, d)) * scales) @ basis.T + 0.1).astype(np.float32)


# Tests taking the ``path`` fixture run on the numpy path and, with numba installed, on
# the compiled kernels (embcomp._jit); both must give the same bytes.
PATHS = ["numpy", "jit"] if jit.AVAILABLE else ["numpy"]
needs_numba = pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed")


@pytest.fixture(params=PATHS)
def path(request):
    old = jit.set_enabled(request.param == "jit")
    yield request.param
    jit.set_enabled(old)


def _both_paths(codec, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of X and their decoded vectors, asserting both paths give the same bits."""
    old = jit.set_enabled(False)
    try:
        codes = codec.encode(X)
        decoded = codec.decode(codes)
        if jit.AVAILABLE:
            jit.set_enabled(True)
            np.testing.assert_array_equal(codec.encode(X), codes)
            assert codec.decode(codes).tobytes() == decoded.tobytes()
    finally:
        jit.set_enabled(old)
    return codes, decoded


def _per_component_bits(q: AllocQuantizer) -> np.ndarray:
    """Bits per component in variance order (a k-means group shares its bits)."""
    bits = np.zeros(q.order_.shape[0])
    for first, size, unit_bits in q.units_:
        bits[first : first + size] = unit_bits / size
    return bits


# -- allocation ------------------------------------------------------------------------
def test_water_fill_sums_to_the_budget_and_is_monotone():
    rng = np.random.default_rng(0)
    for d in (1, 3, 17, 200):
        variances = np.sort(rng.lognormal(0, 2, d))[::-1]
        for total in (1, d // 2 + 1, 2 * d, 8 * d):
            rates = water_fill(variances, total)
            assert rates.sum() == pytest.approx(total, abs=1e-6)
            assert (rates >= 0).all() and (rates <= 8).all()
            assert (np.diff(rates) <= 1e-12).all()  # more variance, never fewer bits
    rates = water_fill(np.array([4.0, 1.0, 0.0]), 3)
    assert rates[2] == 0 and rates[0] - rates[1] == pytest.approx(1.0)  # 0.5 log2(4)


def test_greedy_bits_is_exact_and_monotone():
    rng = np.random.default_rng(1)
    for d in (1, 5, 64):
        variances = np.sort(rng.lognormal(0, 1.5, d))[::-1]
        distortion = variances[:, None] * 4.0 ** -np.arange(9)  # Gaussian high-rate law
        for total in (0, 1, 3 * d, 8 * d):
            bits = greedy_bits(distortion, np.ones(d), total)
            assert bits.sum() == total and bits.min() >= 0 and bits.max() <= 8
            assert (np.diff(bits) <= 0).all()
    with pytest.raises(ValueError, match="cannot place"):
        greedy_bits(np.ones((2, 9)), np.ones(2), 17)


@pytest.mark.parametrize("d", [3, 16, 48, 100])
def test_code_size_is_exactly_the_budget(d, path):
    X = _gaussian(500, d, seed=d)
    budgets = sorted({1, 2, 3, d // 4 + 1, d // 2 + 1, d - 1, d} - {0})
    for budget in budgets:
        codec = make_codec(f"alloc{budget}", kmeans_iters=4).fit(X)
        codes = codec.encode(X)
        assert codec.code_size == budget == codes.shape[1] == codec.spec.code_size(d)
        q = codec.quantizer
        assert int(q.units_[:, 2].sum()) + q.norm_bits_ == 8 * budget
        assert np.isfinite(codec.decode(codes)).all()


def test_allocation_follows_the_variance():
    X = _gaussian(3000, 64, seed=2, decay=0.93)
    for budget in (8, 24, 48):  # metric="l2": by variance alone (ip adds the mean's share)
        codec = make_codec(f"pca,alloc{budget}", kmeans_iters=4, metric="l2").fit(X)
        q = codec.quantizer
        np.testing.assert_array_equal(q.order_, np.arange(64))  # PCA output is sorted
        scalar = q.units_[q.units_[:, 1] == 1]
        groups = q.units_[q.units_[:, 1] > 1]
        np.testing.assert_array_equal(scalar[:, 0], np.arange(len(scalar)))
        assert (np.diff(scalar[:, 2]) <= 0).all()  # more variance, never fewer bits
        assert (np.diff(groups[:, 2] / groups[:, 1]) <= 1e-12).all()
        full = groups[groups[:, 2] == q.vq_bits]  # (a last group may get fewer bits)
        assert (np.diff(full[:, 1]) >= 0).all()  # smaller variance, bigger groups
        assert (groups[:, 0] >= len(scalar)).all()
        assert (scalar[:, 2] <= 8).all() and (groups[:, 2] <= q.vq_bits).all()


def test_without_rotation_dimensions_are_sorted_by_variance():
    rng = np.random.default_rng(3)
    scales = rng.permutation(np.geomspace(3.0, 0.01, 24))
    X = (rng.standard_normal((2000, 24)) * scales).astype(np.float32)
    q = make_codec("alloc10", kmeans_iters=4).fit(X).quantizer
    np.testing.assert_array_equal(q.order_, np.argsort(-scales, kind="stable"))
    bits = _per_component_bits(q)
    assert (np.diff(bits) <= 1e-9).all(), bits


def test_more_budget_means_less_error(path):
    X = _gaussian(2000, 32, seed=4)
    errors = []
    for budget in (2, 4, 8, 16, 32):
        codec = make_codec(f"pca,alloc{budget}", kmeans_iters=8).fit(X)
        errors.append(float(((codec.decode(codec.encode(X)) - X) ** 2).sum(1).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_scalar_only_and_vector_only_extremes(path):
    X = _gaussian(1500, 32, seed=5)
    scalar = make_codec("pca,alloc16", vq_below=0.0).fit(X).quantizer
    assert (scalar.units_[:, 1] == 1).all()
    vector = make_codec("pca,alloc16", vq_below=9.0, kmeans_iters=4).fit(X).quantizer
    assert (vector.units_[:, 1] > 1).any()
    assert vector.units_[:, 2].sum() + vector.norm_bits_ == 128


def test_reduced_pca_then_alloc(path):
    X = _gaussian(800, 40, seed=6)
    codec = make_codec("pca16,alloc6", kmeans_iters=4).fit(X)
    assert codec.d_out == 16 and codec.code_size == 6 and str(codec.spec) == "pca16,alloc6"
    assert codec.decode(codec.encode(X), reduced=True).shape == (800, 16)


def test_norm_code_restores_norms(path):
    X = _gaussian(3000, 48, seed=7)
    plain = make_codec("pca,alloc8", norm_bits=0, kmeans_iters=8).fit(X)
    fixed = make_codec("pca,alloc8", norm_bits=6, kmeans_iters=8).fit(X)
    centered = X - X.mean(0)

    def norm_error(codec):
        decoded = codec.decode(codec.encode(X)) - X.mean(0)
        return np.abs(np.linalg.norm(decoded, axis=1) / np.linalg.norm(centered, axis=1) - 1)

    assert norm_error(fixed).mean() < 0.5 * norm_error(plain).mean()
    assert fixed.quantizer.norm_levels_.shape == (64,)
    assert (np.diff(fixed.quantizer.norm_levels_) >= 0).all()


@pytest.mark.parametrize("levels", ["uniform", "lloyd", "float"])
def test_level_kinds_round_trip_through_artifacts(levels, tmp_path, path):
    X = _gaussian(1200, 24, seed=8)
    codec = make_codec("pca,alloc20", levels=levels, kmeans_iters=4).fit(X)
    loaded = embcomp.load_codec(embcomp.save_codec(codec, tmp_path / "a.codec"))
    codes = codec.encode(X)
    np.testing.assert_array_equal(loaded.encode(X), codes)
    np.testing.assert_array_equal(loaded.decode(codes), codec.decode(codes))
    assert loaded.options["levels"] == levels


def test_deterministic_and_seeded(path):
    X = _gaussian(1500, 32, seed=9)
    a = make_codec("pca,alloc6", kmeans_iters=6).fit(X)
    b = make_codec("pca,alloc6", kmeans_iters=6).fit(X)
    assert codec_to_bytes(a) == codec_to_bytes(b)
    c = make_codec("pca,alloc6", kmeans_iters=6, seed=1).fit(X)
    assert codec_to_bytes(c) != codec_to_bytes(a)


def test_bad_options_and_budgets():
    X = _gaussian(300, 8, seed=10)
    with pytest.raises(DimensionMismatchError, match="alloc8"):
        make_codec("alloc9").fit(X)
    make_codec("alloc8", kmeans_iters=2).fit(X)  # 8 bits on every dim (+ norm code)
    with pytest.raises(SpecError, match="levels"):
        make_codec("alloc4", levels="nonuniform").fit(X)
    with pytest.raises(SpecError, match="weight"):
        make_codec("alloc4", weight=2).fit(X)
    with pytest.raises(SpecError, match="norm_bits"):
        make_codec("alloc1", norm_bits=8).fit(X)
    with pytest.raises(SpecError, match="vq_bits"):
        make_codec("alloc4", vq_bits=9).fit(X)
    with pytest.raises(SpecError, match="needs a number"):
        embcomp.parse_spec("pca,alloc")
    assert str(embcomp.parse_spec(" PCA , ALLOC96 ")) == "pca,alloc96"
    assert embcomp.parse_spec("pca,alloc96").code_size(384) == 96


def test_describe():
    X = _gaussian(1000, 32, seed=11)
    info = make_codec("pca,alloc10", kmeans_iters=4).fit(X).quantizer.describe()
    assert info["budget_bits"] == 80
    coded = sum(info["vq_group_sizes"]) + info["scalar_components"]
    assert coded + info["uncoded_components"] == 32


# -- the two encode paths ----------------------------------------------------------------
def _awkward_rows(X: np.ndarray, q: AllocQuantizer, rng: np.random.Generator) -> np.ndarray:
    """Rows where rounding decides: values on level boundaries and on levels, points
    equidistant from two centroids, far outliers, zeros, repeats."""
    rows = [X[:200], np.zeros((2, X.shape[1]), np.float32), X[:3] * 50.0, X[:3] * -1e6]
    on_edges = np.repeat(X[:1], 8, axis=0).copy()
    for s, column in enumerate(q._scalar_columns):
        n_levels = 1 << int(q._scalar_bits[s])
        edges = q._scalar_thresholds[s, : n_levels - 1]
        levels = q._scalar_table[s, :n_levels]
        if edges.size:
            on_edges[:4, column] = rng.choice(edges, 4)
            on_edges[4:, column] = rng.choice(levels, 4)
    rows.append(on_edges)
    for batch in q._batches:  # midpoints between two centroids of each k-means unit
        G, K, g = batch.centroids.shape
        mid = np.repeat(X[:1], 4, axis=0).copy()
        for member in range(G):
            a, b = rng.choice(K, 2, replace=False)
            point = 0.5 * (batch.centroids[member, a] + batch.centroids[member, b])
            mid[:, batch.columns[member * g : (member + 1) * g]] = point
        rows.append(mid)
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


@needs_numba
@pytest.mark.parametrize(
    "spec,options",
    [
        ("pca,alloc12", {}),
        ("pca,alloc20", {"levels": "uniform"}),
        ("pca,alloc20", {"levels": "float"}),
        ("pca,alloc7", {"norm_bits": 0}),
        ("pca,alloc16", {"vq_below": 0.0}),
        ("pca,alloc16", {"vq_below": 9.0}),
        ("pca,alloc30", {"vq_bits": 5, "norm_bits": 7}),
        ("alloc10", {}),
        ("l2norm,alloc9", {"levels": "uniform"}),
        ("pca20,alloc5", {}),
    ],
)
def test_compiled_kernels_give_the_numpy_bytes(spec, options):
    rng = np.random.default_rng(21)
    X = _gaussian(2500, 48, seed=22)
    codec = make_codec(spec, kmeans_iters=4, **options).fit(X)
    q = codec.quantizer
    awkward = _awkward_rows(X, q, rng) if codec.reducer is None and not codec.spec.normalize else X
    for data in (X, awkward, X[::-1], X[:1], X[:0]):
        _both_paths(codec, data)
    # The quantizer alone (no reducer): values on its boundaries, centroid midpoints.
    Z = np.ascontiguousarray(codec.reducer.transform(X) if codec.reducer else X, np.float32)
    awkward = _awkward_rows(Z, q, rng)
    old = jit.set_enabled(False)
    try:
        want = q.encode(awkward)
        back = q.decode(want)
        jit.set_enabled(True)
        np.testing.assert_array_equal(q.encode(awkward), want)
        assert q.decode(want).tobytes() == back.tobytes()
    finally:
        jit.set_enabled(old)


def test_crowded_boundaries_in_one_column_give_exact_codes_on_both_paths():
    """Half of column 0 crowds into a 1e-6-wide interval, so its Lloyd boundaries do
    too, and the level index's cells there hold up to ~30 boundaries: every column's
    count then allows that many steps (which made pca,alloc384 10x slower on MiniLM),
    and the steps stop at the first boundary above the value."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4000, 8)).astype(np.float32)
    X[rng.random(4000) < 0.5, 0] *= 1e-6
    q = AllocQuantizer(8, vq_below=0.0, norm_bits=0).fit(X)
    index, columns = q._level_index, q._scalar_columns
    assert index._steps >= 8  # the crowding this test is about
    thresholds = index._thresholds[:, :-1]
    # values on the boundaries, just beside them, and the data
    on = np.empty((500, 8), dtype=np.float32)
    on[:, columns] = thresholds[np.arange(len(columns)), rng.integers(0, 255, (500, 1))]
    data = np.concatenate([X, on, np.nextafter(on, -np.inf), np.nextafter(on, np.inf)])
    data = np.ascontiguousarray(data, dtype=np.float32)
    want = nearest_level_codes(data[:, columns], thresholds, q.units_[:, 2])  # reference
    np.testing.assert_array_equal(index.codes(np.ascontiguousarray(data[:, columns])), want)
    old = jit.set_enabled(False)
    try:
        numpy_codes = q.encode(data)
        if jit.AVAILABLE:
            jit.set_enabled(True)
            np.testing.assert_array_equal(q.encode(data), numpy_codes)
    finally:
        jit.set_enabled(old)


@needs_numba
def test_compiled_kernels_on_ties_and_overflow():
    # Few distinct points: k-means repeats centroids, so scores tie exactly (the lowest
    # index wins); huge values overflow the scores to inf (the careful path).
    rng = np.random.default_rng(23)
    X = np.repeat(rng.standard_normal((5, 12)).astype(np.float32), 40, axis=0)
    q = AllocQuantizer(4, vq_below=9.0, kmeans_iters=3).fit(X)
    assert (q.units_[:, 1] > 1).any()
    top = np.abs(X[:4]).max()
    huge = np.concatenate([X[:4] * (1e30 / top), X[:4] * (-3e38 / top), X[:4]])
    for data in (X, huge):
        old = jit.set_enabled(False)
        try:
            want = q.encode(data)
            jit.set_enabled(True)
            np.testing.assert_array_equal(q.encode(data), want)
        finally:
            jit.set_enabled(old)


@pytest.mark.parametrize("compiled", [False, True] if jit.AVAILABLE else [False])
def test_nearest_kernel_is_np_argmin_of_the_exact_scores(compiled):
    """``_nearest_rows`` (k-means units) against np.argmin of the scores accumulated
    in j order by fused multiply-adds: exact ties go to the lowest index, -0.0 equals
    +0.0 (the first one wins), and rows at or above ``safe_bits`` are left to the careful path."""
    nearest = _alloc_kernels._nearest_rows
    if not compiled:
        nearest = getattr(nearest, "py_func", nearest)
    rng = np.random.default_rng(31)
    safe_bits = np.float32(100.0).view(np.uint32)
    # g: one pass of each length (1-4), then 4 + 1..4 and 4 + 4 + 2 (middle passes)
    for g, rows in itertools.product((1, 2, 3, 4, 5, 6, 7, 8, 9, 10), (20, 6)):
        for k in (1, 7, 64, 300):
            C = rng.integers(-3, 4, size=(k, g)).astype(np.float32)  # many exact ties
            augmented = np.concatenate([-2.0 * C.T, (C * C).sum(1)[None]]).astype(np.float32)
            X = rng.integers(-3, 4, size=(20, g + 3)).astype(np.float32) / 2
            X[7] *= 1000  # above safe_bits: skipped
            tops = np.abs(X).max(axis=1).view(np.uint32)
            cols = rng.permutation(g + 3)[:g].astype(np.int64)
            codes = np.full((20, 2), 7777, np.uint32)
            scratch = (np.empty((4, k), np.float32), np.empty(20, np.int64))
            args = (tops, safe_bits, cols, 0, g, augmented.ravel(), 0, k, *scratch)
            # rows below safe_bits in groups of four, then a short group (3 of 19, 1 of 5)
            nearest(X, 0, rows, *args, codes, 1)
            for i in range(X.shape[0]):
                scores = augmented[g].copy()
                for j in range(g):
                    scores = jit.fma32(X[i, cols[j]], augmented[j], scores)
                want = 7777 if i == 7 or i >= rows else np.argmin(scores)
                assert codes[i, 1] == want, (g, k, i)
            assert (codes[:, 0] == 7777).all()
    # Scores 3, +0.0, -0.0, 1, -0.0 (x = 0 times negative weights adds -0.0): index 1.
    augmented = np.array([[-1, -1, -1, -1, -1], [3, 0.0, -0.0, 1, -0.0]], np.float32)
    codes = np.zeros((1, 1), np.uint32)
    zeros = np.zeros(1, np.int64)
    args = (zeros.view(np.uint32)[:1], safe_bits, zeros, 0, 1, augmented.ravel(), 0, 5)
    scratch = (np.empty((4, 5), np.float32), np.empty(1, np.int64))
    nearest(np.zeros((1, 1), np.float32), 0, 1, *args, *scratch, codes, 0)
    assert codes[0, 0] == 1


def test_non_finite_input_is_refused(path):
    X = _gaussian(600, 16, seed=24)
    for spec in ("alloc6", "pca,alloc6"):
        codec = make_codec(spec, kmeans_iters=2).fit(X)
        for bad in (np.nan, np.inf):
            Y = X[:300].copy()
            Y[137, 5] = bad
            with pytest.raises(InputError, match="137"):
                codec.encode(Y)


def test_near_ties_follow_the_exact_scores():
    """The numpy path takes the BLAS argmin except within BLAS's rounding error of a
    tie, where it uses the exact scores (fused multiply-adds in component order, as
    the kernel)."""
    rng = np.random.default_rng(25)
    G, K, g = 3, 16, 3
    centroids = rng.standard_normal((G, K, g)).astype(np.float32)
    mean = np.zeros(G * g, np.float32)
    batch = _Batch(np.arange(G), np.arange(G * g), centroids, mean)
    pick = rng.integers(0, K, (500, G, 2))
    mids = 0.5 * (centroids[np.arange(G), pick[..., 0]] + centroids[np.arange(G), pick[..., 1]])
    X = np.concatenate([mids.reshape(500, -1), rng.standard_normal((500, G * g))])
    X = np.ascontiguousarray(X, dtype=np.float32)
    found = batch.encode(X, Scratch())
    for member in range(G):
        x = X[:, member * g : (member + 1) * g]
        exact = np.repeat(batch._augmented[member, g][None], len(X), axis=0)
        for j in range(g):
            exact = jit.fma32(x[:, j, None], batch._augmented[member, j][None], exact)
        np.testing.assert_array_equal(found[:, member], np.argmin(exact, axis=1))


def test_row_sums_follow_numpy():
    rng = np.random.default_rng(26)
    for d in [1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 136, 255, 256, 257, 384, 767, 768, 1500]:
        A = (rng.standard_normal((3, d)) * rng.lognormal(0, 3, d)).astype(np.float32)
        assert row_sums(A).tobytes() == A.sum(axis=1).tobytes()


# -- scalar levels ---------------------------------------------------------------------
def test_levels_mse_matches_brute_force_and_lloyd_wins():
    rng = np.random.default_rng(12)
    X = np.column_stack([rng.standard_normal(4000) * 3, rng.laplace(size=4000) + 5])
    columns = SortedColumns(X)
    for bits in range(0, 9):
        mse = {}
        for kind in ("uniform", "lloyd", "float"):
            levels = fit_levels(columns, bits, kind)
            assert levels.shape == (2, 1 << bits)
            assert (np.diff(levels, axis=1) >= 0).all()
            mse[kind] = columns.mse(levels)
            nearest = np.abs(X[:, :, None] - levels[None]).argmin(axis=2)
            brute = ((X - np.take_along_axis(levels.T, nearest, 0)) ** 2).mean(0)
            np.testing.assert_allclose(mse[kind], brute, rtol=1e-9, atol=1e-12)
        assert (mse["lloyd"] <= mse["uniform"] * (1 + 1e-9)).all()
    # Uniform levels with an MSE-optimal range on N(0, 1): 4 bits ~ 0.0115 (Max 1960).
    gaussian = SortedColumns(rng.standard_normal((50000, 1)))
    assert gaussian.mse(fit_levels(gaussian, 4, "uniform"))[0] == pytest.approx(0.0115, rel=0.05)
    assert gaussian.mse(fit_levels(gaussian, 4, "lloyd"))[0] == pytest.approx(0.0095, rel=0.05)


def test_float_format_tables():
    assert float_format_values(4).tolist()[-1] == 6.0
    assert float_format_values(8).max() == 448.0
    for bits in (4, 6, 8):
        values = float_format_values(bits)
        assert values.shape == (1 << bits,) and np.isfinite(values).all()


def test_nearest_level_codes_mixed_widths():
    rng = np.random.default_rng(13)
    X = rng.standard_normal((500, 3)).astype(np.float32)
    bits = np.array([1, 5, 8])
    thresholds = np.full((3, 255), np.inf, dtype=np.float32)
    for j, b in enumerate(bits):
        thresholds[j, : (1 << b) - 1] = np.sort(rng.standard_normal((1 << b) - 1))
    codes = nearest_level_codes(X, thresholds, bits)
    for j, b in enumerate(bits):
        expected = np.searchsorted(thresholds[j, : (1 << b) - 1], X[:, j], side="right")
        np.testing.assert_array_equal(codes[:, j], expected)


# -- k-means ---------------------------------------------------------------------------
def test_kmeans_finds_separated_clusters_deterministically():
    rng = np.random.default_rng(14)
    centers = rng.standard_normal((8, 3)) * 10
    X = (centers[rng.integers(0, 8, 2000)] + rng.standard_normal((2000, 3)) * 0.1).astype(
        np.float32
    )
    found = kmeans(X, 8, iters=20, seed=0)
    np.testing.assert_array_equal(found, kmeans(X, 8, iters=20, seed=0))
    distance = np.linalg.norm(centers[:, None] - found[None], axis=2).min(axis=1)
    assert distance.max() < 0.1
    labels = assign(X, found)
    assert np.bincount(labels, minlength=8).min() > 0


def test_kmeans_with_fewer_points_than_centroids():
    X = np.array([[0.0, 1.0], [2.0, 3.0], [0.0, 1.0]], dtype=np.float32)
    centroids = kmeans(X, 16, iters=3, seed=0)
    assert centroids.shape == (16, 2)
    np.testing.assert_array_equal(centroids[assign(X, centroids)], X)


# -- real data -------------------------------------------------------------------------
# Measured on wordnet-minilm (fit on the first 20,000 base rows, exact search over the
# decoded vectors): pca,alloc192 0.965, pca,alloc96 0.89, pca,alloc48 0.75 recall@10.
# Floors sit a little under; FAISS at the same or more bytes, in the same run, below.
REAL_FLOORS = {"pca,alloc192": 0.95, "pca,alloc48": 0.72}


def _recall(ids: np.ndarray, data: dict) -> float:
    return recall_at_k(ids, data["gt"], 10, base=data["base"], queries=data["queries"])


def _cone(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in a narrow cone, like many embedding models': a spread of slowly
    falling variances about a common axis that carries most of each vector's length.
    Returns (base, 300 queries of the same distribution)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    axis = rng.standard_normal(d)
    axis /= np.linalg.norm(axis)
    scales = np.arange(1, d + 1) ** -0.25

    def draw(m: int) -> np.ndarray:
        x = (rng.standard_normal((m, d)) * scales) @ basis.T
        x = x / np.sqrt(np.sum(scales**2)) + 1.2 * axis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(300)


@pytest.mark.parametrize("seed", [0, 1])
def test_ip_metric_weighs_the_mean_and_leads_faiss_pq_on_cone_data(seed):
    """Queries from a cone all weigh its axis heavily, though the data varies little
    along it: metric="ip" (the default) gives it the bits that inner products need.
    Measured (seeds 0-2): recall@10 0.846-0.851 at 32 B and 0.50-0.54 at 16 B, against
    0.78-0.79 and 0.38-0.42 by variance alone (metric="l2") and FAISS PQ's 0.80-0.81 and
    0.46-0.47."""
    faiss = pytest.importorskip("faiss")
    base, queries = _cone(6000, 64, seed)
    truth = _top10(base, queries)

    def recall_of(decoded: np.ndarray) -> float:
        found = _top10(decoded, queries)
        pairs = zip(found, truth, strict=True)
        return float(np.mean([np.intersect1d(f, t).size / 10 for f, t in pairs]))

    for budget in (32, 16):
        recall = {}
        for metric in ("ip", "l2"):
            codec = make_codec(f"pca,alloc{budget}", metric=metric).fit(base[:4000])
            recall[metric] = recall_of(codec.decode(codec.encode(base)))
        pq = faiss.index_factory(64, f"PQ{budget}", faiss.METRIC_INNER_PRODUCT)
        pq.do_polysemous_training = False  # codes for search by distance, not Hamming
        pq.pq.cp.min_points_per_centroid = 1  # only silences "please provide at least"
        pq.train(base[:4000])
        recall["PQ"] = recall_of(pq.sa_decode(pq.sa_encode(base)))
        assert recall["ip"] >= recall["l2"] + 0.04, (budget, recall)
        assert recall["ip"] >= recall["PQ"] + 0.02, (budget, recall)
    assert make_codec("pca,alloc16").options["metric"] == "ip"


def test_metric_l2_plans_by_variance_alone_and_ip_from_the_inputs_origin():
    X = _gaussian(3000, 32, seed=5)
    X[:, 3] = 4.0 + 0.15 * np.random.default_rng(6).standard_normal(3000)  # far from 0
    # l2: a shift of every vector changes nothing (distances between vectors keep)
    a = make_codec("alloc12", metric="l2", kmeans_iters=2).fit(X)
    b = make_codec("alloc12", metric="l2", kmeans_iters=2).fit(X - X.mean(axis=0))
    np.testing.assert_array_equal(a.quantizer.order_, b.quantizer.order_)
    np.testing.assert_array_equal(a.quantizer.units_, b.quantizer.units_)
    # ip: dimension 3's mean moves it up the order (its bits: still bounded by its variance)
    ip = make_codec("alloc12", kmeans_iters=2).fit(X)
    rank = {m: list(c.quantizer.order_).index(3) for m, c in (("ip", ip), ("l2", a))}
    assert rank["ip"] < rank["l2"], rank
    # with a reducer the origin comes from it: the codec equals its stages fitted by hand
    codec = make_codec("pca,alloc12", kmeans_iters=2).fit(X)
    Z = codec.reducer.transform(X)
    origin = codec.reducer.transform(np.zeros((1, 32), dtype=np.float32))[0]
    by_hand = AllocQuantizer(12, kmeans_iters=2).fit(Z, origin=origin)
    assert codec_bytes_equal(codec.quantizer, by_hand)
    centred = AllocQuantizer(12, kmeans_iters=2).fit(Z)  # Z's own origin: its mean, ~0
    assert not np.array_equal(centred.order_, by_hand.order_)
    assert by_hand._origin is None  # only held during the fit
    with pytest.raises(InputError, match="origin must be 32 finite values"):
        AllocQuantizer(12).fit(Z, origin=np.zeros(31))
    with pytest.raises(InputError, match="origin must be 32 finite values"):
        AllocQuantizer(12).fit(Z, origin=np.full(32, np.nan))


def codec_bytes_equal(a: AllocQuantizer, b: AllocQuantizer) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in a._state)


def test_metric_option_is_checked_and_kept_in_the_artifact(tmp_path):
    with pytest.raises(SpecError, match="metric must be one of"):
        make_codec("pca,alloc8", metric="cos").fit(_gaussian(200, 16))
    with pytest.raises(SpecError, match="option metric=2 .* wrong type"):
        make_codec("pca,alloc8", metric=2)
    codec = make_codec("pca,alloc8", metric="l2", kmeans_iters=2).fit(_gaussian(500, 16))
    loaded = embcomp.load_codec(embcomp.save_codec(codec, tmp_path / "l2.codec"))
    assert loaded.options["metric"] == "l2" and loaded.quantizer.metric == "l2"
    X = _gaussian(50, 16, seed=9)
    np.testing.assert_array_equal(loaded.encode(X), codec.encode(X))


def _top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Ids of the 10 largest inner products per query, any order (recall needs no order;
    exact_knn's exact tie-breaking is slow on quantized vectors, which tie often)."""
    found = []
    for start in range(0, len(queries), 200):
        scores = queries[start : start + 200] @ vectors.T
        found.append(np.argpartition(-scores, 9, axis=1)[:, :10])
    return np.concatenate(found)


@pytest.fixture(scope="module")
def faiss_recalls(wordnet):
    faiss = pytest.importorskip("faiss")
    base, train, queries = wordnet["base"], wordnet["base"][:20000], wordnet["queries"]
    sq4 = faiss.index_factory(base.shape[1], "SQ4", faiss.METRIC_INNER_PRODUCT)
    sq4.train(train)
    found = _top10(sq4.sa_decode(sq4.sa_encode(base)), queries)
    rabitq = faiss.index_factory(base.shape[1], "RaBitQ", faiss.METRIC_INNER_PRODUCT)
    rabitq.train(train)
    rabitq.add(base)
    rabitq.qb = 8  # 8-bit queries: within 0.001 of float queries (qb=0), 100x faster
    _, rabitq_ids = rabitq.search(queries, 10)
    return {
        "SQ4": (sq4.sa_code_size(), _recall(found, wordnet)),
        "RaBitQ": (rabitq.sa_code_size(), _recall(rabitq_ids, wordnet)),
    }


@pytest.mark.parametrize("spec,floor", REAL_FLOORS.items())
def test_real_recall_floor_and_faiss(spec, floor, wordnet, faiss_recalls):
    codec = make_codec(spec).fit(wordnet["base"][:20000])
    _, decoded = _both_paths(codec, wordnet["base"])  # the same bytes on both paths
    found = _top10(decoded, wordnet["queries"])
    recall = _recall(found, wordnet)
    assert recall >= floor, f"{spec}: recall@10 {recall:.4f} < floor {floor}"
    rival = "SQ4" if codec.code_size == 192 else "RaBitQ"
    rival_bytes, rival_recall = faiss_recalls[rival]
    assert rival_bytes >= codec.code_size
    assert recall > rival_recall + 0.02, f"{spec} {recall:.4f} vs {rival} {rival_recall:.4f}"


def test_an_installed_cancel_check_stops_long_fits_and_is_gone_after():
    """The service stops fits whose client has left through embcomp._cancel: the loops
    of alloc's k-means and MPAD call the check between steps."""
    from embcomp._cancel import cancel_when

    class Stop(Exception):
        pass

    import threading

    from embcomp._blocks import default_threads

    calls = []

    def check() -> None:  # a client that has left stays gone: raise from then on
        calls.append(threading.current_thread().name)
        if len(calls) >= 3:
            raise Stop

    X = _gaussian(600, 32)
    for spec in ("pca,alloc12", "mpad8,int8"):
        calls.clear()
        with pytest.raises(Stop), cancel_when(check):
            make_codec(spec).fit(X)
        seen = len(calls)
        assert seen >= 3  # (a thread fitting another codebook stops at its next step)
        make_codec(spec).fit(X)  # no check outside the block
        assert len(calls) == seen
    # alloc fits its k-means codebooks on every core: the workers check too
    calls.clear()
    with cancel_when(lambda: calls.append(threading.current_thread().name)):
        make_codec("alloc16", vq_below=9.0, kmeans_iters=4).fit(_gaussian(3000, 64))
    assert len(set(calls)) == min(2, default_threads()), set(calls)


def test_lloyd_levels_of_a_skewed_column_stay_inside_its_data():
    """The symmetric start left 7 of 16 levels below a lognormal column's minimum, where
    no value ever moved them (used: 9 of 16); empty levels are now re-seeded."""
    x = np.random.default_rng(4).lognormal(0.0, 1.5, (20000, 1))
    sc = SortedColumns(x)
    for bits, most in ((4, 0.7), (6, 0.1), (8, 0.01)):  # MSE was 1.16, 0.185, 0.038
        levels = fit_levels(sc, bits, "lloyd")
        assert x.min() <= levels.min() and levels.max() <= x.max()
        count, _, _ = sc.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))
        assert (count > 0).mean() > 0.9, bits
        assert sc.mse(levels)[0] < most, (bits, sc.mse(levels))
    gaussian = SortedColumns(np.random.default_rng(5).standard_normal((20000, 3)))
    for bits in (2, 4, 6):  # symmetric data keep their levels (no restart)
        levels = fit_levels(gaussian, bits, "lloyd")
        assert (gaussian.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))[0] > 0).all()


def test_norm_code_levels_are_positive_and_off_where_they_hurt_search():
    """Ratios |x - m| / |rec - m| are >= 0; at tiny budgets they reach hundreds, and the
    code fitted to them had negative levels (vectors decoded flipped) and 36x the error
    of the mean. Now its levels stay in range, and the code is fitted only where it
    does not lower the training sample's recall@10 beyond the noise."""
    rng = np.random.default_rng(6)
    X = (rng.standard_t(3, (4000, 100)) * np.linspace(3.0, 0.2, 100)).astype(np.float32)
    for budget in (1, 2, 4, 8):
        codec = make_codec(f"pca,alloc{budget}").fit(X)
        levels = codec.quantizer.norm_levels_
        assert levels.min() > 0, levels
        error = ((codec.decode(codec.encode(X)) - X) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
        assert error < 3.0, (budget, error)


def test_alloc_refuses_dimensions_whose_mean_dwarfs_their_spread():
    """k-means scores are float32 sums about x's size: at mean 30, spread 0.01 encode
    found the nearest centroid for 5% of rows (worse than decoding to the mean). Such
    groups are refused with the remedy; pca/rot centre first and take them. Scalar
    components (thresholds) and components without bits are not affected."""
    rng = np.random.default_rng(7)
    X = (0.01 * rng.standard_normal((2000, 100)) + 30.0).astype(np.float32)
    with pytest.raises(
        InputError, match=r"dimension \d+ has mean 30 but spread 0.0\d+ .*pca,alloc"
    ):
        make_codec("alloc8").fit(X)  # 0.64 bits a dimension: k-means groups
    codec = make_codec("rot,alloc8").fit(X)
    error = ((codec.decode(codec.encode(X)) - X) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert error < 0.6
    scalar = X[:, :16]  # 4 bits a dimension: scalar levels, exact comparisons
    codec = make_codec("alloc8").fit(scalar)
    error = ((codec.decode(codec.encode(scalar)) - scalar) ** 2).sum()
    assert error / ((scalar - scalar.mean(0)) ** 2).sum() < 0.05
    # one near-constant column far from 0 (no bits, or in a group with real spread)
    Y = rng.standard_normal((3000, 64)).astype(np.float32)
    Y[:, 10] = 5.0 + 1e-4 * rng.standard_normal(3000)
    for budget in (8, 32, 64):
        make_codec(f"alloc{budget}").fit(Y)
    constant = np.full((100, 4), 1e4, dtype=np.float32)  # no spread: coded exactly
    constant[:, 0] = np.linspace(-1, 1, 100)  # (rows all identical are refused)
    codec = make_codec("alloc2").fit(constant)
    np.testing.assert_array_equal(codec.decode(codec.encode(constant))[:, 1:], constant[:, 1:])


def test_a_norm_code_left_out_gives_its_bits_to_the_components(tmp_path):
    """alloc1 on 200 distinct 8-d vectors: the norm code took 4 of the 8 bits and left a
    16-centroid codebook (recall@10 0.08); with all 8 bits the codebook holds every
    vector. The fit compares the two on the training sample where the code costs 1/32
    of the budget or more, and a codec without it is exactly the ``norm_bits=0`` one."""
    rng = np.random.default_rng(11)
    distinct = rng.standard_normal((200, 8)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    X = distinct[rng.integers(0, 200, 4000)]
    codec = make_codec("alloc1").fit(X)
    q = codec.quantizer
    assert q.norm_bits_ == 0 and q.norm_levels_.shape == (1,)
    assert int(q.units_[:, 2].sum()) == 8 and q.describe()["norm_bits"] == 0
    codes = codec.encode(X)
    assert np.array_equal(codes, make_codec("alloc1", norm_bits=0).fit(X).encode(X))
    true, _ = exact_knn(X, distinct[:50], 10)
    found, _ = exact_knn(codec.decode(codes), distinct[:50], 10)
    assert recall_at_k(found, true, 10, base=X, queries=distinct[:50]) > 0.9
    loaded = embcomp.load_codec(embcomp.save_codec(codec, tmp_path / "c.codec"))
    assert np.array_equal(loaded.encode(X), codes)
    assert np.array_equal(loaded.decode(codes), codec.decode(codes))
    # where the code helps, it stays: 4 of 64 bits on power-law data
    Y = _gaussian(4000, 64, seed=12, decay=0.93)
    kept = make_codec("pca,alloc8").fit(Y).quantizer
    assert kept.norm_bits_ == 4 and kept.norm_levels_.shape == (16,)
    assert int(kept.units_[:, 2].sum()) + 4 == 64


def test_fitting_holds_one_reordered_copy_of_the_sample_at_a_time():
    """The reordered sample was made by fancy indexing, which came out Fortran-ordered
    and was copied again (2x the sample at once), and was kept through the norm code's
    trial. 16,000 x 512: alloc8 peaked at 4.9x the sample, now 2.9x (the rest: the
    reordered sample or the trial's decoded one, plus the sample-recall's blocked scores)."""
    X = np.random.default_rng(0).standard_normal((16000, 512)).astype(np.float32)
    X *= (1.0 / np.sqrt(np.arange(1, 513))).astype(np.float32)
    codec = make_codec("alloc8")
    _, peak = peak_bytes(lambda: codec.fit(X))
    assert peak < 3.5 * X.nbytes, f"{peak / 1e6:.1f} MB over a {X.nbytes / 1e6:.1f} MB sample"
