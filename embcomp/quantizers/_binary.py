"""1-bit quantizer: one bit per dimension, the sign of x about a fitted center."""

from __future__ import annotations

import numpy as np

from .._blocks import Scratch
from .._stage import expect_array
from ._base import Quantizer


class BinaryQuantizer(Quantizer):
    """bit = x > center_, packed 8 per byte (little bit order).

    Decoding returns, per dimension, the mean of the training values on the bit's
    side of the center (``low_`` or ``high_``): the least-squares reconstruction
    from one bit.

    Attributes
    ----------
    center_ : ndarray (d,) float32, per-dimension median of the training data; where
        many values equal the median, the side of the split they go to is the one that
        leaves the halves closer to even (on 0/1 data with 70% ones the median is 1,
        and ``x > 1`` would put every row on one side).
    low_, high_ : ndarray (d,) float32, decoded value for bit 0 / bit 1.
    """

    bits = 1
    _state = ("center_", "low_", "high_")
    center_: np.ndarray | None = None
    low_: np.ndarray | None = None
    high_: np.ndarray | None = None

    def __init__(self) -> None:
        pass

    def _fit(self, X: np.ndarray) -> None:
        # Dimensions are independent: fit ~4 MB of columns at a time, so the median's
        # copy and the masks stay that small (the whole sample at once took 1.25x its
        # size again: 768 MB and 13 s for 50,000 x 3,072, now 5 MB and 5 s).
        d = X.shape[1]
        self.center_, self.low_, self.high_ = (np.empty(d, dtype=np.float32) for _ in range(3))
        step = max(1, (4 << 20) // (4 * X.shape[0]))
        for j in range(0, d, step):
            columns = slice(j, j + step)
            self.center_[columns], self.low_[columns], self.high_[columns] = _side_means(
                X[:, columns]
            )

    def _encode_into(
        self, X: np.ndarray, out: np.ndarray, scratch: Scratch, *, overwrite: bool
    ) -> None:
        assert self.center_ is not None
        above = scratch.get("above", X.shape, np.bool_)
        np.greater(X, self.center_, out=above)
        out[...] = np.packbits(above, axis=1, bitorder="little")

    def _check_state(self) -> None:
        assert self.d_ is not None
        for name in self._state:
            expect_array(getattr(self, name), name, (self.d_,))

    def _after_load(self) -> None:
        assert self.low_ is not None and self.high_ is not None
        # Decoding table: for byte j and value v, the 8 floats of dims 8j..8j+7 (bit k
        # of v, little bit order, picks high_ or low_ of dim 8j+k). One 32-byte gather
        # per code byte; d KiB in all, so only up to _TABLE_DIMS dimensions: beyond, a
        # small artifact (12 bytes per dimension) would cost 85x its size in memory.
        # Padding dims of the last byte decode to 0.
        self._table: np.ndarray | None = None
        if self.low_.shape[0] > _TABLE_DIMS:
            return
        n_bytes = -(-self.low_.shape[0] // 8)
        low = np.zeros(8 * n_bytes, dtype=np.float32)
        high = np.zeros(8 * n_bytes, dtype=np.float32)
        low[: self.low_.shape[0]] = self.low_
        high[: self.high_.shape[0]] = self.high_
        bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # (256, 8)
        table = np.where(bits, high.reshape(n_bytes, 1, 8), low.reshape(n_bytes, 1, 8))
        self._table = np.ascontiguousarray(table, dtype=np.float32).view(_EIGHT_FLOATS).ravel()
        self._offsets = np.arange(n_bytes, dtype=np.intp) * 256

    def _decode_into(
        self, codes: np.ndarray, out: np.ndarray, scratch: Scratch, *, stream: bool = False
    ) -> None:
        assert self.d_ is not None and self.low_ is not None and self.high_ is not None
        n, n_bytes = codes.shape
        if self._table is None:  # wide vectors: bit by bit
            bits = np.unpackbits(codes, axis=1, count=self.d_, bitorder="little")
            np.copyto(out, self.low_)
            np.copyto(out, self.high_, where=bits.view(np.bool_))
            return
        index = scratch.get("index", codes.shape, np.intp)
        np.add(codes, self._offsets, out=index)
        if self.d_ % 8 == 0:
            np.take(self._table, index, out=out.view(_EIGHT_FLOATS), mode="wrap")
            return
        wide = scratch.get("wide", (n, 8 * n_bytes), np.float32)
        np.take(self._table, index, out=wide.view(_EIGHT_FLOATS), mode="wrap")
        np.copyto(out, wide[:, : self.d_])


def _side_means(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per dimension of ``X`` (n, k): the split point and the means of the values at or
    below it and above it (the split point where a side is empty)."""
    center = _split_point(X)
    above = X > center
    n_above = above.sum(axis=0)
    n_below = X.shape[0] - n_above
    sum_above = np.where(above, X, 0).sum(axis=0, dtype=np.float64)
    sum_below = X.sum(axis=0, dtype=np.float64) - sum_above
    high = np.where(n_above > 0, sum_above / np.maximum(n_above, 1), center)
    low = np.where(n_below > 0, sum_below / np.maximum(n_below, 1), center)
    return center, low.astype(np.float32), high.astype(np.float32)


def _split_point(X: np.ndarray) -> np.ndarray:
    """Per dimension, the threshold t of ``x > t`` that splits the rows most evenly
    among the median and the largest value below it (values equal to the median go
    below the one, above the other)."""
    median = np.median(X, axis=0).astype(X.dtype)
    half = X.shape[0] / 2
    n_above = (X > median).sum(axis=0)
    below = np.where(X < median, X, -np.inf).max(axis=0, initial=-np.inf)
    n_above_below = (X > below).sum(axis=0)  # the ties go above
    better = np.isfinite(below) & (np.abs(n_above_below - half) < np.abs(n_above - half))
    return np.where(better, below, median)


# Widest vectors decoded through the byte table (1 KiB per dimension: 16 MiB here).
_TABLE_DIMS = 16384
# eight float32 as one opaque 32-byte item, so np.take moves them with one copy
_EIGHT_FLOATS = np.dtype((np.void, 32))
