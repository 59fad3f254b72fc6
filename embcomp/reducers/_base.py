"""The reducer contract (scikit-learn ``fit`` / ``transform`` / ``inverse_transform``).

Every reducer here is linear: ``transform(X) = (X - mean_) @ components_.T`` and
``inverse_transform(Z) = Z @ inverse_components_ + mean_``. Keeping that one shape
lets the codec project queries exactly and fuse reduction into encoding.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._blocks import for_each_block, rows_per_block
from .._stage import FittedStage, expect_array
from .._validation import check_finite, check_matrix, to_float32
from ..exceptions import ArtifactError

# A row's product comes out the same whatever the number of rows only when the output
# width is a multiple of BLAS's column unroll: other widths take M-dependent tail paths
# (pca100 and pca200 codes depended on how rows were grouped; pca128 and pca192 never
# did). Projections are padded with zero columns to a multiple of 16, which every
# OpenBLAS sgemm unroll divides, and the padding is cut off after the product.
_COLUMN_MULTIPLE = 16


def padded_columns(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (K, N) as C-contiguous float32 with zero columns appended up to a
    multiple of 16 (see ``_COLUMN_MULTIPLE``)."""
    k, n = matrix.shape
    wide = np.zeros((k, -(-n // _COLUMN_MULTIPLE) * _COLUMN_MULTIPLE), dtype=np.float32)
    wide[:, :n] = matrix
    return wide


def project(
    a: np.ndarray, padded: np.ndarray, width: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``(a @ padded)[:, :width]`` (``padded`` from :func:`padded_columns`).

    BLAS computes a one-row product on its matrix-vector path, which rounds differently
    from the matrix-matrix one (553 of 3,000 vectors encoded alone got other codes than
    in a batch), so one row is computed as two. A row's last bits can still depend on
    the shape of the call on some BLAS builds and CPUs (OpenBLAS on an AMD EPYC: 5% of
    the values of a 384 -> 192 product differ between a 2-row and a 1,024-row call), so
    the same row in another grouping is equal only up to float32 rounding.
    """
    rows = np.concatenate([a, a]) if a.shape[0] == 1 else a
    if rows is a and padded.shape[1] == width:
        return np.matmul(a, padded, out=out)
    full = np.matmul(rows, padded)[: a.shape[0], :width]
    if out is None:
        return np.ascontiguousarray(full)
    out[...] = full
    return out


class LinearReducer(FittedStage):
    """Base class: subclasses implement ``_fit(X)`` to set the fitted arrays.

    Attributes (after ``fit``)
    --------------------------
    components_ : ndarray (d_out, d_in) float32, rows are the projection directions.
    mean_ : ndarray (d_in,) float32, subtracted before projecting.
    inverse_components_ : ndarray (d_out, d_in) float32, maps reduced vectors back.
    """

    _state: ClassVar[tuple[str, ...]] = ("components_", "mean_", "inverse_components_")
    components_: np.ndarray | None = None
    mean_: np.ndarray | None = None
    inverse_components_: np.ndarray | None = None

    @property
    def n_features_in_(self) -> int:
        self._check_fitted()
        assert self.components_ is not None
        return int(self.components_.shape[1])

    @property
    def n_components_(self) -> int:
        self._check_fitted()
        assert self.components_ is not None
        return int(self.components_.shape[0])

    @property
    def has_orthonormal_rows(self) -> bool:
        """Whether ``inverse_components_ == components_`` has orthonormal rows (PCA, rot)."""
        return False

    def fit(self, X: Any, y: Any = None) -> LinearReducer:
        """Fit on training vectors ``X`` (n, d_in) float; returns ``self``."""
        self._fit_copy(check_matrix(X, name="training vectors"))
        return self

    def _check_state(self) -> None:
        assert self.components_ is not None
        shape = self.components_.shape
        if len(shape) != 2 or not 1 <= shape[0] <= shape[1]:
            raise ArtifactError(
                f"state array 'components_' has shape {shape}; expected (k, d_in) with "
                "1 <= k <= d_in"
            )
        expect_array(self.components_, "components_", shape)
        expect_array(self.inverse_components_, "inverse_components_", shape)  # type: ignore[arg-type]
        expect_array(self.mean_, "mean_", (shape[1],))  # type: ignore[arg-type]
        wanted = getattr(self, "n_components", None)
        if wanted is not None and wanted != shape[0]:
            raise ArtifactError(f"the spec keeps {wanted} components; the arrays hold {shape[0]}")

    def _after_load(self) -> None:
        assert self.components_ is not None and self.mean_ is not None
        k = self.components_.shape[0]
        self._projection = padded_columns(self.components_.T)  # see _COLUMN_MULTIPLE
        # Queries meet reduced decodes through the inverse's transpose (see
        # Codec.project_queries), padded the same way.
        assert self.inverse_components_ is not None
        if self.inverse_components_ is self.components_:  # rot, pca: one matrix held once
            self._query_projection = self._projection
        else:
            self._query_projection = padded_columns(self.inverse_components_.T)
        self._inverse = padded_columns(self.inverse_components_)  # decode: (k, d_in) padded
        # (X - mean) @ P  ==  X @ P - mean @ P: no centered copy of X.
        unpadded = self._projection[:, :k].astype(np.float64)
        self._offset = (self.mean_.astype(np.float64) @ unpadded).astype(np.float32)

    def transform_block(self, X: np.ndarray) -> np.ndarray:
        """Project one validated, contiguous float32 block; no checks (hot path)."""
        Z = project(X, self._projection, self._offset.shape[0])
        Z -= self._offset
        return Z

    def inverse_transform_block(self, Z: np.ndarray) -> np.ndarray:
        """Map one float32 block of reduced vectors back to the input space."""
        assert self.mean_ is not None
        X = project(Z, self._inverse, self.mean_.shape[0])
        X += self.mean_
        return X

    def transform(self, X: Any) -> np.ndarray:
        """Project ``X`` (n, d_in) float -> (n, d_out) float32."""
        self._check_fitted()
        X = check_matrix(X, d=self.n_features_in_, allow_empty=True)
        out = np.empty((X.shape[0], self.n_components_), dtype=np.float32)

        def work(start: int, stop: int) -> None:
            block = to_float32(X[start:stop], row_offset=start)
            check_finite(block, row_offset=start)
            out[start:stop] = self.transform_block(block)

        for_each_block(X.shape[0], rows_per_block(4 * X.shape[1]), work)
        return out

    def inverse_transform(self, Z: Any) -> np.ndarray:
        """Map reduced vectors ``Z`` (n, d_out) float back to (n, d_in) float32."""
        self._check_fitted()
        Z = check_matrix(Z, name="reduced vectors", d=self.n_components_, allow_empty=True)
        out = np.empty((Z.shape[0], self.n_features_in_), dtype=np.float32)

        def work(start: int, stop: int) -> None:
            out[start:stop] = self.inverse_transform_block(
                np.ascontiguousarray(Z[start:stop], dtype=np.float32)
            )

        for_each_block(Z.shape[0], rows_per_block(4 * self.n_features_in_), work)
        return out

    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError


def streamed_mean_cov(X: np.ndarray, block_rows: int = 8192) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean (d,) and covariance (d, d) in float64 of ``X`` (n, d), one block at a time.

    Memory is O(d^2 + block_rows * d) whatever n is (X may be a memory map). Sums are
    taken about the first block's mean (a shifted single pass), which avoids the
    cancellation of the naive ``E[xx^T] - mu mu^T`` when the mean is large.

    Returns the mean, the unbiased covariance (divided by n - 1) and n.
    """
    n, d = X.shape
    first = np.asarray(X[:block_rows], dtype=np.float64)
    check_finite(first, name="training vectors")
    shift = first.mean(axis=0)
    del first  # one float64 block at a time below (8,192 x 3,072: 200 MB each)
    total = np.zeros(d)
    scatter = np.zeros((d, d))
    for start in range(0, n, block_rows):
        block = to_float32(X[start : start + block_rows], name="training vectors", row_offset=start)
        check_finite(block, name="training vectors", row_offset=start)
        centered = block.astype(np.float64)
        centered -= shift
        total += centered.sum(axis=0)
        scatter += centered.T @ centered
    delta = total / n
    mean = shift + delta
    cov = (scatter - n * np.outer(delta, delta)) / max(n - 1, 1)
    return mean, cov, n


def flip_signs(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest-|.| entry of each row is positive (sklearn svd_flip)."""
    rows = np.arange(components.shape[0])
    signs = np.sign(components[rows, np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1.0
    return components * signs[:, None]
