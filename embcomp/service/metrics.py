"""Prometheus metrics of one server: requests, errors by code, latency, bytes in and out.

Each server owns its registry (so several servers in one process, as in the tests, do
not collide); ``serve_http`` exposes it on an optional port.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServiceMetrics"]

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
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def observe(
        self, method: str, code: str, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        """Record one finished RPC (``code`` is the status name, e.g. ``"OK"``)."""
        self.requests.labels(method).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)
        if bytes_in:
            self.bytes_in.labels(method).inc(bytes_in)
        if bytes_out:
            self.bytes_out.labels(method).inc(bytes_out)

    def serve_http(self, port: int, host: str) -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
