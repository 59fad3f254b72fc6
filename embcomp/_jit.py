"""Optional compiled kernels: numba, when installed (``pip install embcomp[fast]``).

numpy needs several passes over a block for one quantizer (scale, clip, round, cast,
pack), and some casts (float16, bfloat16, float8) are slow element loops in numpy or
ml_dtypes. A numba kernel does the whole quantizer in one pass and releases the GIL,
so the thread pool of :mod:`embcomp._blocks` runs it on every core.

The compiled kernels compute exactly what the numpy code computes, in float32 and in
the same order (numba does not contract ``a * b + c`` into an FMA or reorder float
arithmetic unless asked with ``fastmath``, which we never do), so the codes are
bit-identical either way; ``tests/test_kernels.py`` runs every check on both paths.

Without numba, or with ``EMBCOMP_JIT=0`` in the environment, everything runs on
the numpy path. Kernels compile on first use (about a second each) and are cached on
disk by numba (``NUMBA_CACHE_DIR`` chooses where).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

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
