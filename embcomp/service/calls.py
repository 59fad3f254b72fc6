"""The life of one RPC: request id, error mapping, metrics and the access log.

Each servicer method is wrapped by one of the decorators below (by call shape), so the
servicer itself only translates messages into library calls. Bytes on the wire are
counted separately, by :class:`.metrics.TrafficInterceptor`, from the serialized
messages gRPC hands over (asking a message its ``ByteSize()`` would serialize it again).
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from .errors import status_for
from .logs import REQUEST_ID, access_logger, logger
from .metrics import ServiceMetrics

__all__ = ["bidi_stream", "client_stream", "unary"]

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
F = TypeVar("F", bound=Callable[..., Any])


class Call:
    """Bookkeeping for one RPC, from its first request to its final status."""

    __slots__ = (
        "_token",
        "code",
        "context",
        "method",
        "metrics",
        "request_id",
        "start",
    )

    def __init__(self, method: str, context: grpc.ServicerContext, metrics: ServiceMetrics):
        self.method, self.context, self.metrics = method, context, metrics
        self.start = time.perf_counter()
        self.code = "OK"
        sent = None
        for key, value in context.invocation_metadata():
            if key == "x-request-id" and isinstance(value, str) and _SANE_REQUEST_ID.match(value):
                sent = value
        self.request_id = sent or uuid.uuid4().hex[:16]
        self._token = REQUEST_ID.set(self.request_id)
        context.set_trailing_metadata((("x-request-id", self.request_id),))

    def fail(self, exc: Exception) -> NoReturn:
        """Abort the RPC with the status the error table gives ``exc``."""
        if isinstance(exc, grpc.RpcError):  # the client went away while we read its stream
            self.code = "CANCELLED"
            raise exc
        code, message = status_for(exc, self.request_id)
        self.code = code.name
        if code is grpc.StatusCode.INTERNAL:
            logger.error("unexpected error in %s", self.method, exc_info=exc)
        self.context.abort(code, message)
        raise AssertionError("grpc's context.abort always raises")  # pragma: no cover

    def finish(self) -> None:
        seconds = time.perf_counter() - self.start
        self.metrics.observe(self.method, self.code, seconds)
        if access_logger.isEnabledFor(logging.INFO):  # skip building a record nobody sees
            access_logger.info(
                "rpc",
                extra={
                    "method": self.method,
                    "code": self.code,
                    "duration_ms": round(seconds * 1000, 3),
                    "peer": self.context.peer(),
                },
            )
        try:
            REQUEST_ID.reset(self._token)
        except ValueError:  # finished from another context (a generator closed elsewhere)
            REQUEST_ID.set(None)


def unary(method: str) -> Callable[[F], F]:
    """Wrap ``handler(self, request, context) -> response``."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapped(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            call = Call(method, context, self.metrics)
            try:
                return handler(self, request, context)
            except Exception as exc:
                call.fail(exc)
            finally:
                call.finish()

        return wrapped  # type: ignore[return-value]

    return decorate


def client_stream(method: str) -> Callable[[F], F]:
    """Wrap ``handler(self, request_iterator, context) -> response``."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapped(self: Any, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call = Call(method, context, self.metrics)
            try:
                return handler(self, requests, context)
            except Exception as exc:
                call.fail(exc)
            finally:
                call.finish()

        return wrapped  # type: ignore[return-value]

    return decorate


def bidi_stream(method: str) -> Callable[[F], F]:
    """Wrap a generator ``handler(self, request_iterator, context)`` of responses."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapped(
            self: Any, requests: Iterator[Any], context: grpc.ServicerContext
        ) -> Iterator[Any]:
            call = Call(method, context, self.metrics)
            try:
                yield from handler(self, requests, context)
            except GeneratorExit:  # the client cancelled; nothing to send
                call.code = "CANCELLED"
                raise
            except Exception as exc:
                call.fail(exc)
            finally:
                call.finish()

        return wrapped  # type: ignore[return-value]

    return decorate
