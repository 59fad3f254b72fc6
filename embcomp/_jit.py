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
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.extending import lower_builtin, type_callable

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
