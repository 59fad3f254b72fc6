"""The quantizer contract (FAISS ``sa_encode`` / ``sa_decode`` / ``sa_code_size``)."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import numpy as np

from .. import _jit
from .._blocks import Scratch, cache_rows_per_block, float32_block, map_blocks
from .._stage import FittedStage
from .._validation import (
    check_codes,
    check_finite,
    check_matrix,
    check_output,
    column_range,
    to_float32,
)
from ..exceptions import ArtifactError, InputError

# Compiled kernels use no block-sized temporaries: their blocks are this many times larger.
_COMPILED_BLOCK_FACTOR = 8
# Training values must reach this magnitude: a float32 below ~2**-126 is subnormal (fewer
# bits), and scales, steps and decoded values reach ~2**-40 below the largest value.
_SMALLEST_TOP = 2.0**-64


class Quantizer(FittedStage):
    """Maps float vectors of width ``d_`` to ``code_size`` bytes each, and back.

    Subclasses implement ``_fit(X)`` and the kernels of one block: either
    ``_encode_block(X) -> uint8`` and ``_decode_block(codes) -> float32``, or the
    faster ``_encode_into`` / ``_decode_into`` that write into the output. This class
    does validation and blocking, on all cores (see ``embcomp._blocks``).

    Attributes
    ----------
    d_ : int
        Width of the vectors seen in ``fit``.
    """

    bits: ClassVar[int]  # bits per dimension, for code_size
    d_: int | None = None

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector."""
        self._check_fitted()
        assert self.d_ is not None
        return (self.d_ * self.bits + 7) // 8

    def fit(self, X: Any, *, origin: Any = None) -> Quantizer:
        """Fit scales/ranges on training vectors ``X`` (n, d) float; returns ``self``.

        ``origin``: where the codec's input space has its origin in ``X``'s coordinates
        (``reducer.transform(0)`` after a reducer; None: ``X``'s own origin). A quantizer
        that weighs its errors by how inner-product queries see them uses it (alloc's
        ``metric="ip"``); the others ignore it.
        """
        X = check_matrix(X, name="training vectors")
        need = self._min_fit_rows()
        if X.shape[0] < need:
            raise InputError(
                f"{type(self).__name__} calibrates its ranges on the training vectors and "
                f"needs at least {need}; got {X.shape[0]} (from one, every dimension's range "
                "is a single value, and every other vector would clip to it)"
            )
        X32 = to_float32(X, name="training vectors")
        check_finite(X32, name="training vectors")
        lo, hi = column_range(X32)
        if need > 1 and (lo == hi).all():
            raise InputError(
                f"{type(self).__name__} calibrates its ranges on the training vectors, and "
                f"all {X32.shape[0]} are identical: every dimension's range is a single "
                "value, and every other vector would clip to it; fit on varied vectors"
            )
        top = float(np.maximum(np.abs(lo), np.abs(hi)).max(initial=0.0))
        if 0 < top < _SMALLEST_TOP:
            raise InputError(
                f"the values to quantize are at most {top:.3g} in magnitude, too close to "
                "float32's smallest numbers (quantizers need some above 2**-64 = 5.4e-20): "
                "rescale the vectors (l2norm, or a constant factor)"
            )
        self._fit_copy(X32, d_=X32.shape[1])
        return self

    def _min_fit_rows(self) -> int:
        """Training vectors :meth:`fit` needs: two for a quantizer whose ranges come from
        the data (as PCA needs two), one where a single vector calibrates nothing."""
        return 2

    def encode(self, X: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Encode ``X`` (n, d_) float -> uint8 codes (n, code_size).

        ``out``: a uint8 (n, code_size) C-contiguous buffer to write into and return
        (like FAISS's ``sa_encode(x, codes)``), which skips the page faults of fresh memory.
        If encoding fails (a non-finite row), ``out`` is partly written.
        """
        self._check_fitted()
        X = check_matrix(X, d=self.d_, allow_empty=True)
        out = check_output(out, (X.shape[0], self.code_size), X, encoding=True)

        def work(start: int, stop: int, scratch: Scratch) -> None:
            block, owned = float32_block(X, start, stop, scratch)
            self._encode_checked(block, out[start:stop], scratch, overwrite=owned, row_offset=start)

        assert self.d_ is not None
        map_blocks(X.shape[0], self._block_rows(X), work, divisible=True)
        return out

    def decode(self, codes: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Decode uint8 codes (n, code_size) -> float32 vectors (n, d_).

        ``out``: a float32 (n, d_) C-contiguous buffer to write into and return. Reusing
        one skips the page faults of fresh memory (over half of a large decode's time),
        and one of 64 MiB or more is written with streaming stores (``embcomp._jit.streams``:
        1.04-3.9x faster than FAISS's ``sa_decode`` into a buffer).
        """
        self._check_fitted()
        codes = check_codes(codes, code_size=self.code_size)
        assert self.d_ is not None
        shape = (codes.shape[0], self.d_)
        given = out is not None
        out = check_output(out, shape, codes)
        stream = given and _jit.streams(out)  # only into a caller's buffer: see streams()

        def work(start: int, stop: int, scratch: Scratch) -> None:
            block = np.ascontiguousarray(codes[start:stop])
            self._decode_into(block, out[start:stop], scratch, stream=stream)

        map_blocks(codes.shape[0], self._block_rows(), work, divisible=True)
        return out

    def _block_rows(self, X: np.ndarray | None = None) -> int:
        """Rows per block of encode (input ``X``) or decode.

        The numpy path keeps its temporaries in cache with ~1 MiB blocks. A compiled
        kernel needs no temporaries, so unless the input must be converted to float32
        block by block, it takes 8x larger blocks: fewer per-block Python calls (+10-20%
        on fast formats). A quantizer's codes do not depend on how rows are grouped, so
        this changes no result.
        """
        assert self.d_ is not None
        rows = cache_rows_per_block(4 * self.d_)
        converts = X is not None and not (X.dtype == np.float32 and X.flags.c_contiguous)
        if _jit.ENABLED and type(self)._jit_encode is not Quantizer._jit_encode and not converts:
            return _COMPILED_BLOCK_FACTOR * rows
        return rows

    # -- for subclasses -------------------------------------------------------------
    # Implement _fit plus either the pair _encode_block/_decode_block (simple: return
    # new arrays) or the pair _encode_into/_decode_into (fast: write into the caller's
    # output, temporaries from ``scratch``). Each pair has a default built on the other.
    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _encode_block(self, X: np.ndarray) -> np.ndarray:
        """Codes uint8 (n, code_size) of one C-contiguous, finite float32 block (n, d_)."""
        if type(self)._encode_into is Quantizer._encode_into:
            raise NotImplementedError(f"{type(self).__name__} implements no encoder")
        out = np.empty((X.shape[0], self.code_size), dtype=np.uint8)
        self._encode_into(X, out, Scratch(), overwrite=False)
        return out

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        """Vectors float32 (n, d_) of one C-contiguous uint8 block (n, code_size)."""
        if type(self)._decode_into is Quantizer._decode_into:
            raise NotImplementedError(f"{type(self).__name__} implements no decoder")
        assert self.d_ is not None
        out = np.empty((codes.shape[0], self.d_), dtype=np.float32)
        self._decode_into(codes, out, Scratch())
        return out

    def _encode_checked(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool, row_offset: int
    ) -> None:
        """Check that block ``X`` is finite, then encode it into ``out``.

        A compiled kernel (:meth:`_jit_encode`) checks as it encodes, in the same pass;
        ``row_offset`` (the block's first row in the whole input) names a bad row.
        """
        finite = self._jit_encode(X, out)
        if finite is None:  # no compiled kernel: check, then the numpy path
            check_finite(X, row_offset=row_offset)
            self._encode_into(X, out, scratch, overwrite=overwrite)
        elif not finite:
            check_finite(X, row_offset=row_offset)  # raises, naming the first bad row

    def _jit_encode(self, X: np.ndarray, out: np.ndarray) -> bool | None:
        """Encode with a compiled kernel if there is one and it is on (``embcomp._jit``).

        Returns None when it did nothing, else whether every value of ``X`` was finite.
        """
        return None

    def _jit_decode(self, codes: np.ndarray, out: np.ndarray, stream: bool) -> bool:
        """Decode with a compiled kernel if there is one and it is on; whether it did.

        ``stream``: write ``out`` with streaming stores (see :func:`embcomp._jit.streams`).
        """
        return False

    def _encode_into(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool
    ) -> None:
        """Write the codes of block ``X`` into ``out``.

        Parameters
        ----------
        X : ndarray (n, d_) float32, C-contiguous, finite.
        out : ndarray (n, code_size) uint8, rows C-contiguous (a slice of the output).
        scratch : the worker's reusable temporaries.
        overwrite : whether ``X`` is a temporary the kernel may overwrite.
        """
        out[...] = self._encode_block(X)

    def _decode_into(
        self, codes: np.ndarray, out: np.ndarray, scratch: Scratch, *, stream: bool = False
    ) -> None:
        """Write the vectors of ``codes`` (n, code_size) uint8 into ``out`` (n, d_) float32
        (``stream``: as :meth:`_jit_decode`; a hint the numpy path ignores)."""
        out[...] = self._decode_block(codes)

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = super().state_arrays()
        arrays["d_"] = np.asarray(self.d_, dtype=np.int64)
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        d = arrays.pop("d_", None)
        if d is None:
            raise ArtifactError("quantizer state lacks d_")
        if np.ndim(d) != 0 or np.asarray(d).dtype.kind not in "iu" or int(d) < 1:
            raise ArtifactError(f"quantizer state d_ must be a positive integer; got {d!r}")
        self.d_ = int(d)
        super().set_state(arrays)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (n, d) uint8 < 16 into (n, ceil(d/2)) bytes, even index low."""
    n, d = values.shape
    if d % 2:
        values = np.concatenate([values, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8, copy=False)


def unpack_nibbles(codes: np.ndarray, d: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: (n, ceil(d/2)) bytes -> (n, d) uint8 < 16."""
    out = np.empty((codes.shape[0], codes.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = codes & 0x0F
    out[:, 1::2] = codes >> 4
    return out[:, :d]


def pack_nibbles_into(values: np.ndarray, out: np.ndarray, scratch: Scratch) -> None:
    """:func:`pack_nibbles` into ``out`` (n, m) uint8, from C-contiguous ``values`` (n, 2m).

    On little-endian hosts a pair of bytes read as one uint16 ``v = lo | hi << 8``
    packs in two passes: the low byte of ``v | v >> 4`` is ``lo | hi << 4``.
    """
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        np.bitwise_or(values[:, 0::2], values[:, 1::2] << 4, out=out)
        return
    pairs = values.view(np.uint16)
    high = scratch.get("pack", pairs.shape, np.uint16)
    np.right_shift(pairs, 4, out=high)
    np.bitwise_or(pairs, high, out=out, casting="unsafe")


def unpack_nibbles_into(codes: np.ndarray, out: np.ndarray, scratch: Scratch) -> None:
    """:func:`unpack_nibbles` of ``codes`` (n, m) into C-contiguous ``out`` (n, 2m) uint8.

    On little-endian hosts: widen each byte ``b`` to uint16, then
    ``(b | b << 4) & 0x0F0F`` holds ``b & 15`` in its low byte and ``b >> 4`` in its high.
    """
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        out[:, 0::2] = codes & 0x0F
        out[:, 1::2] = codes >> 4
        return
    wide = out.view(np.uint16)
    shifted = scratch.get("unpack", wide.shape, np.uint16)
    np.copyto(wide, codes)
    np.left_shift(wide, 4, out=shifted)
    np.bitwise_or(wide, shifted, out=wide)
    np.bitwise_and(wide, 0x0F0F, out=wide)
