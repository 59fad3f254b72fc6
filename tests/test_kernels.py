"""The fast encode/decode kernels equal simple reference implementations, bit for bit.

The references below are the obvious numpy code for each quantizer's documented
semantics (scale, clip, cast; scale, round half to even, clip; compare and pack).
The fast paths (bit-level table lookups, blocked loops on a thread pool, scratch
buffers, fused reduce + quantize) must give identical bytes and floats for every
shape, dtype and memory layout, and for the values where rounding is delicate.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

import embcomp._blocks as blocks
import embcomp._jit as jit
import embcomp.quantizers._base as quantizer_base
import embcomp.quantizers._kernels as kernels
from embcomp import make_codec
from embcomp._validation import FRESH_ALIGN_FROM, FRESH_SPARE, fresh_array
from embcomp.exceptions import InputError
from embcomp.quantizers import FORMATS, BinaryQuantizer, FloatQuantizer, IntQuantizer, Quantizer

FLOAT_FORMATS = ["fp32", "fp16", "bf16", "fp8", "fp8e5m2", "fp4"]


# -- references ---------------------------------------------------------------------------
def ref_pack_nibbles(values: np.ndarray) -> np.ndarray:
    n, d = values.shape
    padded = np.zeros((n, d + d % 2), dtype=np.uint8)
    padded[:, :d] = values
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def ref_unpack_nibbles(codes: np.ndarray, d: int) -> np.ndarray:
    out = np.empty((codes.shape[0], 2 * codes.shape[1]), dtype=np.uint8)
    out[:, 0::2] = codes & 0x0F
    out[:, 1::2] = codes >> 4
    return out[:, :d]


def ref_float_encode(q: FloatQuantizer, X: np.ndarray) -> np.ndarray:
    fmt = FORMATS[q.fmt]
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    if q.fmt == "fp32":
        return X32.astype("<f4").view(np.uint8)
    inv_scale = (1.0 / q.scale_.astype(np.float64)).astype(np.float32)
    with np.errstate(over="ignore"):
        y = (X32 - q.offset_) * inv_scale
    limit = fmt.max
    if fmt.bits == 16:  # fp16/bf16 stop where a decode would pass float32's max
        room = np.finfo(np.float32).max * (1 - 2.0**-10) - np.abs(q.offset_.astype(np.float64))
        limit = max(fmt.target, min(fmt.max, (room / q.scale_).min()))
        with np.errstate(invalid="ignore"):  # NaN codes among them
            values = np.arange(1 << 15, dtype=np.uint16).view(fmt.dtype).astype(np.float64)
        limit = float(values[values <= limit].max())  # the largest positive value under it
    y = np.clip(y, -limit, limit)
    stored = y.astype(fmt.dtype)
    if fmt.bits == 16:
        return stored.view(np.uint16).astype("<u2").view(np.uint8)
    raw = stored.view(np.uint8)
    return ref_pack_nibbles(raw) if fmt.bits == 4 else raw


def ref_float_decode(q: FloatQuantizer, codes: np.ndarray) -> np.ndarray:
    fmt = FORMATS[q.fmt]
    if q.fmt == "fp32":
        return codes.view("<f4").astype(np.float32)
    if fmt.bits == 16:
        values = codes.view("<u2").view(fmt.dtype).astype(np.float32)
    else:
        lut = np.arange(1 << fmt.bits, dtype=np.uint8).view(fmt.dtype).astype(np.float32)
        raw = ref_unpack_nibbles(codes, q.d_) if fmt.bits == 4 else codes
        values = lut[raw]
    # an uncentred dimension decodes to the product itself: its zero offset is added as
    # -0.0, which changes no value (+0.0 would turn -0.0 into +0.0)
    return values * q.scale_ + np.where(q.offset_ == 0, np.float32(-0.0), q.offset_)


def ref_int_encode(q: IntQuantizer, X: np.ndarray) -> np.ndarray:
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    inv_step = (1.0 / q.step_.astype(np.float64)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y = (X32 - q.min_) * inv_step  # the subtraction first: exact near min_
    codes = np.clip(np.rint(y), 0, (1 << q.bits) - 1).astype(np.uint8)
    return ref_pack_nibbles(codes) if q.bits == 4 else codes


def ref_int_decode(q: IntQuantizer, codes: np.ndarray) -> np.ndarray:
    values = ref_unpack_nibbles(codes, q.d_) if q.bits == 4 else codes
    return values.astype(np.float32) * q.step_ + q.min_


def ref_bin_encode(q: BinaryQuantizer, X: np.ndarray) -> np.ndarray:
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    return np.packbits(X32 > q.center_, axis=1, bitorder="little")


def ref_bin_decode(q: BinaryQuantizer, codes: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(codes, axis=1, count=q.d_, bitorder="little").astype(bool)
    return np.where(bits, q.high_, q.low_).astype(np.float32)


def reference(q: Quantizer):
    if isinstance(q, FloatQuantizer):
        return ref_float_encode, ref_float_decode
    if isinstance(q, IntQuantizer):
        return ref_int_encode, ref_int_decode
    return ref_bin_encode, ref_bin_decode


def quantizer(name: str, train: np.ndarray, **options) -> Quantizer:
    if name in ("int8", "int4"):
        return IntQuantizer(int(name[3:]), **options).fit(train)
    if name == "bin":
        return BinaryQuantizer().fit(train)
    return FloatQuantizer(name, **options).fit(train)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Equal shapes, dtypes and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# Every test here runs on the numpy path and, with numba installed, on the compiled one.
PATHS = ["numpy", "jit"] if jit.AVAILABLE else ["numpy"]


@pytest.fixture(autouse=True, params=PATHS)
def kernel_path(request):
    old = jit.set_enabled(request.param == "jit")
    yield request.param
    jit.set_enabled(old)


@pytest.fixture
def small_blocks(monkeypatch):
    """64-row blocks, so a few hundred rows make many blocks spread over two threads."""
    monkeypatch.setattr(blocks, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(blocks, "_MIN_PRODUCT_ROWS", 64)
    monkeypatch.setattr(quantizer_base, "_COMPILED_BLOCK_FACTOR", 1)
    monkeypatch.setenv("EMBCOMP_THREADS", "2")


# -- tricky values ------------------------------------------------------------------------
def tricky_values(fmt_name: str) -> np.ndarray:
    """Values (in the format's own units) where rounding or clipping is delicate."""
    special = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3e38, -3e38, 1e30, -1e30, 1.0, -1.0]
    fmt = FORMATS[fmt_name]
    values = [np.float32(v) for v in special]
    if fmt.bits <= 16:
        codes = np.arange(1 << fmt.bits, dtype=np.uint32)
        grid = codes.astype(np.uint16 if fmt.bits == 16 else np.uint8)
        with np.errstate(invalid="ignore"):  # the NaN codes, dropped next
            grid = grid.view(fmt.dtype).astype(np.float64)
        grid = np.unique(grid[np.isfinite(grid)])
        pick = np.arange(0, grid.size - 1, 37 if fmt.bits == 16 else 1)  # keep it small
        mids = (grid[pick] + grid[pick + 1]) / 2  # exact ties between neighbours
        grid = grid[pick]
        fmax = float(ml_dtypes.finfo(fmt.dtype).max)
        edges = np.array([fmax, fmax * 1.0001, fmax * 2, 3.4e38])
        edges = np.minimum(edges, float(np.finfo(np.float32).max))
        edges = np.concatenate([edges, -edges])
        for v in (grid, mids, edges):
            v32 = v.astype(np.float32)
            values.extend(v32)
            with np.errstate(over="ignore"):  # the float32 max steps to inf: dropped below
                values.extend(np.nextafter(v32, np.float32(np.inf)))
                values.extend(np.nextafter(v32, np.float32(-np.inf)))
    values = np.array(values, dtype=np.float32)
    return values[np.isfinite(values)]


def random_bit_patterns(n: int, seed: int) -> np.ndarray:
    """Finite float32 values of every magnitude: random bit patterns, NaN/inf dropped."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=2 * n, dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    return values[np.isfinite(values)][:n]


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_unscaled_float_encode_matches_cast_on_tricky_values(fmt, small_blocks):
    """scale="none": the input is the stored value, so ties and edges hit the kernel."""
    values = np.concatenate([tricky_values(fmt), random_bit_patterns(4000, seed=1)])
    d = 6
    values = np.resize(values, (values.size + d - 1) // d * d).reshape(-1, d)
    q = FloatQuantizer(fmt, scale="none").fit(np.ones((4, d), dtype=np.float32))
    encode_ref, decode_ref = reference(q)
    codes = q.encode(values)
    assert_same_bits(codes, encode_ref(q, values))
    assert_same_bits(q.decode(codes), decode_ref(q, codes))


@pytest.mark.parametrize("fmt", ["fp8", "fp8e5m2", "fp4", "fp16", "bf16"])
def test_power_of_two_scale_keeps_ties_exact(fmt, small_blocks):
    """A fitted scale of 4 divides exactly, so midpoints stay midpoints after scaling."""
    target = FORMATS[fmt].target
    train = np.array([[target * 4.0, -target * 4.0], [-target * 4.0, target * 4.0]], np.float32)
    q = FloatQuantizer(fmt, center=False).fit(train)
    np.testing.assert_array_equal(q.scale_, [4.0, 4.0])
    values = tricky_values(fmt)
    values = values[np.abs(values) < 8e37] * np.float32(4)
    values = values[: values.size // 2 * 2].reshape(-1, 2)
    assert_same_bits(q.encode(values), ref_float_encode(q, values))


@pytest.mark.parametrize("fmt", ["fp8", "fp8e5m2", "fp4"])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_every_small_float_code_decodes_like_the_table(fmt, d):
    """Every byte (fp8: every pair of bytes), NaN codes included, decodes as the LUT does."""
    q = FloatQuantizer(fmt).fit(np.random.default_rng(d).standard_normal((50, d)))
    pairs = np.arange(1 << 16, dtype=np.uint32)
    if fmt == "fp4" or d == 1:
        codes = np.arange(256, dtype=np.uint8).repeat(q.code_size).reshape(256, -1)
    else:  # all 65536 pairs of codes in adjacent dims
        codes = np.stack([pairs & 0xFF, pairs >> 8], axis=1).astype(np.uint8)
        codes = np.tile(codes, (1, d // 2))
    assert_same_bits(q.decode(codes), ref_float_decode(q, codes))


def test_small_float_formula_fits_the_formats_it_is_used_for():
    """The compiled decoders compute float8/float4 values instead of looking them up;
    the parameters exist only where that formula gives ml_dtypes' value for every code.
    Formats it does not fit (no negative zero: code 0x80 is NaN) get None, and their
    quantizer would decode through the table."""
    for fmt in ("fp8", "fp8e5m2", "fp4"):
        assert kernels.small_float_params(FORMATS[fmt].dtype) is not None
    for dtype in (ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn):
        assert kernels.small_float_params(np.dtype(dtype)) is not None
    for dtype in (ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz):
        assert kernels.small_float_params(np.dtype(dtype)) is None


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_small_float_decode_falls_back_to_the_table(fmt):
    q = FloatQuantizer(fmt).fit(np.random.default_rng(0).standard_normal((50, 6)))
    codes = np.arange(256, dtype=np.uint8).repeat(q.code_size).reshape(256, -1)
    q._small_params = None  # as for a format the formula does not fit
    assert_same_bits(q.decode(codes), ref_float_decode(q, codes))


def layouts(X: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as float32 C, float64, float16-safe, strided and Fortran arrays."""
    wide = np.zeros((X.shape[0], 2 * X.shape[1]), dtype=np.float32)
    wide[:, ::2] = X
    return {
        "c": X,
        "float64": X.astype(np.float64),
        "strided_cols": wide[:, ::2],
        "fortran": np.asfortranarray(X),
        "strided_rows": np.repeat(X, 2, axis=0)[::2],
    }


QUANTIZERS = ["fp32", "fp16", "bf16", "fp8", "fp8e5m2", "fp4", "int8", "int4", "bin"]


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 333])
@pytest.mark.parametrize("d", [1, 7, 8, 33])
def test_quantizers_match_reference_across_shapes(name, n, d, small_blocks):
    rng = np.random.default_rng(n * 100 + d)
    train = (rng.standard_normal((200, d)) * rng.uniform(0.01, 3, size=d)).astype(np.float32)
    q = quantizer(name, train)
    encode_ref, decode_ref = reference(q)
    # out-of-range rows (beyond the calibrated range) and values exactly on it
    X = (rng.standard_normal((n, d)) * rng.uniform(0.01, 5, size=d)).astype(np.float32)
    if n >= 3:
        X[0] = train.max(axis=0)
        X[1] = train.min(axis=0)
        X[2] = -0.0
    want = encode_ref(q, X)
    for layout, arr in layouts(X).items():
        got = q.encode(arr)
        assert_same_bits(got, want), layout
    assert_same_bits(q.decode(want), decode_ref(q, want))
    assert_same_bits(q.decode(np.asfortranarray(want)), decode_ref(q, want))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_int_rounding_ties_go_to_even(name):
    """Values exactly halfway between two levels round like np.rint, to the even level."""
    levels = 255 if name == "int8" else 15
    train = np.array([[0.0], [float(levels)]], dtype=np.float32)  # step 1, min 0
    q = quantizer(name, train)
    halves = np.arange(-2, levels + 2, dtype=np.float32) + np.float32(0.5)
    X = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 300)])
    X = np.concatenate([X, [-0.0, 0.0, 1e30, -1e30, 3e38, -3e38]]).astype(np.float32)
    X = X.reshape(-1, 1)
    assert_same_bits(q.encode(X), ref_int_encode(q, X))


@pytest.mark.parametrize("name", ["fp8", "fp4", "int8", "int4", "bf16", "fp16", "bin"])
def test_random_bit_patterns_encode_like_reference(name, small_blocks):
    """Huge, tiny and subnormal inputs through a fitted (per-dimension) scale."""
    d = 16
    rng = np.random.default_rng(7)
    train = (rng.standard_normal((300, d)) * np.logspace(-3, 2, d)).astype(np.float32)
    q = quantizer(name, train)
    X = random_bit_patterns(3000, seed=3)
    X = X[: X.size // d * d].reshape(-1, d)
    encode_ref, decode_ref = reference(q)
    codes = q.encode(X)
    assert_same_bits(codes, encode_ref(q, X))
    assert_same_bits(q.decode(codes), decode_ref(q, codes))


# -- codecs: fused normalize + reduce + quantize ----------------------------------------
CODEC_SPECS = ["pca16,fp8", "l2norm,pca16,int4", "rot,fp4", "l2norm,fp8", "pca9,bin", "pca5,fp16"]


@pytest.mark.parametrize("spec", CODEC_SPECS)
def test_codec_fused_blocks_match_staged_reference(spec, small_blocks):
    """encode == quantizer reference applied to the reducer's transform of the input."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((700, 24)).astype(np.float32) * np.linspace(3, 0.1, 24)
    codec = make_codec(spec).fit(X[:400])
    staged = X / np.linalg.norm(X, axis=1, keepdims=True) if codec.spec.normalize else X
    if codec.reducer is not None:
        staged = codec.reducer.transform(staged)
    encode_ref, decode_ref = reference(codec.quantizer)
    want = encode_ref(codec.quantizer, staged)
    matches = np.mean(codec.encode(X) == want)
    if codec.spec.normalize:  # norms computed per block vs whole array: last-bit noise
        assert matches > 0.999
    else:
        assert_same_bits(codec.encode(X), want)
    codes = codec.encode(X)
    reduced = decode_ref(codec.quantizer, codes)
    assert_same_bits(codec.decode(codes, reduced=True), reduced)
    if codec.reducer is not None:
        np.testing.assert_allclose(
            codec.decode(codes), codec.reducer.inverse_transform(reduced), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("spec", ["pca16,int8", "rot,fp8", "pca8,fp4"])
def test_codec_results_do_not_depend_on_threads(spec, small_blocks, monkeypatch):
    rng = np.random.default_rng(9)
    X = rng.standard_normal((900, 32)).astype(np.float32)
    codec = make_codec(spec).fit(X)
    two = codec.encode(X), codec.decode(codec.encode(X))
    monkeypatch.setenv("EMBCOMP_THREADS", "1")
    one = codec.encode(X), codec.decode(codec.encode(X))
    assert_same_bits(two[0], one[0])
    assert_same_bits(two[1], one[1])


# -- blocks, errors, memory ---------------------------------------------------------------
def test_first_bad_row_is_reported_whatever_thread_finds_it(small_blocks):
    q = quantizer("fp8", np.random.default_rng(0).standard_normal((100, 4)))
    X = np.zeros((1000, 4), dtype=np.float32)
    X[900, 1] = np.nan
    X[130, 2] = np.inf
    X[700, 0] = -np.inf
    with pytest.raises(InputError, match="row 130 "):
        q.encode(X)


def test_float64_beyond_float32_range_is_a_clear_input_error():
    q = quantizer("int8", np.random.default_rng(0).standard_normal((100, 3)))
    X = np.zeros((5, 3))
    X[3, 1] = 1e300
    with pytest.raises(InputError, match="row 3 "):
        q.encode(X)


def test_map_blocks_covers_every_row_once_and_nests_without_deadlock(small_blocks):
    seen = np.zeros(5000, dtype=np.int64)
    threads = set()

    second_thread_arrived = threading.Event()

    def work(start, stop, scratch):
        threads.add(threading.get_ident())
        if start == 0:  # hold the first block until another thread has taken one
            assert second_thread_arrived.wait(timeout=30)
        else:
            second_thread_arrived.set()
        buf = scratch.get("x", (stop - start,), np.int64)
        buf[:] = 1
        seen[start:stop] += buf
        # a nested call from inside a worker (as a batch engine might make)
        inner = np.zeros(130, dtype=np.int64)
        blocks.for_each_block(130, 64, lambda a, b: inner.__setitem__(slice(a, b), 1))
        assert inner.sum() == 130

    blocks.map_blocks(seen.size, 64, work)
    np.testing.assert_array_equal(seen, 1)
    assert len(threads) == 2


def test_scratch_reuses_its_buffer():
    scratch = blocks.Scratch()
    a = scratch.get("y", (10, 4), np.float32)
    b = scratch.get("y", (3, 4), np.float32)
    assert np.shares_memory(a, b) and b.shape == (3, 4) and b.flags.c_contiguous
    c = scratch.get("y", (20, 4), np.uint64)
    assert c.shape == (20, 4) and c.dtype == np.uint64


class BlockOnlyQuantizer(Quantizer):
    """A quantizer written the simple way (new arrays per block) still works."""

    bits = 8
    _state = ()

    def _fit(self, X):
        pass

    def _encode_block(self, X):
        return np.clip(np.rint(X), 0, 255).astype(np.uint8)

    def _decode_block(self, codes):
        return codes.astype(np.float32)


def test_quantizers_implementing_only_block_methods_still_work(small_blocks):
    X = np.random.default_rng(0).uniform(0, 255, size=(300, 5)).astype(np.float32)
    q = BlockOnlyQuantizer().fit(X)
    np.testing.assert_array_equal(q.decode(q.encode(X)), np.rint(X))
    fast = quantizer("fp8", X)
    assert_same_bits(fast._encode_block(X), ref_float_encode(fast, X))
    assert_same_bits(fast._decode_block(fast.encode(X)), ref_float_decode(fast, fast.encode(X)))


@pytest.mark.parametrize("spec", ["fp8", "int4", "pca32,fp8", "bf16", "l2norm,int8"])
def test_memory_beyond_the_output_is_a_few_blocks_per_thread(spec):
    """No full-size temporaries: peak memory beyond input and output is O(block * threads)."""
    import tracemalloc

    d, n = 64, 200_000
    codec = make_codec(spec).fit(np.random.default_rng(0).standard_normal((500, d)))
    block_bytes = blocks.rows_per_block(4 * d) * 4 * d
    X = np.random.default_rng(1).standard_normal((n, d))  # float64: converted per block
    codec.encode(X[:10])  # warm up the pool and the tables
    tracemalloc.start()
    codes = codec.encode(X)
    extra_encode = tracemalloc.get_traced_memory()[1] - codes.nbytes
    tracemalloc.stop()
    tracemalloc.start()
    decoded = codec.decode(codes)
    extra_decode = tracemalloc.get_traced_memory()[1] - decoded.nbytes
    tracemalloc.stop()
    # fp8: the scaled block, a uint32 and an intp table index, the finiteness mask
    bound = 5 * block_bytes * blocks.default_threads()
    # a large output is aligned to huge pages inside a slightly larger allocation, whose
    # spare address space tracemalloc counts though it is never written
    spare = FRESH_SPARE if decoded.nbytes >= FRESH_ALIGN_FROM else 0
    assert extra_encode <= bound < X.nbytes / 5
    assert extra_decode <= bound + spare


def test_large_fresh_outputs_start_on_a_huge_page():
    """Decode and encode outputs of 32 MiB and more start on a 2 MiB boundary (whole huge
    pages: see fresh_array); smaller ones are plain arrays. Either way a normal array."""
    for shape, dtype in (((0, 7), np.float32), ((3, 5), np.uint8), ((1000, 1000), np.float32)):
        small = fresh_array(shape, dtype)
        assert small.shape == shape and small.dtype == dtype and small.flags.owndata
    rows = FRESH_ALIGN_FROM // (4 * 64) + 1
    big = fresh_array((rows, 64), np.float32)
    assert big.shape == (rows, 64) and big.dtype == np.float32
    assert big.flags.c_contiguous and big.flags.writeable and big.ctypes.data % (2 << 20) == 0
    assert big.base.nbytes == big.nbytes + FRESH_SPARE
    codec = make_codec("int8").fit(np.random.default_rng(0).standard_normal((500, 64)))
    decoded = codec.decode(np.zeros((rows, 64), dtype=np.uint8))
    assert decoded.ctypes.data % (2 << 20) == 0 and decoded.flags.c_contiguous


# -- streaming stores -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "fp8e5m2", "fp4", "fp16", "bf16", "bin"])
@pytest.mark.parametrize("d", [1, 3, 7, 8, 9, 17, 64, 101])
def test_streaming_decode_writes_the_same_bytes_at_any_width_and_alignment(
    name, d, monkeypatch, small_blocks
):
    """Every decode into a buffer streams (threshold 0): into buffers starting at each of
    the 8 float offsets from a 32-byte boundary, over 64-row blocks on two threads, the
    bytes equal the reference's and nothing outside the buffer is touched."""
    monkeypatch.setattr(jit, "STREAM_BYTES", 0)
    n = 257
    X = np.random.default_rng(d).standard_normal((n, d)).astype(np.float32)
    q = quantizer(name, X)
    _, decode_ref = reference(q)
    codes = q.encode(X)
    want = decode_ref(q, codes)
    raw = np.empty(n * d + 16, dtype=np.float32)
    for shift in range(8):
        raw[:] = np.nan
        out = raw[shift : shift + n * d].reshape(n, d)
        assert jit.streams(out) == jit.ENABLED
        assert q.decode(codes, out=out) is out
        assert_same_bits(out, want)
        assert np.isnan(raw[:shift]).all() and np.isnan(raw[shift + n * d :]).all()
    assert_same_bits(q.decode(codes), want)
    codec = make_codec(name).fit(X)
    assert_same_bits(codec.decode(codes, out=np.empty_like(want)), want)  # it streams too
    for rows in (0, 1, 2):
        assert_same_bits(q.decode(codes[:rows], out=np.empty_like(want[:rows])), want[:rows])


def test_only_large_outputs_stream(monkeypatch):
    """Below STREAM_BYTES the output likely stays in cache for whoever reads it next."""
    out = np.zeros((1000, 64), dtype=np.float32)
    monkeypatch.setattr(jit, "STREAM_BYTES", out.nbytes)
    assert jit.streams(out) == jit.ENABLED
    assert not jit.streams(out[:-1])
    assert not jit.streams(out[:, :32])  # not C-contiguous
    assert not jit.streams(out.astype(np.float64))


def _stream_affine(codes, scale, out, stream):  # type: ignore[no-untyped-def]
    """The streaming pattern of embcomp._jit, as the decoders use it."""
    n, d = out.shape
    target, base, flat, lead = jit.stream_start(out, stream)
    carry = 0
    for i in range(n):
        r = 0 if stream else i
        for j in range(d):
            target[r, base + j] = np.float32(codes[i, j]) * scale[j]
        if stream:
            carry = jit.finish_row(flat, lead, (i + 1) * d, target, carry)
    if stream:
        jit.finish_stream(flat, n * d, target, carry)


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
def test_streaming_pattern_compiles_to_nontemporal_stores_and_a_fence():
    import numba

    compiled = numba.njit(_stream_affine)  # no cache: its IR stays inspectable
    rng = np.random.default_rng(0)
    for n, d in [(0, 5), (1, 3), (9, 13), (40, 24)]:
        codes = rng.integers(0, 256, (n, d), dtype=np.uint8)
        scale = rng.random(d, dtype=np.float32)
        want = codes.astype(np.float32) * scale
        for stream in (False, True):
            raw = np.full(n * d + 9, np.nan, dtype=np.float32)
            out = raw[1 : 1 + n * d].reshape(n, d)
            compiled(codes, scale, out, stream)
            assert_same_bits(out, want)
            assert np.isnan(raw[0]) and np.isnan(raw[1 + n * d :]).all()
            python = np.empty_like(out)
            _stream_affine(codes, scale, python, stream)  # the helpers run in Python too
            assert_same_bits(python, want)
    (ir,) = compiled.inspect_llvm().values()
    assert "!nontemporal" in ir
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "llvm.x86.sse.sfence" in ir


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8", "fp8e5m2", "fp4"])
def test_compiled_cast_equals_the_library_cast_on_a_sweep_of_all_float32(fmt):
    """Every 61st float32 bit pattern (70M values, all magnitudes), clipped, cast both ways."""
    from embcomp.quantizers import _kernels

    fmt_info = FORMATS[fmt]
    fmax = np.float32(fmt_info.max)
    for part in range(4):  # 4 slices of 2**30 patterns keep memory at ~0.5 GB
        bits = np.arange(part << 30, (part + 1) << 30, 61, dtype=np.uint64).astype(np.uint32)
        values = bits.view(np.float32)
        values = values[np.isfinite(values)].reshape(1, -1)
        with np.errstate(over="ignore"):
            want = np.clip(values, -fmax, fmax).astype(fmt_info.dtype)
        ones = np.ones(values.shape[1], dtype=np.float32)
        zeros, minus_zeros = np.zeros_like(ones), np.full_like(ones, -0.0)  # change nothing
        got = np.empty(values.shape, dtype=np.uint16 if fmt_info.bits == 16 else np.uint8)
        if fmt == "bf16":
            assert _kernels.encode_bf16(values, zeros, ones, fmax, got)
        else:
            params = _kernels.float_format_params(fmt_info.dtype)
            assert _kernels.encode_float(values, zeros, ones, fmax, *params, got)
            if fmt == "fp4":  # encode_float puts the sign at bit 7: fold it to bit 3
                got = (got & 0x07) | ((got >> 4) & 0x08)
        np.testing.assert_array_equal(got, want.view(got.dtype))
        if fmt_info.bits == 16:
            decode = _kernels.decode_f16 if fmt == "fp16" else _kernels.decode_bf16
            back = np.empty(values.shape, dtype=np.float32)
            stream = part % 2 == 1  # half of them with streaming stores
            decode(got, ones, minus_zeros, back, stream)
            assert_same_bits(back, want.astype(np.float32))


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
def test_every_float16_code_decodes_like_numpy():
    from embcomp.quantizers import _kernels

    codes = np.arange(1 << 16, dtype=np.uint16).reshape(1, -1)
    want = codes.view(np.float16).astype(np.float32)
    for stream in (False, True):
        got = np.empty(want.shape, dtype=np.float32)
        ones = np.ones(want.shape[1], dtype=np.float32)
        _kernels.decode_f16(codes, ones, np.full_like(ones, -0.0), got, stream)
        finite = np.isfinite(want)
        assert_same_bits(got[finite], want[finite])
        assert np.isnan(got[np.isnan(want)]).all() and np.array_equal(
            got[np.isinf(want)], want[np.isinf(want)]
        )


def test_warm_up_compiles_the_kernels(kernel_path):
    from embcomp.quantizers import _kernels

    assert jit.warm_up() >= 0
    compiled = [_kernels.encode_float, _kernels.encode_int4, _kernels.decode_f16]
    if kernel_path == "jit":
        assert all(kernel.signatures for kernel in compiled)


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
def test_kernels_compile_without_a_cache_directory():
    """numba refuses cache=True where it finds no writable cache; kernels still compile."""
    namespace: dict = {}
    exec("def add_one(x):\n    return x + 1", namespace)  # no source file: no cache locator
    assert jit.kernel(namespace["add_one"])(1) == 2


def _sum_squares(x):  # type: ignore[no-untyped-def]
    jit.prefer_wide_vectors()
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    return total


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
def test_prefer_wide_vectors_tags_the_kernel_and_changes_no_result():
    """The call compiles to the LLVM attribute "prefer-vector-width"="512" on the kernel
    that makes it (LLVM accepts the IR); in Python it does nothing."""
    import numba

    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    compiled = numba.njit(_sum_squares)  # no cache: its IR stays inspectable
    assert compiled(x) == _sum_squares(x)  # same float32 sum, in the same order
    (ir,) = compiled.inspect_llvm().values()
    assert '"prefer-vector-width"="512"' in ir


def test_prefer_wide_vectors_attribute_prints_in_valid_llvm_ir():
    pytest.importorskip("llvmlite")
    from llvmlite import binding, ir

    module = ir.Module(name="m")
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), []), name="f")
    ir.IRBuilder(function.append_basic_block()).ret_void()
    jit._tag_wide(function)
    jit._tag_wide(function)  # tagging twice adds it once
    text = str(module)
    assert text.count('"prefer-vector-width"="512"') == (1 if jit.AVAILABLE else 0)
    binding.parse_assembly(text).verify()


def _correctly_rounded_fma(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """a * b + c rounded once to float32, by exact rational arithmetic."""
    from fractions import Fraction

    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))  # may be off by one ulp (rounded twice)
    down, up = np.nextafter(guess, np.float32(-np.inf)), np.nextafter(guess, np.float32(np.inf))
    neighbours = [down, guess, up]

    def distance_then_odd(v: np.float32) -> tuple[Fraction, int]:  # ties: the even one
        return abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) % 2

    return min(neighbours, key=distance_then_odd)


def test_fma32_rounds_once_where_float64_would_round_twice():
    rng = np.random.default_rng(40)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    c = (rng.standard_normal(3000) * 10.0 ** rng.integers(-12, 4, 3000)).astype(np.float32)
    want = np.array([_correctly_rounded_fma(*t) for t in zip(a, b, c, strict=True)], np.float32)
    assert_same_bits(jit.fma32(a, b, c), want)
    # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24: a float32 midpoint. Any positive c, however
    # small, rounds it up; the float64 sum loses c and then rounds to even (down).
    x = np.float32(1 + 2**-12)
    for c_ in (2.0**-60, -(2.0**-60), 0.0, 2.0**-30):
        got = jit.fma32(x, x, np.float32(c_))
        assert isinstance(got, np.float32)
        assert got == _correctly_rounded_fma(x, x, np.float32(c_))
    assert jit.fma32(x, x, np.float32(2.0**-60)) != np.float32(float(x) * float(x) + 2.0**-60)


@pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed (pip install embcomp[fast])")
def test_compiled_fma32_is_the_numpy_one():
    """llvm.fma in a kernel against the numpy emulation: every magnitude, zeros of both
    signs, subnormals, overflow, inf and NaN."""
    import numba

    @numba.njit
    def fused(a, b, c, out):  # type: ignore[no-untyped-def]
        for i in range(a.shape[0]):
            out[i] = jit.fma32(a[i], b[i], c[i])

    rng = np.random.default_rng(41)
    n = 400_000
    a, b, c = (
        rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        for _ in range(3)
    )  # noqa: E501
    a[:1000], b[:1000] = rng.standard_normal((2, 1000)).astype(np.float32)
    c[:1000] = -a[:1000] * b[:1000]  # cancellation
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3e38], np.float32)
    grid_a, grid_b = np.meshgrid(specials, specials)
    a[1000:1049], b[1000:1049] = grid_a.ravel(), grid_b.ravel()
    out = np.empty(n, dtype=np.float32)
    with np.errstate(all="ignore"):
        fused(a, b, c, out)
        want = jit.fma32(a, b, c)
    nan = np.isnan(want)  # NaN payloads are the hardware's business
    assert np.array_equal(np.isnan(out), nan) and 1000 < nan.sum() < n // 2
    assert_same_bits(out[~nan], want[~nan])
