"""What reducers and quantizers share: parameters, fitted state, and its (de)serialization."""

from __future__ import annotations

import copy
import inspect
from typing import Any, ClassVar

import numpy as np

from ._blocks import blas_single_thread
from ._validation import check_is_fitted
from .exceptions import ArtifactError


def expect_array(
    array: np.ndarray,
    name: str,
    shape: tuple[int, ...],
    dtype: Any = np.float32,
    *,
    finite: bool = True,
) -> None:
    """Raise ``ArtifactError`` unless ``array`` has exactly ``shape`` and ``dtype`` (one
    dtype or a tuple of accepted ones) and, for floats with ``finite``, no NaN or inf."""
    dtypes = tuple(np.dtype(t) for t in (dtype if isinstance(dtype, tuple) else (dtype,)))
    if array.shape != shape or array.dtype not in dtypes:
        wanted = " or ".join(str(t) for t in dtypes)
        raise ArtifactError(
            f"state array {name!r} is {array.dtype} {array.shape}; expected {wanted} {shape}"
        )
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ArtifactError(f"state array {name!r} holds NaN or inf")


class FittedStage:
    """Base of every stage.

    The constructor only stores its keyword arguments (scikit-learn convention);
    ``fit`` sets the arrays named in ``_state`` (each ends in ``_``). Those arrays,
    plus ``get_params()``, are all an artifact needs to rebuild the stage.
    """

    _state: ClassVar[tuple[str, ...]] = ()

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, read back from attributes of the same name."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return {name: getattr(self, name) for name in names}

    @property
    def is_fitted(self) -> bool:
        return all(getattr(self, name, None) is not None for name in self._state)

    def _check_fitted(self) -> None:
        for name in self._state:
            check_is_fitted(self, name)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays, by attribute name, for saving."""
        self._check_fitted()
        return {name: np.asarray(getattr(self, name)) for name in self._state}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore fitted arrays saved by :meth:`state_arrays`."""
        missing = set(self._state) - set(arrays)
        extra = set(arrays) - set(self._state)
        if missing or extra:
            raise ArtifactError(
                f"{type(self).__name__} state mismatch: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        for name in self._state:
            setattr(self, name, arrays[name])
        self._check_state()
        with blas_single_thread():  # derived arrays bit-identical to the fit's
            self._after_load()

    def _fit_copy(self, X: np.ndarray, **attributes: Any) -> None:
        """Fit on ``X`` (``_fit``, then the derived arrays), setting ``attributes`` first,
        all-or-nothing: the work is done on a shallow copy whose attributes are taken over
        only once it succeeded. A refit that raises (data a stage cannot calibrate, an
        option that does not suit the new width) leaves the stage as it was, never with
        arrays of two fits that its kernels would index out of bounds.
        """
        trial = copy.copy(self)
        for name, value in attributes.items():
            setattr(trial, name, value)
        # One BLAS thread: a multi-threaded product run while another thread uses BLAS
        # can round differently, and a fit must give the same bytes every time.
        with blas_single_thread():
            trial._fit(X)
            trial._contiguous_state()
            trial._after_load()
        self.__dict__.update(trial.__dict__)

    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _contiguous_state(self) -> None:
        """Make the fitted arrays C-contiguous, as loading gives them: BLAS may round a
        product with a Fortran-ordered matrix differently, and a codec must compute the
        same before and after a save and load."""
        for name in self._state:
            value = getattr(self, name, None)
            if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
                setattr(self, name, np.ascontiguousarray(value))

    def _check_state(self) -> None:
        """Raise ``ArtifactError`` unless the loaded arrays fit together (shapes, dtypes,
        finite values): kernels index with them and must never read out of bounds,
        whatever an artifact holds. Override per stage (use :func:`expect_array`)."""

    def _after_load(self) -> None:
        """Recompute derived (unsaved) arrays after fit or load. Override as needed."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
