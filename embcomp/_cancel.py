"""Cooperative cancellation of long fits.

An MPAD fit takes about a minute of CPU, and numpy and scipy calls cannot be
interrupted from outside. So long loops call :func:`checkpoint` between steps (an MPAD
axis, a k-means iteration, an ``alloc`` codebook), and a caller that may need to stop
them installs a check for the duration of a call::

    with cancel_when(check):      # check() raises to stop, e.g. when a client has left
        codec.fit(X)

The check lives in a context variable, so it applies to the calling thread only (the
fits' loops run on it) and costs one lookup per step when none is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["cancel_when", "checkpoint", "current_check"]

_check: ContextVar[Callable[[], None] | None] = ContextVar("embcomp_cancel_check", default=None)


@contextlib.contextmanager
def cancel_when(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, every :func:`checkpoint` of this thread calls ``check``, which
    raises to stop the work in progress (its exception propagates unchanged)."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)


def checkpoint() -> None:
    """Call the installed check, if any (see :func:`cancel_when`)."""
    check = _check.get()
    if check is not None:
        check()


def current_check() -> Callable[[], None] | None:
    """This thread's installed check, for worker threads doing part of its work to
    install with :func:`cancel_when` (a context variable does not follow a thread)."""
    return _check.get()
