"""Optional compiled kernels: numba, when installed (``pip install embcomp[fast]``).

numpy needs several passes over a block for one quantizer (scale, clip, round, cast,
pack), and some casts (float16, bfloat16, float8) are slow element loops in numpy or
ml_dtypes. A numba kernel does the whole quantizer in one pass and releases the GIL,
so the thread pool of :mod:`embcomp._blocks` runs it on every core.

The compiled kernels compute exactly what the numpy code computes, in float32 and in
the same order (numba does not contract ``a * b + c`` into an FMA or reorder float
arithmetic unless asked with ``fastmath``, which we never do; a kernel that wants a
fused multiply-add calls :func:`fma32`, which numpy reproduces exactly), so the codes
are bit-identical either way; ``tests/test_kernels.py`` runs every check on both paths.

Without numba, or with ``EMBCOMP_JIT=0`` in the environment, everything runs on
the numpy path. Kernels compile on first use (about a second each) and are cached on
disk by numba (``NUMBA_CACHE_DIR`` chooses where).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ._validation import env_int

try:  # pragma: no cover - depends on the installed extras
    import numba
except ImportError:  # pragma: no cover
    numba = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])

AVAILABLE = numba is not None
# Read at call time by the quantizers; tests and the speed benchmark flip it.
ENABLED = AVAILABLE and os.environ.get("EMBCOMP_JIT", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def enabled() -> bool:
    """Whether quantizers use the compiled kernels now."""
    return ENABLED


def set_enabled(value: bool) -> bool:
    """Turn the compiled kernels on or off (for comparisons); returns the old setting.

    Turning them on without numba installed raises ``RuntimeError``.
    """
    global ENABLED
    if value and not AVAILABLE:
        raise RuntimeError("numba is not installed: pip install 'embcomp[fast]'")
    old, ENABLED = ENABLED, bool(value)
    return old


def kernel(function: F) -> F:
    """Compile ``function`` lazily with numba (no GIL, cached); as is without numba.

    Without numba the plain Python function is returned; callers only call kernels
    when :func:`enabled` is true, so it never runs element by element in Python
    (except in tests that check it against the compiled one).
    """
    return _compile(function)


def inline_kernel(function: F) -> F:
    """:func:`kernel` for helpers that other kernels call in their inner loops: numba
    inlines it into every caller. A call between kernels passes each array as a struct
    and counts its references (atomic operations), which costs as much as summing a
    hundred floats."""
    return _compile(function, inline="always")


def _compile(function: F, **options: Any) -> F:
    if numba is None:  # pragma: no cover
        return function
    try:
        compiled: Any = numba.njit(nogil=True, cache=True, error_model="numpy", **options)(function)
    except RuntimeError:  # no writable cache directory: compile in every process instead
        compiled = numba.njit(nogil=True, error_model="numpy", **options)(function)
    return compiled  # type: ignore[no-any-return]


def prefer_wide_vectors() -> None:
    """Called first thing in a kernel: let LLVM vectorize that kernel's loops 512 bits
    wide where the CPU has AVX-512 (a no-op in Python and on other CPUs).

    LLVM's tuning for AVX-512 CPUs prefers 256-bit vectors (512-bit ones slowed the
    clock of early AVX-512 chips), and numba has no option per function. For loops
    bound by float throughput, such as the k-means scores of ``alloc``, 512 bits are
    12-22% faster on this project's machine; for memory-bound loops (the plain
    decoders) they were slower, so only kernels that ask get them. Vector width does
    not change float results: each lane computes what the scalar loop would.

    The call compiles to nothing but the LLVM function attribute
    ``"prefer-vector-width"="512"`` on the kernel (see ``_lower_prefer_wide``).
    """


def fma32(a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` of float32 values or arrays, rounded once: a fused multiply-add.

    Compiled, this is LLVM's ``llvm.fma.f32`` (one ``vfmadd`` instruction; numba
    never fuses ``a * b + c`` by itself). In numpy, the same correctly rounded value:
    the product of two float32 is exact in float64 (24 + 24 bits); the float64 sum is
    rounded to odd (TwoSum gives its rounding error; an inexact sum with an even last
    bit moves one ulp towards the exact value); rounding that to float32 is then
    correct (Boldo and Melquiond, 2008: 53 >= 24 + 2 bits), where a plain float64 sum
    could round twice the wrong way.
    """
    c = np.asarray(c, dtype=np.float32)
    product = np.multiply(np.asarray(a, np.float32), np.asarray(b, np.float32), dtype=np.float64)
    total = product + c
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN inputs
        back = total - product
        error = (product - (total - back)) + (c - back)  # total + error == product + c
        inexact_even = (error != 0) & ((np.asarray(total).view(np.uint64) & 1) == 0)
        if inexact_even.any():  # to odd: one ulp towards the exact value
            total = np.where(inexact_even, np.nextafter(total, np.copysign(np.inf, error)), total)
        return np.asarray(total).astype(np.float32)[()]


# -- streaming stores --------------------------------------------------------------------
# A decoder writes 4 bytes of float32 per element. Plain stores first read every cache
# line they fill (to own it), and once the output outgrows the cache each line goes
# back to memory: two bytes of traffic per byte of output, and a core can only wait on
# so many lines at once. Non-temporal ("streaming") stores write whole lines straight
# to memory. On this project's machine that makes int8 decode 2.4x faster on one core
# for outputs beyond the cache (~50 MiB here), and up to 2x slower for outputs that fit
# in it (the data must then come back from memory), hence the threshold, which
# EMBCOMP_STREAM_BYTES sets.
STREAM_BYTES: int = env_int("EMBCOMP_STREAM_BYTES", 64 << 20) or 0


def streams(out: np.ndarray) -> bool:
    """Whether a decoder should write ``out`` (n, d) float32, a buffer the caller passed,
    with streaming stores: the compiled kernels are on and ``out`` has at least
    ``STREAM_BYTES``.

    Not for fresh outputs: the kernel zeroes each new page as it is first touched, which
    leaves its lines in the cache, and streaming stores over cached lines are slower
    than plain stores into them (int8 decode into fresh memory: 0.7x).
    """
    return bool(
        ENABLED
        and out.ndim == 2
        and out.dtype == np.float32
        and out.flags.c_contiguous
        and out.flags.aligned
        and out.nbytes >= STREAM_BYTES
    )


# How a kernel streams its output, row by row (``stream`` false: straight into ``out``):
#
#     target, base, flat, lead = stream_start(out, stream)
#     carry = 0
#     for i in range(n):
#         r = 0 if stream else i
#         for j in range(d):
#             target[r, base + j] = ...value of out[i, j]...
#         if stream:
#             carry = finish_row(flat, lead, (i + 1) * d, target, carry)
#     if stream:
#         finish_stream(flat, n * d, target, carry)
#
# The loop that computes a row cannot stream by itself: LLVM only vectorizes streaming
# stores it can prove 32-byte aligned, and numba's element stores are not. So when
# streaming, ``target`` is a one-row stage (the row at ``base`` = 8, after room for 8
# values) whose stores stay in the L1 cache, and finish_row streams every aligned 32
# bytes the stage completes; the few values after the last boundary wait in front of
# the row for the next one. Any row width and any output alignment stream fully (a
# cache line written half by plain stores and half by streaming ones would cost more
# than it saves). Not streaming, ``target`` is ``out`` and ``base`` 0.
#
# Make no array views (slices, ``out[i]``) in the row loop: numba counts references to
# them with atomic instructions, which wait for every streaming store in flight; one
# per row made streaming 1.7x slower than plain stores.
@inline_kernel
def stream_start(out: np.ndarray, stream: bool) -> tuple[np.ndarray, int, np.ndarray, int]:
    """``(target, base, flat, lead)``: where rows go (a stage of 8 + d values when
    streaming, else ``out``), the offset of a row in it, ``out`` as a flat array, and how
    many values of it come before its first 32-byte boundary."""
    n, d = out.shape
    stage = np.empty((1, 8 + d if stream else 0), dtype=np.float32)
    lead = ((32 - (out.ctypes.data & 31)) & 31) >> 2
    return (stage if stream else out), (8 if stream else 0), out.reshape(n * d), lead


@inline_kernel
def finish_row(flat: np.ndarray, lead: int, stop: int, stage: np.ndarray, carry: int) -> int:
    """Stream a row and the ``carry`` values waiting before it in ``stage`` (they end at
    ``flat[stop]``) in whole aligned 32-byte pieces; return how many values are left,
    moved to wait just before the next row.

    Values before the output's first 32-byte boundary (``lead``) get plain stores.
    """
    total = carry + stage.shape[1] - 8
    pos = stop - total
    first = 8 - carry  # where the values start in the stage
    k = min((lead - pos) & 7, total)  # values before a boundary: first row only
    for t in range(k):
        flat[pos + t] = stage[0, first + t]
    while k + 8 <= total:
        _store8_streaming(flat, pos + k, stage, first + k)
        k += 8
    rest = total - k
    for t in range(rest):  # forwards: the destination starts before the source
        stage[0, 8 - rest + t] = stage[0, first + k + t]
    return rest


@inline_kernel
def finish_stream(flat: np.ndarray, stop: int, stage: np.ndarray, carry: int) -> None:
    """Write the last ``carry`` values (ending at ``flat[stop]``), then fence."""
    for t in range(carry):
        flat[stop - carry + t] = stage[0, 8 - carry + t]
    stream_fence()


def _store8_streaming(dst: np.ndarray, k: int, src: np.ndarray, s: int) -> None:
    """Flat elements ``k:k+8`` of ``dst`` = flat elements ``s:s+8`` of ``src`` (C-contiguous
    float32 arrays); compiled, one 32-byte non-temporal store, which requires that
    element of ``dst`` to be 32-byte aligned (:func:`finish_row` makes sure)."""
    dst.reshape(-1)[k : k + 8] = src.reshape(-1)[s : s + 8]


def stream_fence() -> None:
    """Called by a kernel after its streaming stores: they are weakly ordered, and the
    fence (``sfence`` on x86) makes them visible before anything the kernel does next,
    such as the thread pool reporting the block done."""


def _tag_wide(function: Any) -> None:
    """Add ``"prefer-vector-width"="512"`` to an llvmlite ``ir.Function``.

    llvmlite only knows LLVM's keyword attributes, so the function's attribute set is
    swapped for one that also prints this string attribute. Should llvmlite's internals
    change, the kernel stays as it was (256-bit vectors), never broken.
    """
    try:
        attributes = function.attributes
        if getattr(attributes, "prefers_wide_vectors", False):
            return
        wide = _WideAttributes()
        for name in attributes:
            wide.add(name)
        wide.alignstack = attributes.alignstack
        wide.personality = attributes.personality
        function.attributes = wide
    except Exception:  # pragma: no cover - depends on llvmlite's internals
        return


if numba is not None:  # pragma: no branch
    # numba's extension API: typing and lowering for plain functions called in kernels.
    from llvmlite import binding as _binding
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.extending import lower_builtin, type_callable

    _X86 = _binding.get_process_triple().startswith(("x86_64", "i386", "i686"))

    @type_callable(fma32)
    def _type_fma32(context: Any) -> Any:
        def typer(a: Any, b: Any, c: Any) -> Any:
            return _types.float32 if a == b == c == _types.float32 else None

        return typer

    @lower_builtin(fma32, _types.float32, _types.float32, _types.float32)
    def _lower_fma32(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        f32 = _ir.FloatType()
        signature = _ir.FunctionType(f32, [f32] * 3)
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], signature)
        return builder.call(fma, args)

    @type_callable(prefer_wide_vectors)
    def _type_prefer_wide(context: Any) -> Any:
        return lambda: _types.none

    @lower_builtin(prefer_wide_vectors)
    def _lower_prefer_wide(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        _tag_wide(builder.function)
        return context.get_dummy_value()

    @type_callable(_store8_streaming)
    def _type_store8_streaming(context: Any) -> Any:
        def typer(dst: Any, k: Any, src: Any, s: Any) -> Any:
            rows = all(
                isinstance(a, _types.Array) and a.dtype == _types.float32 and a.layout == "C"
                for a in (dst, src)
            )
            offsets = isinstance(k, _types.Integer) and isinstance(s, _types.Integer)
            return _types.none if rows and offsets else None

        return typer

    @lower_builtin(_store8_streaming, _types.Array, _types.Integer, _types.Array, _types.Integer)
    def _lower_store8_streaming(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        dst_type, k_type, src_type, s_type = sig.args
        dst = context.make_array(dst_type)(context, builder, args[0])
        src = context.make_array(src_type)(context, builder, args[2])
        k = context.cast(builder, args[1], k_type, _types.intp)
        s = context.cast(builder, args[3], s_type, _types.intp)
        vector = _ir.VectorType(_ir.FloatType(), 8).as_pointer()
        value = builder.load(builder.bitcast(builder.gep(src.data, [s]), vector), align=4)
        store = builder.store(value, builder.bitcast(builder.gep(dst.data, [k]), vector), align=32)
        store.set_metadata("nontemporal", builder.module.add_metadata([_ir.IntType(32)(1)]))
        return context.get_dummy_value()

    @type_callable(stream_fence)
    def _type_stream_fence(context: Any) -> Any:
        return lambda: _types.none

    @lower_builtin(stream_fence)
    def _lower_stream_fence(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if _X86:
            void = _ir.FunctionType(_ir.VoidType(), [])
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=void), [])
        else:  # pragma: no cover - other CPUs: a full fence orders every store
            builder.fence("seq_cst")
        return context.get_dummy_value()

    try:  # llvmlite internals: without them, kernels keep 256-bit vectors

        class _WideAttributes(_ir.values.FunctionAttributes):  # type: ignore[misc]
            prefers_wide_vectors = True

            def __bool__(self) -> bool:  # printed even when no keyword attribute is set
                return True

            def _to_list(self, ret_type: Any) -> list[str]:
                return [*super()._to_list(ret_type), '"prefer-vector-width"="512"']

    except Exception:  # pragma: no cover
        pass


def warm_up() -> float:
    """Compile every quantizer kernel now (or load it from numba's cache); returns seconds.

    Kernels otherwise compile on first use, which makes the first call of each format
    ~1 s slower. The service warms up in the background at start.
    """
    import time

    import numpy as np

    from .codec import make_codec
    from .quantizers import FORMATS

    start = time.perf_counter()
    if ENABLED:
        X = np.linspace(-1.0, 1.0, 6 * 5, dtype=np.float32).reshape(6, 5)  # odd d: both 4-bit paths
        for spec in [*(f for f in FORMATS if f != "fp32"), "int8", "int4"]:
            codec = make_codec(spec).fit(X)
            codec.decode(codec.encode(X))
    return time.perf_counter() - start
