"""The one table from exceptions to gRPC status codes, and the service's own errors.

Every RPC failure goes through :func:`status_for`. Library errors keep their messages
(they already say what was expected and what arrived); anything unexpected becomes
INTERNAL with a request id and no traceback, and is logged in full on the server.
"""

from __future__ import annotations

import grpc

from ..exceptions import (
    ArtifactError,
    DimensionMismatchError,
    EmbcompError,
    InputError,
    NotFittedError,
    SpecError,
)

__all__ = [
    "ERROR_TABLE",
    "CallEndedError",
    "CodecNotFoundError",
    "IdleStreamError",
    "LimitExceededError",
    "UnauthenticatedError",
    "status_for",
]


class CodecNotFoundError(EmbcompError, LookupError):
    """No codec with the requested id is in the store."""


class LimitExceededError(EmbcompError, ValueError):
    """A request is over a configured limit (rows, bytes, concurrent fits)."""


class UnauthenticatedError(EmbcompError, PermissionError):
    """A call arrived without a valid bearer token."""


class CallEndedError(EmbcompError):
    """The client cancelled the call or its deadline passed: stop, store nothing."""


class IdleStreamError(EmbcompError, TimeoutError):
    """A client stream sent no message for the server's idle limit: the server ends it."""


# Checked in order: the first matching class decides the code, so subclasses come first.
ERROR_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (CodecNotFoundError, grpc.StatusCode.NOT_FOUND),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (CallEndedError, grpc.StatusCode.CANCELLED),
    (IdleStreamError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),  # a stored file failed its checks
    (NotFittedError, grpc.StatusCode.FAILED_PRECONDITION),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (DimensionMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``.

    Unknown exceptions map to INTERNAL with a message that names only the request id,
    so nothing of the server's internals (paths, tracebacks) reaches the client.
    """
    for cls, code in ERROR_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, MemoryError):
                return code, "the server ran out of memory for this request; send fewer rows"
            return code, str(exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id}); the server log has the details",
    )
