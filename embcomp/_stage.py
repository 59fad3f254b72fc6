"""What reducers and quantizers share: parameters, fitted state, and its (de)serialization."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np

from ._blocks import blas_single_thread
from ._validation import check_is_fitted
from .exceptions import ArtifactError


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
        with blas_single_thread():  # derived arrays bit-identical to the fit's
            self._after_load()

    def _after_load(self) -> None:
        """Recompute derived (unsaved) arrays after fit or load. Override as needed."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
