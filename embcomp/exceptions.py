"""Errors raised by embcomp.

Every error is an :class:`EmbcompError` and also the matching built-in, so callers
can catch either::

    EmbcompError (Exception)
    ├── SpecError (ValueError)               bad spec string or codec option
    ├── InputError (ValueError)              NaN/inf, empty, not 2-D, wrong dtype, bad file
    ├── DimensionMismatchError (ValueError)  array width differs from the fitted width
    ├── NotFittedError (RuntimeError)        encode/transform before fit
    └── ArtifactError (ValueError)           corrupt, truncated, foreign or newer artifact

Messages say what was expected, what arrived and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "DimensionMismatchError",
    "EmbcompError",
    "InputError",
    "NotFittedError",
    "SpecError",
]


class EmbcompError(Exception):
    """Root of every error embcomp raises on purpose."""


class SpecError(EmbcompError, ValueError):
    """A spec string or codec option is invalid."""


class InputError(EmbcompError, ValueError):
    """Input data is unusable: NaN/inf, empty, not 2-D, wrong dtype, unreadable file."""


class DimensionMismatchError(EmbcompError, ValueError):
    """An array's width differs from what the fitted codec expects."""


class NotFittedError(EmbcompError, RuntimeError):
    """A stage was used before ``fit``."""


class ArtifactError(EmbcompError, ValueError):
    """A codec artifact is corrupt, truncated, foreign or of a newer format."""
