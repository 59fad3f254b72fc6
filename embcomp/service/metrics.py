"""Prometheus metrics of one server: requests, errors by code, latency, bytes in and out.

Each server owns its registry (so several servers in one process, as in the tests, do
not collide); ``serve_http`` exposes it on an optional port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServiceMetrics", "TrafficInterceptor"]

# Single-vector calls take well under a millisecond; bulk calls up to seconds.
_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0
)  # fmt: skip


class ServiceMetrics:
    """The service's counters, histogram and gauges, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embcomp_requests", "RPCs finished, by method", ["method"], registry=self.registry
        )
        self.errors = Counter(
            "embcomp_errors",
            "RPCs finished with a non-OK status, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embcomp_request_duration_seconds",
            "Wall time from the start of an RPC to its last response, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "embcomp_received_bytes",
            "Serialized request message bytes, by method",
            ["method"],
            registry=self.registry,
        )
        self.bytes_out = Counter(
            "embcomp_sent_bytes",
            "Serialized response message bytes, by method",
            ["method"],
            registry=self.registry,
        )
        self.fits_running = Gauge(
            "embcomp_fits_running", "FitCodec calls currently fitting", registry=self.registry
        )
        self.fit_upload_bytes = Gauge(
            "embcomp_fit_upload_bytes",
            "training data held by FitCodec calls, uploading or fitting",
            registry=self.registry,
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC (``code`` is the status name, e.g. ``"OK"``)."""
        self.requests.labels(method).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def serve_http(self, port: int, host: str) -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class TrafficInterceptor(grpc.ServerInterceptor):
    """Count serialized request and response bytes per method, as gRPC moves them.

    Wraps each handler's (de)serializer, so the count is exact and costs a ``len``.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        received = self._metrics.bytes_in.labels(method)
        sent = self._metrics.bytes_out.labels(method)
        parse, dump = handler.request_deserializer, handler.response_serializer

        def deserialize(raw: bytes) -> Any:
            received.inc(len(raw))
            return parse(raw) if parse is not None else raw

        def serialize(message: Any) -> bytes:
            data = dump(message) if dump is not None else message
            sent.inc(len(data))
            return data

        return handler._replace(request_deserializer=deserialize, response_serializer=serialize)
