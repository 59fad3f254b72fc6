"""Reading and writing vector files: ``.npy`` (memory-mapped) and ``.fvecs``.

Readers return arrays that may be memory maps, so nothing is loaded until used;
writers go through a temporary file and a rename.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._atomic import atomic_output
from ._validation import check_float32_range, check_matrix
from .exceptions import InputError

__all__ = ["read_fvecs", "read_vectors", "write_fvecs", "write_vectors"]

_VECTOR_DTYPES = (np.float16, np.float32, np.float64)


def _suffix(path: str | os.PathLike[str]) -> str:
    return Path(path).suffix.lower()


def read_vectors(path: str | os.PathLike[str], *, mmap: bool = True) -> np.ndarray:
    """Read a (n, d) float matrix from ``.npy`` or ``.fvecs`` (memory-mapped by default)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {str(path)!r} does not exist")
    suffix = _suffix(path)
    if suffix == ".npy":
        return _read_npy(path, mmap)
    if suffix == ".fvecs":
        return read_fvecs(path, mmap=mmap)
    raise InputError(f"{str(path)!r}: unsupported file type {suffix!r}; use .npy or .fvecs")


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (PermissionError, IsADirectoryError) as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{str(path)!r} is not a readable .npy file (truncated?): {exc}") from exc
    if array.ndim != 2:
        raise InputError(f"{str(path)!r}: expected a 2-D (n, d) array, got shape {array.shape}")
    if array.dtype.kind == "f" and not array.dtype.isnative:
        raise InputError(
            f"{str(path)!r}: big-endian {array.dtype} vectors; save them little-endian, "
            "e.g. np.save(path, X.astype(X.dtype.newbyteorder('<')))"
        )
    if array.dtype not in _VECTOR_DTYPES:
        raise InputError(f"{str(path)!r}: expected float16/32/64 vectors, got dtype {array.dtype}")
    return array


def read_fvecs(path: str | os.PathLike[str], *, mmap: bool = True) -> np.ndarray:
    """Read a TEXMEX ``.fvecs`` file: per vector an int32 dim then dim float32 values."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if size == 0:
        raise InputError(f"{str(path)!r} is empty")
    if size % 4:
        raise InputError(f"{str(path)!r}: size {size} is not a multiple of 4 (truncated?)")
    raw = np.memmap(path, dtype="<i4", mode="r") if mmap else np.fromfile(path, dtype="<i4")
    d = int(raw[0])
    if d <= 0 or size % (4 * (d + 1)):
        raise InputError(
            f"{str(path)!r}: first record says dim {d}, but the file size {size} is not a "
            f"multiple of {4 * (d + 1)} bytes (truncated or not .fvecs)"
        )
    records = raw.reshape(-1, d + 1)
    if not (records[:, 0] == d).all():
        bad = int(np.flatnonzero(records[:, 0] != d)[0])
        raise InputError(f"{str(path)!r}: record {bad} has dim {records[bad, 0]}, expected {d}")
    return records[:, 1:].view("<f4")


def write_fvecs(path: str | os.PathLike[str], X: np.ndarray) -> None:
    """Write (n, d) float vectors to ``.fvecs`` (as float32) atomically.

    At least one vector: the format stores the dimension only in each vector's record.
    """
    name = f"vectors for {str(path)!r}"
    X = check_matrix(X, name=name)
    if X.dtype.itemsize > 4:
        check_float32_range(X, name=name)
    X = np.ascontiguousarray(X, dtype="<f4")
    records = np.empty((X.shape[0], X.shape[1] + 1), dtype="<i4")
    records[:, 0] = X.shape[1]
    records[:, 1:] = X.view("<i4")
    with atomic_output(path) as handle:
        handle.write(records.tobytes())


def write_vectors(path: str | os.PathLike[str], X: np.ndarray) -> None:
    """Write an array to ``.npy`` (any dtype, e.g. uint8 codes) or ``.fvecs`` atomically."""
    suffix = _suffix(path)
    if suffix == ".fvecs":
        if np.asarray(X).dtype.kind != "f":
            raise InputError(
                f"{str(path)!r}: .fvecs holds float vectors; write {np.asarray(X).dtype} "
                "arrays (such as codes) to .npy"
            )
        write_fvecs(path, X)
    elif suffix == ".npy":
        with atomic_output(path) as handle:
            np.save(handle, np.asarray(X), allow_pickle=False)
    else:
        raise InputError(f"{str(path)!r}: unsupported output type {suffix!r}; use .npy or .fvecs")
