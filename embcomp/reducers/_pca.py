"""PCA reducer, fitted from a streamed float64 covariance."""

from __future__ import annotations

import numpy as np

from .._stage import expect_array
from ..exceptions import ArtifactError, DimensionMismatchError, InputError, SpecError
from ._base import LinearReducer, flip_signs, streamed_mean_cov

# A component whose variance is at most this fraction of the total (its deviation 2**-20
# of the vectors' own) is one the training vectors do not span (see PCAReducer._fit).
_NULL_VARIANCE = 2.0**-40


class PCAReducer(LinearReducer):
    """Principal component analysis.

    Parameters
    ----------
    n_components : int or None
        Dimensions to keep; ``None`` keeps all (a rotation onto the principal axes).
    whiten : bool
        Divide each component by its standard deviation (and multiply back in
        ``inverse_transform``).

    Attributes
    ----------
    components_ : ndarray (n_components, d_in) float32
        Principal axes, by decreasing variance, signs fixed deterministically; zero
        rows for components the training vectors do not span (variance 0).
    explained_variance_ : ndarray (n_components,) float64 (variances of float32 values
        can exceed float32's range)
    mean_ : ndarray (d_in,) float32
    """

    _state = ("components_", "mean_", "inverse_components_", "explained_variance_")
    explained_variance_: np.ndarray | None = None

    def __init__(self, n_components: int | None = None, *, whiten: bool = False) -> None:
        self.n_components = n_components
        self.whiten = whiten

    @property
    def has_orthonormal_rows(self) -> bool:
        return not self.whiten

    def _check_state(self) -> None:
        super()._check_state()
        assert self.components_ is not None and self.explained_variance_ is not None
        k, d = self.components_.shape
        if self.n_components is None and k != d:
            raise ArtifactError(f"full PCA keeps all {d} components; the arrays hold {k}")
        # float32 in artifacts written before explained variances were kept in float64
        variance = self.explained_variance_
        expect_array(variance, "explained_variance_", (k,), (np.float64, np.float32))

    def _fit(self, X: np.ndarray) -> None:
        d = X.shape[1]
        wanted = self.n_components
        if wanted is not None and (
            isinstance(wanted, bool) or not isinstance(wanted, (int, np.integer)) or wanted < 1
        ):
            raise SpecError(f"n_components must be None or an integer >= 1; got {wanted!r}")
        k = d if wanted is None else int(wanted)
        if k > d:
            raise DimensionMismatchError(
                f"pca{k} keeps more dimensions than the {d} the training vectors have; "
                f"use at most pca{d}"
            )
        if X.shape[0] < 2:
            raise InputError(f"PCA needs at least 2 training vectors; got {X.shape[0]}")
        mean, cov, _ = streamed_mean_cov(X)
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1][:k]
        components = flip_signs(eigvecs[:, order].T)
        variance = np.maximum(eigvals[order], 0.0)
        # Directions the training vectors do not span (fewer vectors than components,
        # or vectors confined to a subspace: 50,000 MiniLM vectors span 381 of 384
        # dims) have eigenvalues at float64 round-off, ~1e-17 of the total variance
        # (real ones: 1e-5 and up). eigh returns arbitrary axes there, and a vector's
        # projection on one is float32 rounding noise that a quantizer fitted per
        # dimension would spread over all its codes: codes that change with how rows
        # are batched (up to 193 of int8's 255 levels) and carry nothing. Those rows are
        # zeroed, so the dimension projects to exactly 0 and gets a constant code.
        null = variance <= np.trace(cov) * _NULL_VARIANCE
        components[null] = 0.0
        variance[null] = 0.0
        self.mean_ = mean.astype(np.float32)
        self.explained_variance_ = variance
        if self.whiten:
            # A component with (almost) no variance is divided by the float32 resolution
            # of the top component's deviation (2**-23 of it) rather than by ~0.
            top = float(variance[0]) if variance.size and variance[0] > 0 else 1.0
            std = np.sqrt(np.maximum(variance, top * 2.0**-46))
            self.components_ = (components / std[:, None]).astype(np.float32)
            self.inverse_components_ = (components * std[:, None]).astype(np.float32)
        else:
            self.components_ = components.astype(np.float32)
            self.inverse_components_ = self.components_
