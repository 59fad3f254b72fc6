import ml_dtypes
import numpy as np
import pytest
from memory import peak_bytes

from embcomp import InputError, make_codec
from embcomp.quantizers import FloatQuantizer, IntQuantizer, pack_nibbles, unpack_nibbles


@pytest.mark.parametrize("d", [1, 2, 7, 8, 33])
def test_nibble_packing_round_trips(d):
    values = np.random.default_rng(d).integers(0, 16, size=(5, d), dtype=np.uint8)
    packed = pack_nibbles(values)
    assert packed.shape == (5, (d + 1) // 2)
    np.testing.assert_array_equal(unpack_nibbles(packed, d), values)
    assert packed[0, 0] == values[0, 0] | ((values[0, 1] << 4) if d > 1 else 0)


@pytest.mark.parametrize("fmt", ["fp8", "fp8e5m2", "fp4", "fp16", "bf16"])
def test_out_of_range_values_clip_instead_of_nan(fmt):
    train = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    q = FloatQuantizer(fmt).fit(train)
    huge = np.full((2, 8), 3e38, dtype=np.float32)
    huge[1] *= -1
    decoded = q.decode(q.encode(huge))
    assert np.isfinite(decoded).all()
    # they saturate at the fitted range's ends (at least: the range is offset +- max|x - offset|)
    slack = 1e-6 * np.abs(train).max(axis=0)
    assert (decoded[0] >= train.max(axis=0) - slack).all()
    assert (decoded[1] <= train.min(axis=0) + slack).all()
    if q.format.bits <= 8:  # the tight formats saturate at the format's max
        fmt_max = float(ml_dtypes.finfo(q.format.dtype).max)
        np.testing.assert_allclose(decoded[0], fmt_max * q.scale_ + q.offset_, rtol=1e-6)
        np.testing.assert_allclose(decoded[1], -fmt_max * q.scale_ + q.offset_, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("scale", [100.0, 1e36])
def test_inputs_near_float32s_max_decode_finite(fmt, compiled, scale):
    # fp16/bf16 have range to spare beyond the fitted max: a value near 3.4e38, scaled,
    # used to round up to a code whose decode (v * scale_ + offset_) overflowed to inf.
    from embcomp import _jit

    rng = np.random.default_rng(0)
    train = (scale * rng.standard_normal((200, 3))).astype(np.float32)
    huge = (np.float32(3.4e38) * rng.uniform(-1, 1, (4000, 3))).astype(np.float32)
    huge[:2] = [[np.finfo(np.float32).max] * 3, [-np.finfo(np.float32).max] * 3]
    old = _jit.set_enabled(compiled)
    try:
        q = FloatQuantizer(fmt).fit(train)
        decoded = q.decode(q.encode(huge))
        fitted = q.decode(q.encode(train))
    finally:
        _jit.set_enabled(old)
    assert np.isfinite(decoded).all()
    assert (decoded[0] >= train.max(axis=0)).all() and (decoded[1] <= train.min(axis=0)).all()
    bound = {"fp16": 2.0**-11, "bf16": 2.0**-8}[fmt] * np.abs(train).max(axis=0)
    assert (np.abs(fitted - train) <= bound).all()  # the fitted range codes as before


def test_int_refuses_a_range_wider_than_float32():
    wide = np.array([[-2e38, 1.0], [2e38, 2.0]], dtype=np.float32)
    with pytest.raises(InputError, match="dimension 0 spans -2e\\+38 to 2e\\+38"):
        IntQuantizer(8).fit(wide)
    edge = np.array([[0.0], [np.finfo(np.float32).max]], dtype=np.float32)
    q = IntQuantizer(8).fit(edge)
    np.testing.assert_array_equal(q.decode(q.encode(edge)), edge)  # up to the max itself


def test_unscaled_fp8_loses_small_components_to_subnormals():
    """Why the default fits a scale: unit-norm 768-d vectors sit near 2**-6 in E4M3."""
    x = np.random.default_rng(0).standard_normal((2000, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    subnormal = np.abs(x) < 2.0**-6
    assert 0.25 < subnormal.mean() < 0.45
    small = x[subnormal]
    err = {}
    for scale in ("none", "dim"):
        q = FloatQuantizer("fp8", scale=scale).fit(x)
        err[scale] = float(np.mean(np.abs(q.decode(q.encode(x))[subnormal] - small)))
    # Scaled, those components are normal E4M3 numbers with 3 mantissa bits.
    assert err["dim"] < 0.5 * err["none"]


def test_int_quantizer_rounds_to_nearest_and_clips():
    train = np.array([[0.0], [255.0]], dtype=np.float32)
    q = IntQuantizer(8).fit(train)
    x = np.array([[0.49], [0.51], [254.6], [-1000.0], [1e9]], dtype=np.float32)
    np.testing.assert_array_equal(q.encode(x)[:, 0], [0, 1, 255, 0, 255])


def test_int_constant_dimension_decodes_exactly():
    train = np.ones((50, 4), dtype=np.float32) * np.array([0.5, -2.0, 0.0, 1.0], dtype=np.float32)
    train[:, 3] = np.linspace(-1, 1, 50)  # one dimension varies
    for bits in (8, 4):
        q = IntQuantizer(bits).fit(train)
        np.testing.assert_array_equal(q.decode(q.encode(train))[:, :3], train[:, :3])
        with pytest.raises(InputError, match="all 50 are identical"):
            IntQuantizer(bits).fit(np.repeat(train[:1], 50, axis=0))


def test_a_reducer_refuses_identical_training_vectors():
    # Centred on their mean, identical vectors leave the quantizer float32 noise to
    # calibrate on (rot,fp16 on one vector decoded others with errors of 2.6).
    one = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    for spec in ("rot,fp16", "pca4,int8", "l2norm,rot,bf16"):
        for rows in (1, 5):
            with pytest.raises(InputError, match=f"the {rows} training vector.* identical"):
                make_codec(spec).fit(np.repeat(one, rows, axis=0))
    make_codec("fp16").fit(one)  # no reducer, no range to calibrate: one vector is fine


def test_int_percentile_clipping_narrows_range():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((5000, 4)).astype(np.float32)
    train[0] = 50.0
    plain = IntQuantizer(4).fit(train)
    clipped = IntQuantizer(4, percentile=99.5).fit(train)
    assert (clipped.step_ < plain.step_ / 5).all()
    err = lambda q: np.mean((q.decode(q.encode(train[1:])) - train[1:]) ** 2)  # noqa: E731
    assert err(clipped) < err(plain) / 5


def test_global_scale_is_one_number():
    train = np.random.default_rng(0).standard_normal((100, 6)).astype(np.float32)
    codec = make_codec("fp8", scale="global").fit(train)
    assert np.unique(codec.quantizer.scale_).size == 1


@pytest.mark.parametrize("spec", ["int8", "bf16", "fp8", "fp4", "fp32", "pca8,int8", "l2norm,fp16"])
def test_decode_into_a_callers_buffer(spec):
    """``decode(codes, out=buf)`` writes the same floats into buf and returns it."""
    X = np.random.default_rng(41).standard_normal((300, 16)).astype(np.float32)
    codec = make_codec(spec).fit(X)
    codes = codec.encode(X)
    want = codec.decode(codes)
    buf = np.full(want.shape, np.nan, dtype=np.float32)
    assert codec.decode(codes, out=buf) is buf
    np.testing.assert_array_equal(buf, want)
    reduced = codec.decode(codes, reduced=True)
    buf = np.empty_like(reduced)
    np.testing.assert_array_equal(codec.decode(codes, reduced=True, out=buf), reduced)
    quantizer_buf = np.empty_like(reduced)
    assert codec.quantizer.decode(codes, out=quantizer_buf) is quantizer_buf
    np.testing.assert_array_equal(quantizer_buf, reduced)


def _bad_buffers(shape, dtype, wrong_dtype, overlapping, needs):
    """(buffer, error, message) for every way an ``out=`` buffer can be wrong."""
    from embcomp import DimensionMismatchError

    readonly = np.zeros(shape, dtype)
    readonly.flags.writeable = False
    return [
        (np.zeros(shape, wrong_dtype), InputError, np.dtype(dtype).name),
        (np.zeros((shape[0] - 1, shape[1]), dtype), DimensionMismatchError, needs),
        (np.zeros(shape, dtype, order="F"), InputError, "C-contiguous"),
        (np.zeros(shape).tolist(), InputError, "numpy array"),
        (overlapping, InputError, "overlaps"),
        (readonly, InputError, "writeable"),
    ]


def _assert_refused_and_untouched(call, cases):
    for buf, error, words in cases:
        before = np.array(buf, copy=True)
        with pytest.raises(error, match=words):
            call(buf)
        np.testing.assert_array_equal(np.asarray(buf), before)


def test_decode_refuses_a_bad_buffer_and_leaves_it_alone():
    X = np.random.default_rng(42).standard_normal((50, 8)).astype(np.float32)
    codec = make_codec("fp32").fit(X)
    codes = codec.encode(X)
    # fp32 codes are the floats themselves: a view of them overlaps
    cases = _bad_buffers((50, 8), np.float32, np.float64, codes.view(np.float32), r"\(50, 8\)")
    _assert_refused_and_untouched(lambda buf: codec.decode(codes, out=buf), cases)


@pytest.mark.parametrize(
    "spec", ["int8", "int4", "bf16", "fp8", "fp4", "bin", "pca8,int8", "l2norm,fp16", "pca,alloc6"]
)
def test_encode_into_a_callers_buffer(spec):
    """``encode(X, out=buf)`` writes the same codes into buf and returns it, on every
    path (plain, reduced, normalized, float64 input, empty input)."""
    X = np.random.default_rng(43).standard_normal((300, 16)).astype(np.float32)
    codec = make_codec(spec).fit(X)
    for rows in (X, X.astype(np.float64), X[:0]):
        want = codec.encode(rows)
        buf = np.full(want.shape, 0xA5, dtype=np.uint8)
        assert codec.encode(rows, out=buf) is buf
        np.testing.assert_array_equal(buf, want)
    reduced = codec.reducer.transform(X) if codec.reducer is not None else X
    if not codec.spec.normalize:
        buf = np.empty((300, codec.code_size), np.uint8)
        assert codec.quantizer.encode(reduced, out=buf) is buf
        np.testing.assert_array_equal(buf, codec.encode(X))


def test_encode_refuses_a_bad_buffer_and_leaves_it_alone():
    X = np.random.default_rng(44).standard_normal((50, 8)).astype(np.float32)
    codec = make_codec("fp32").fit(X)
    needs = r"encoding these vectors needs \(50, 32\)"
    cases = _bad_buffers((50, 32), np.uint8, np.int8, X.view(np.uint8), needs)
    _assert_refused_and_untouched(lambda buf: codec.encode(X, out=buf), cases)
    with pytest.raises(InputError, match="overlaps the vectors being encoded"):
        codec.quantizer.encode(X, out=X.view(np.uint8))


def test_standalone_quantizers_check_their_parameter_types():
    from embcomp import SpecError
    from embcomp.quantizers import AllocQuantizer

    train = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    for quantizer, message in [
        (IntQuantizer(8.0), "supports 4 or 8 bits; got 8.0"),
        (AllocQuantizer(4, weight="x"), "weight must be a number; got 'x'"),
        (AllocQuantizer(None), "budget must be an integer; got None"),
    ]:
        with pytest.raises(SpecError, match=message):
            quantizer.fit(train)


@pytest.mark.parametrize("d", [8, 13])
def test_bin_decodes_wide_vectors_without_its_byte_table(d, monkeypatch):
    # The byte table costs 1 KiB per dimension: past _TABLE_DIMS decode goes bit by bit,
    # to the same values.
    from embcomp.quantizers import BinaryQuantizer, _binary

    X = np.random.default_rng(d).standard_normal((300, d)).astype(np.float32)
    q = BinaryQuantizer().fit(X)
    codes = q.encode(X)
    expected = q.decode(codes)
    monkeypatch.setattr(_binary, "_TABLE_DIMS", d - 1)
    wide = BinaryQuantizer().fit(X)
    assert wide._table is None
    np.testing.assert_array_equal(wide.decode(codes), expected)


def test_bin_splits_tied_medians_toward_even_halves():
    """0/1 features with 70% ones have median 1: ``x > 1`` put every row on one side
    (every vector got the same code). The ties now go to the side that splits evenly."""
    rng = np.random.default_rng(3)
    X = (rng.random((1000, 16)) < 0.7).astype(np.float32)
    for data in (X, 1 - X, 5 * X - 2):
        codec = make_codec("bin").fit(data)
        np.testing.assert_array_equal(codec.decode(codec.encode(data)), data)
    # continuous data: the plain median, as before; constant columns decode to themselves
    Z = rng.standard_normal((1001, 8)).astype(np.float32)
    np.testing.assert_array_equal(make_codec("bin").fit(Z).quantizer.center_, np.median(Z, axis=0))
    C = np.full((10, 8), 3.0, dtype=np.float32)
    C[:, 0] = np.arange(10)  # one varying dimension: identical rows are refused
    codec = make_codec("bin").fit(C)
    np.testing.assert_array_equal(codec.decode(codec.encode(C))[:, 1:], C[:, 1:])


def _common_component_data(n: int, d: int, shift: float, seed: int = 0) -> np.ndarray:
    """Unit vectors sharing one component, as anisotropic embedding models' do."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d) * shift / np.sqrt(d)
    X = rng.standard_normal((n, d)) * rng.uniform(0.2, 1.0, d) / np.sqrt(d) + common
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["fp8", "fp8e5m2", "fp4", "bf16"])
def test_centring_stores_a_shared_component_for_free(fmt):
    """Random pairs at cosine ~0.75: without centring every value sits far from 0, where a
    float format's steps are coarse; with it the quantizer spends its steps on what
    varies. Recall@10 of inner-product search rises (fp8 0.87 -> 0.96 on MiniLM
    embeddings given such a component)."""
    X = _common_component_data(3000, 64, shift=2.0)
    cosines = np.sum(X[:1000] * X[1000:2000], axis=1)
    assert 0.6 < cosines.mean() < 0.9
    queries, base = X[:100], X[100:]
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]

    def quality(center: bool) -> tuple[float, float]:
        codec = make_codec(fmt, center=center).fit(base)
        decoded = codec.decode(codec.encode(base))
        found = np.argsort(-(queries @ decoded.T), axis=1)[:, :10]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
        return float(np.mean((decoded - base) ** 2)), float(recall)

    (mse_off, recall_off), (mse_on, recall_on) = quality(False), quality(True)
    assert mse_on < mse_off / 3
    assert recall_on >= recall_off
    if fmt != "bf16":  # bf16 is near-exact either way
        assert recall_on > recall_off + 0.03


def test_centring_fits_the_mean_and_keeps_a_far_offset_exact_enough():
    """Mean 100, spread 1: uncentred fp8 spends its range on the offset (relative error
    ~8); centred, on the spread (~0.06)."""
    X = (100 + np.random.default_rng(0).standard_normal((2000, 16))).astype(np.float32)
    errors = {}
    for center in (False, True):
        q = FloatQuantizer("fp8", center=center).fit(X)
        assert q.offset_.dtype == np.float32
        if center:
            np.testing.assert_allclose(q.offset_, X.mean(axis=0, dtype=np.float64), rtol=1e-7)
        else:
            assert not q.offset_.any()
        residual = q.decode(q.encode(X)) - X
        errors[center] = np.linalg.norm(residual) / np.linalg.norm(X - X.mean(axis=0))
    assert errors[True] < 0.1 < 1.0 < errors[False]


def test_centred_constant_dimension_decodes_exactly():
    X = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    X[:, 2] = 0.37
    q = FloatQuantizer("fp4").fit(X)
    np.testing.assert_array_equal(q.decode(q.encode(X))[:, 2], X[:, 2])


def test_a_dimension_whose_centring_would_overflow_stays_uncentred():
    X = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32) + 5
    X[:, 0] = [3.4e38, -3.4e38, -3.4e38]  # mean -1.1e38: the first value is 4.5e38 above it
    q = FloatQuantizer("fp8").fit(X)
    assert q.offset_[0] == 0 and q.offset_[1] != 0
    assert np.isfinite(q.decode(q.encode(X))).all()


def test_centring_is_chosen_per_dimension_where_it_stores_the_sample_better():
    """ReLU-like features (84% zeros): centred fp4 would decode every zero to about the
    column mean (relative MSE 6x worse); they stay uncentred there, zeros exact. In every
    format, no dimension is stored worse than with center=False."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((4000, 8)) * 0.1 + 1.0  # a shared component: centred
    sparse = np.maximum(rng.standard_normal((4000, 8)) - 1, 0)
    X = np.hstack([dense, sparse]).astype(np.float32)
    for fmt in ("fp16", "bf16", "fp8", "fp8e5m2", "fp4"):
        q = FloatQuantizer(fmt).fit(X)
        assert q.offset_[:8].all(), fmt
        plain = FloatQuantizer(fmt, center=False).fit(X)
        errors = [np.mean((c.decode(c.encode(X)) - X) ** 2, axis=0) for c in (q, plain)]
        assert (errors[0] <= errors[1] * (1 + 1e-6)).all(), fmt
    q = FloatQuantizer("fp4").fit(X)
    assert not q.offset_[8:].any()
    np.testing.assert_array_equal(q.decode(q.encode(X))[:, 8:][X[:, 8:] == 0], 0)


def test_global_scale_centres_all_dimensions_or_none():
    X = (3 + np.random.default_rng(0).standard_normal((500, 6))).astype(np.float32)
    q = FloatQuantizer("fp8", scale="global").fit(X)
    assert q.offset_.all() and len(set(q.scale_.tolist())) == 1
    q = FloatQuantizer("fp4", scale="global").fit(np.maximum(X - 4, 0))  # sparse
    assert not q.offset_.any()


def test_plain_cast_and_fp32_are_never_centred():
    X = (5 + np.random.default_rng(0).standard_normal((100, 8))).astype(np.float32)
    for q in (FloatQuantizer("fp8", scale="none"), FloatQuantizer("fp32")):
        q.fit(X)
        assert not q.offset_.any()
    np.testing.assert_array_equal(q.decode(q.encode(X)), X)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8", "fp8e5m2", "fp4"])
def test_the_fits_fast_rounding_is_the_cast(fmt):
    """Deciding where to centre rounds the training sample with tables and bit tricks;
    they must give the cast's values bit for bit (signed zeros and ties included)."""
    rng = np.random.default_rng(1)
    fmax = FloatQuantizer(fmt).format.max
    patterns = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    y = patterns.view(np.float32)
    y = np.clip(y[np.isfinite(y)], -fmax, fmax)
    spread = np.float32(fmax) * rng.uniform(-1, 1, 100_000).astype(np.float32)
    y = np.concatenate([y, spread, np.array([0.0, -0.0, fmax, -fmax], dtype=np.float32)])
    want = y.astype(FloatQuantizer(fmt).format.dtype).astype(np.float32)
    got = FloatQuantizer(fmt)._rounded(y)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("spec", ["int8", "int4", "fp8", "fp8e5m2", "fp4", "bin", "alloc4"])
def test_quantizers_that_calibrate_ranges_need_two_training_vectors(spec):
    """One vector gives every dimension a range of a single value; the codec would clip
    every other vector to it, so fitting refuses, as PCA does."""
    one = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    with pytest.raises(InputError, match="needs at least 2; got 1"):
        make_codec(spec).fit(one)
    two = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    make_codec(spec).fit(two)


@pytest.mark.parametrize(
    "q",
    [
        FloatQuantizer("fp32"),
        FloatQuantizer("fp16"),
        FloatQuantizer("bf16"),
        FloatQuantizer("fp8", scale="none"),
    ],
)
def test_quantizers_that_learn_no_range_fit_on_one_vector(q):
    one = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    X = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    assert q.fit(one).decode(q.encode(X)).shape == (5, 8)


@pytest.mark.parametrize("spec", ["int8", "int4", "fp8", "fp16", "bf16", "fp4", "bin"])
def test_fitting_takes_no_copy_of_the_training_sample(spec):
    """Ranges, scales and centring come from per-column min/max and blockwise error
    sums; bin fits groups of columns. Before: np.abs(X), X - mean, a bool mask per
    check and the whole-sample error terms took 1x (int8) to 3x (fp8) the sample again."""
    X = np.random.default_rng(0).standard_normal((16000, 512)).astype(np.float32)
    codec = make_codec(spec)
    _, peak = peak_bytes(lambda: codec.fit(X))
    assert peak < X.nbytes / 4, f"{spec}: {peak / 1e6:.1f} MB over a {X.nbytes / 1e6:.1f} MB sample"
