"""The quantizer contract (FAISS ``sa_encode`` / ``sa_decode`` / ``sa_code_size``)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._blocks import for_each_block, rows_per_block
from .._stage import FittedStage
from .._validation import check_codes, check_finite, check_matrix
from ..exceptions import ArtifactError


class Quantizer(FittedStage):
    """Maps float vectors of width ``d_`` to ``code_size`` bytes each, and back.

    Subclasses implement ``_fit(X)``, ``_encode_block(X) -> uint8`` and
    ``_decode_block(codes) -> float32`` on one contiguous float32 block;
    this class does validation and blocking.

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

    def fit(self, X: Any) -> Quantizer:
        """Fit scales/ranges on training vectors ``X`` (n, d) float; returns ``self``."""
        X = check_matrix(X, name="training vectors")
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        check_finite(X32, name="training vectors")
        self.d_ = X32.shape[1]
        self._fit(X32)
        self._after_load()
        return self

    def encode(self, X: Any) -> np.ndarray:
        """Encode ``X`` (n, d_) float -> uint8 codes (n, code_size)."""
        self._check_fitted()
        X = check_matrix(X, d=self.d_, allow_empty=True)
        out = np.empty((X.shape[0], self.code_size), dtype=np.uint8)

        def work(start: int, stop: int) -> None:
            block = np.ascontiguousarray(X[start:stop], dtype=np.float32)
            check_finite(block, row_offset=start)
            out[start:stop] = self._encode_block(block)

        assert self.d_ is not None
        for_each_block(X.shape[0], rows_per_block(4 * self.d_), work)
        return out

    def decode(self, codes: Any) -> np.ndarray:
        """Decode uint8 codes (n, code_size) -> float32 vectors (n, d_)."""
        self._check_fitted()
        codes = check_codes(codes, code_size=self.code_size)
        assert self.d_ is not None
        out = np.empty((codes.shape[0], self.d_), dtype=np.float32)

        def work(start: int, stop: int) -> None:
            out[start:stop] = self._decode_block(np.ascontiguousarray(codes[start:stop]))

        for_each_block(codes.shape[0], rows_per_block(4 * self.d_), work)
        return out

    # -- for subclasses -------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _encode_block(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode_block(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = super().state_arrays()
        arrays["d_"] = np.asarray(self.d_, dtype=np.int64)
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        d = arrays.pop("d_", None)
        if d is None:
            raise ArtifactError("quantizer state lacks d_")
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
