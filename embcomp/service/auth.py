"""Optional bearer-token authentication, as a server interceptor.

With a token configured, every call must carry metadata
``authorization: Bearer <token>``; others end with UNAUTHENTICATED before reaching the
servicer. Health checks are exempt so load balancers and the Docker HEALTHCHECK can
probe without the secret. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from .calls import HEALTH_METHODS
from .logs import logger
from .metrics import ServiceMetrics

__all__ = ["BearerTokenInterceptor"]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str, metrics: ServiceMetrics | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(HEALTH_METHODS):
            return continuation(handler_call_details)
        provided = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                provided = value.encode() if isinstance(value, str) else bytes(value)
        if provided is not None and hmac.compare_digest(provided, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        message = (
            "invalid bearer token"
            if provided is not None
            else "missing bearer token: send metadata 'authorization: Bearer <token>'"
        )
        short = method.rsplit("/", 1)[-1]
        logger.warning("unauthenticated call", extra={"method": short, "reason": message})
        if self._metrics is not None:
            self._metrics.observe(short, "UNAUTHENTICATED", 0.0)
        return _rejecting(handler, message)


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same call shape as ``handler`` that only aborts."""

    def reject(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    shapes = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = shapes[(handler.request_streaming, handler.response_streaming)]
    return make(
        reject,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
