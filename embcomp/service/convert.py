"""numpy arrays <-> ``embcomp.v1`` messages, shared by the server and the client.

Vectors travel as ``Matrix`` (row-major, little-endian float32 or float16 bytes) and
codes as ``Codes``; both are read with ``np.frombuffer`` (no per-element Python work).
Every check here raises an embcomp error, so the one error table maps it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import check_matrix, to_float32
from ..exceptions import InputError
from ..v1 import types_pb2
from .errors import LimitExceededError

__all__ = [
    "array_to_codes",
    "array_to_matrix",
    "codes_to_array",
    "matrix_to_array",
]

_WIRE_DTYPES: dict[int, np.dtype] = {
    types_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
}


def _check_rows(rows: int, name: str, max_rows: int | None) -> None:
    if max_rows is not None and rows > max_rows:
        raise LimitExceededError(
            f"{name} has {rows} rows, more than this server's limit of {max_rows} per "
            "request; split it (the streaming RPCs take any number of messages)"
        )


def matrix_to_array(
    matrix: types_pb2.Matrix, *, name: str = "vectors", max_rows: int | None = None
) -> np.ndarray:
    """Read-only view (rows, cols) float32 or float16 of a ``Matrix``'s bytes.

    Raises
    ------
    InputError
        dtype unset or unknown, zero rows or cols, byte count not rows * cols * itemsize.
    LimitExceededError
        More than ``max_rows`` rows.
    """
    dtype = _WIRE_DTYPES.get(matrix.dtype)
    if dtype is None:
        raise InputError(
            f"{name}.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16; got {_dtype_name(matrix.dtype)}"
        )
    rows, cols = matrix.rows, matrix.cols
    if rows == 0 or cols == 0:
        raise InputError(f"{name} is empty (rows={rows}, cols={cols}); send at least one vector")
    _check_rows(rows, name, max_rows)
    data = matrix.data
    expected = rows * cols * dtype.itemsize
    if len(data) != expected:
        raise InputError(
            f"{name} has {len(data)} data bytes but rows * cols * {dtype.itemsize} = {expected} "
            f"for {rows} x {cols} {dtype.name}; send row-major little-endian data"
        )
    return np.frombuffer(data, dtype=dtype).reshape(rows, cols)


def _dtype_name(value: int) -> str:
    try:
        return types_pb2.DType.Name(value)
    except ValueError:
        return f"unknown value {value}"


def codes_to_array(
    codes: types_pb2.Codes, *, name: str = "codes", max_rows: int | None = None
) -> np.ndarray:
    """Read-only uint8 view (rows, code_size) of a ``Codes`` message's bytes.

    The codec checks ``code_size`` against its own (``DimensionMismatchError``).
    """
    rows, code_size = codes.rows, codes.code_size
    if rows == 0 or code_size == 0:
        raise InputError(
            f"{name} is empty (rows={rows}, code_size={code_size}); send at least one code"
        )
    _check_rows(rows, name, max_rows)
    data = codes.data
    if len(data) != rows * code_size:
        raise InputError(
            f"{name} has {len(data)} data bytes but rows * code_size = {rows * code_size} "
            f"for {rows} codes of {code_size} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(rows, code_size)


def array_to_matrix(
    X: Any, *, name: str = "vectors", out: types_pb2.Matrix | None = None
) -> types_pb2.Matrix:
    """A ``Matrix`` holding ``X`` (n, d): float16 is sent as is, other floats as float32.

    With ``out`` (e.g. ``request.vectors``), fill that field in place: assigning a
    finished Matrix to a request's field would copy its bytes once more.
    """
    X = check_matrix(X, name=name, allow_empty=True)
    wire = np.dtype("<f2") if X.dtype == np.float16 else np.dtype("<f4")
    matrix = out if out is not None else types_pb2.Matrix()
    matrix.rows, matrix.cols = X.shape
    matrix.dtype = types_pb2.DTYPE_FLOAT16 if wire.itemsize == 2 else types_pb2.DTYPE_FLOAT32
    if wire.itemsize == 4:  # float64 beyond float32's range: an error naming the row
        X = to_float32(X, name=name)
    matrix.data = np.ascontiguousarray(X, dtype=wire).tobytes()
    return matrix


def array_to_codes(codes: Any, *, out: types_pb2.Codes | None = None) -> types_pb2.Codes:
    """A ``Codes`` message holding uint8 codes (n, code_size) (``out``: fill in place)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise InputError(
            f"codes must be a 2-D uint8 array as returned by encode; got {codes.dtype} "
            f"with shape {codes.shape}"
        )
    message = out if out is not None else types_pb2.Codes()
    message.rows, message.code_size = codes.shape
    message.data = np.ascontiguousarray(codes).tobytes()
    return message
