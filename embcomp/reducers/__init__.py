"""Reducers: float vectors -> fewer floats (``fit`` / ``transform`` / ``inverse_transform``)."""

from ._base import LinearReducer
from ._mpad import MPADReducer
from ._pca import PCAReducer
from ._rotation import RandomRotation

__all__ = ["LinearReducer", "MPADReducer", "PCAReducer", "RandomRotation"]
