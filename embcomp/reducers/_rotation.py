"""Seeded random orthogonal rotation (no reduction): spreads variance across dims."""

from __future__ import annotations

import numpy as np

from .._validation import check_finite, to_float32
from ..exceptions import ArtifactError, InputError, SpecError
from ._base import LinearReducer


class RandomRotation(LinearReducer):
    """Center, then rotate by a Haar-random orthogonal matrix drawn from ``seed``.

    Attributes
    ----------
    components_ : ndarray (d, d) float32, orthogonal.
    mean_ : ndarray (d,) float32.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    @property
    def has_orthonormal_rows(self) -> bool:
        return True

    def _check_state(self) -> None:
        super()._check_state()
        assert self.components_ is not None
        k, d = self.components_.shape
        if k != d:
            raise ArtifactError(f"a rotation keeps all {d} dimensions; the arrays hold {k}")

    def _fit(self, X: np.ndarray) -> None:
        d = X.shape[1]
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"seed must be an integer >= 0; got {self.seed!r}")
        mean = np.asarray(X, dtype=np.float32).mean(axis=0, dtype=np.float64)
        if not np.isfinite(mean).all():  # a NaN/inf row (named) or values beyond float32
            check_finite(to_float32(X, name="training vectors"), name="training vectors")
            raise InputError("training vectors: their mean overflows float32; rescale them")
        gaussian = np.random.default_rng(self.seed).standard_normal((d, d))
        q, r = np.linalg.qr(gaussian)
        q *= np.sign(np.diag(r))  # makes the draw Haar-uniform and deterministic
        self.mean_ = mean.astype(np.float32)
        self.components_ = q.T.astype(np.float32)
        self.inverse_components_ = self.components_
