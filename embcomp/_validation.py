"""Input checks shared by every entry point: one place decides what a bad array is."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .exceptions import DimensionMismatchError, InputError, NotFittedError

_FLOAT_KINDS = (np.float16, np.float32, np.float64)


def env_int(name: str, default: int | None, *, minimum: int = 0) -> int | None:
    """Whole-number setting from environment variable ``name``; ``default`` if unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number; got {raw!r}") from None
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}; got {value}")
    return value


def check_matrix(
    X: Any, *, name: str = "X", d: int | None = None, allow_empty: bool = False
) -> np.ndarray:
    """Check that ``X`` is a 2-D float array of width ``d``; return it without copying.

    Parameters
    ----------
    X : array_like, shape (n, d), float16, float32 or float64
    name : what to call the array in messages.
    d : required width, or ``None`` to accept any.
    allow_empty : accept ``n == 0`` (encoding nothing is fine; fitting on nothing is not).

    Raises
    ------
    InputError
        Not an array, not 2-D, not a float dtype, empty.
    DimensionMismatchError
        Width differs from ``d``.

    Finiteness is checked block by block where the data is processed
    (:func:`check_finite`), so large inputs are not read twice.
    """
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is bad input
            raise InputError(f"{name} must be a 2-D float array; could not convert: {exc}") from exc
    if X.ndim != 2:
        raise InputError(
            f"{name} must be 2-D (n_vectors, dim); got {X.ndim}-D with shape {X.shape}; "
            "reshape a single vector with x[None, :]"
        )
    if X.dtype not in _FLOAT_KINDS:
        raise InputError(
            f"{name} must be float16, float32 or float64; got dtype {X.dtype}; "
            "convert with X.astype(np.float32)"
        )
    if X.shape[1] == 0:
        raise InputError(f"{name} has 0 dims (shape {X.shape}); each vector needs values")
    if X.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name} is empty (shape {X.shape}); pass at least one vector")
    if d is not None and X.shape[1] != d:
        raise DimensionMismatchError(
            f"{name} has {X.shape[1]} dims but the codec was fitted on {d}-dim vectors"
        )
    return X


def all_finite(X: np.ndarray) -> bool:
    """Whether ``X`` holds no NaN or inf, from its min and max (NaN propagates through
    both; an inf is one of them): no temporary the size of ``X``, where
    ``np.isfinite(X).all()`` takes a byte per value (a 100,000 x 3,072 training sample:
    307 MB)."""
    return X.size == 0 or bool(np.isfinite(X.min()) and np.isfinite(X.max()))


def check_finite(block: np.ndarray, *, name: str = "X", row_offset: int = 0) -> None:
    """Raise ``InputError`` naming the first row of ``block`` holding NaN or inf."""
    if not all_finite(block):
        bad_rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        first = int(bad_rows[0]) + row_offset
        raise InputError(
            f"{name} row {first} contains NaN or inf ({bad_rows.size} bad rows in this block); "
            "drop or repair non-finite vectors before encoding"
        )


def column_range(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max of a finite (n >= 1, d) float array, in one pass each and
    without temporaries of ``X``'s size: what a fit learns ranges from, checks that the
    rows are not all identical (min == max everywhere) and finds the largest magnitude
    with (``max(|min|, |max|)``; ``np.abs(X)`` would copy ``X``)."""
    return X.min(axis=0), X.max(axis=0)


def check_not_an_input(output: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> None:
    """Raise ``InputError`` if ``output`` is (the same file as) one of ``inputs``:
    writing it would destroy what is being read."""
    for path in inputs:
        try:
            same = os.path.samefile(output, path)
        except OSError:  # one of them does not exist (yet)
            continue
        if same:
            raise InputError(
                f"output {str(output)!r} is the input {str(path)!r}; choose another output"
            )


def to_float32(X: np.ndarray, *, name: str = "X", row_offset: int = 0) -> np.ndarray:
    """``X`` (a checked float matrix) as C-contiguous float32, without copying when it is
    already; a finite float64 value beyond float32's range (+-3.4e38) raises an
    ``InputError`` naming its row, instead of a RuntimeWarning and an inf."""
    with np.errstate(over="ignore"):
        X32 = np.ascontiguousarray(X, dtype=np.float32)
    if X.dtype.itemsize > 4 and not all_finite(X32):
        check_float32_range(X, name=name, row_offset=row_offset)
    return X32


def check_float32_range(rows: np.ndarray, *, name: str = "X", row_offset: int = 0) -> None:
    """Raise ``InputError`` naming the first row of ``rows`` whose finite values become
    inf in float32 (NaN and inf themselves are :func:`check_finite`'s business)."""
    with np.errstate(over="ignore", invalid="ignore"):
        beyond = np.isinf(rows.astype(np.float32)) & np.isfinite(rows)
    if beyond.any():
        row = int(np.flatnonzero(beyond.any(axis=1))[0])
        value = float(np.abs(rows[row][beyond[row]]).max())
        raise InputError(
            f"{name} row {row + row_offset} holds {value:.3g}, beyond float32's range "
            "(+-3.4e38): rescale the vectors"
        )


def check_codes(codes: Any, *, code_size: int, name: str = "codes") -> np.ndarray:
    """Check that ``codes`` is a uint8 array of shape (n, code_size)."""
    if not isinstance(codes, np.ndarray):
        codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise InputError(f"{name} must be uint8 as produced by encode(); got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise InputError(f"{name} must be 2-D (n_vectors, code_size); got shape {codes.shape}")
    if codes.shape[1] != code_size:
        raise DimensionMismatchError(
            f"{name} have {codes.shape[1]} bytes per vector but this codec's code_size is "
            f"{code_size}; were they encoded with another codec?"
        )
    return codes


_HUGE_PAGE = 2 << 20
# fresh_array aligns arrays from this size on (below it, glibc may hand out memory that
# is already faulted in, and the extra huge page at the end would cost more than 6%).
FRESH_ALIGN_FROM = 32 << 20
FRESH_SPARE = 2 * _HUGE_PAGE  # address space reserved beyond an aligned array


def fresh_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)`` for an output about to be written whole; one of 32 MiB
    or more starts on a 2 MiB boundary, inside an allocation ``FRESH_SPARE`` larger.

    numpy asks Linux to back large arrays with 2 MiB huge pages, but the kernel maps one
    only over an aligned 2 MiB range that the request covers whole, and numpy's request
    starts a page into the allocation. The first and last MiB or so of an output were
    therefore faulted in 4 KiB pages, which cost about five times as much per byte.
    Aligned, decoding 100,000 x 768 int8 codes into fresh memory took 16.1 ms instead of
    17.2 ms (bf16 at 200,000 x 384: 18.2 ms instead of 19.9 ms; others 0-3% faster).
    The spare is never written; only its part in the array's last huge page is ever
    backed by memory. The array is a view (``base`` is the allocation).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # math.prod: 0.1 us, np.prod: 2.5 us
    if nbytes < FRESH_ALIGN_FROM:
        return np.empty(shape, dtype=dtype)
    raw = np.empty(nbytes + FRESH_SPARE, dtype=np.uint8)
    start = -raw.ctypes.data % _HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def check_output(
    out: Any, shape: tuple[int, int], source: np.ndarray, *, encoding: bool = False
) -> np.ndarray:
    """The output of a decode (float32; ``source`` the codes) or, with ``encoding``, of
    an encode (uint8; ``source`` the vectors): a new array of ``shape`` when ``out`` is
    None (see :func:`fresh_array`), else the caller's buffer once checked (a writeable,
    C-contiguous ndarray of that dtype and exactly ``shape`` that does not overlap
    ``source``)."""
    dtype = np.dtype(np.uint8 if encoding else np.float32)
    if out is None:
        return fresh_array(shape, dtype)
    work, source_name, done = (
        ("encoding", "vectors", "encoded") if encoding else ("decoding", "codes", "decoded")
    )
    if not isinstance(out, np.ndarray):
        raise InputError(f"out must be a numpy array; got {type(out).__name__}")
    if out.dtype != dtype:
        raise InputError(f"out must be {dtype.name}; got dtype {out.dtype}")
    if out.shape != shape:
        raise DimensionMismatchError(
            f"out has shape {out.shape}; {work} these {source_name} needs {shape}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InputError("out must be C-contiguous and writeable")
    if np.shares_memory(out, source):
        raise InputError(f"out overlaps the {source_name} being {done}; pass a separate buffer")
    return out


def check_is_fitted(obj: object, attribute: str) -> None:
    """Raise ``NotFittedError`` unless ``obj`` has the fitted ``attribute``."""
    if getattr(obj, attribute, None) is None:
        raise NotFittedError(
            f"this {type(obj).__name__} is not fitted yet; call fit(X) with training vectors first"
        )


# A float32 sum of squares at least this large has lost nothing to underflow: squares
# that underflow (below 2**-126 each) add up to under d * 2**-126, a relative error of
# d * 2**-66, far below float32's 2**-24 for any d.
_SAFE_SQUARES = 2.0**-60
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Scale rows of a writable float32 array to unit norm in place (zero rows stay zero).

    Rows whose float32 sum of squares underflowed (values below ~1e-19) or overflowed
    (norms beyond ~1.8e19) are scaled in float64 instead, so every finite nonzero row
    comes out with unit norm, whatever its scale. (A NaN or inf row stays non-finite.)
    """
    squares = np.einsum("ij,ij->i", X, X)
    exact = (squares >= _SAFE_SQUARES) & (squares <= _FLOAT32_MAX)
    norms = np.sqrt(squares)
    norms[squares == 0] = 1.0
    if exact.all():
        X /= norms[:, None]
        return X
    X[exact] /= norms[exact, None]
    rows = X[~exact].astype(np.float64)
    wide = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    wide[wide == 0] = 1.0
    X[~exact] = rows / wide[:, None]
    return X


def unit_rows(X: Any) -> np.ndarray:
    """A float32 copy of ``X`` with every nonzero row scaled to unit norm."""
    return normalize_rows(np.array(X, dtype=np.float32, copy=True))
