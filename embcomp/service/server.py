"""Build and run the gRPC server.

``create_server(config) -> (server, port)`` binds everything (store, servicer, health,
reflection, auth, TLS) without starting, so tests can run a real server on port 0;
``serve(config)`` adds logging, the metrics endpoint and SIGTERM draining.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from .. import _jit
from .._version import __version__
from ..exceptions import InputError
from ..v1 import compression_service_pb2, compression_service_pb2_grpc
from .auth import BearerTokenInterceptor
from .calls import CallSlots, RequestArrival, bidi_stream
from .config import SPARE_THREADS, ServiceConfig
from .logs import configure_logging, logger
from .metrics import ServiceMetrics, TrafficInterceptor
from .servicer import CompressionServicer
from .store import CodecStore

__all__ = ["SERVICE_NAME", "EmbcompServer", "create_server", "serve"]

SERVICE_NAME = compression_service_pb2.DESCRIPTOR.services_by_name["CompressionService"].full_name


class EmbcompServer:
    """A bound (not yet started) service: the gRPC server plus what it owns.

    Attributes
    ----------
    grpc_server : grpc.Server
    port : bound gRPC port.
    store : CodecStore
    metrics : ServiceMetrics
    health : grpc_health HealthServicer (SERVING once the store is open).
    metrics_port : bound HTTP port of ``/metrics`` after ``start``, or ``None``.
    """

    def __init__(
        self,
        grpc_server: grpc.Server,
        port: int,
        config: ServiceConfig,
        store: CodecStore,
        metrics: ServiceMetrics,
        health_servicer: health.HealthServicer,
    ) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.config = config
        self.store = store
        self.metrics = metrics
        self.health = health_servicer
        self.metrics_port: int | None = None

    def start(self) -> None:
        """Start serving RPCs (and ``/metrics`` when ``metrics_port`` is configured)."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        self.grpc_server.start()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Refuse new calls, let in-flight ones run up to ``grace`` seconds, then stop.

        Returns an event set once every call has ended.
        """
        self.health.enter_graceful_shutdown()
        done = self.grpc_server.stop(grace)

        def close_metrics() -> None:  # keep /metrics up while calls drain
            done.wait()
            self.metrics.stop_http()

        threading.Thread(target=close_metrics, name="embcomp-metrics-close", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)

    def __enter__(self) -> EmbcompServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(0).wait()


class _Reflection(reflection.ReflectionServicer):
    """Server reflection as a call like the service's: it takes one of the service's
    call slots and its streams end after ``stream_idle_seconds`` without a request (or
    with a response unread). Unguarded, 18 idle reflection streams held every server
    thread, health checks' spare ones included."""

    def __init__(
        self,
        service_names: tuple[str, ...],
        call_slots: CallSlots,
        config: ServiceConfig,
        metrics: ServiceMetrics,
    ) -> None:
        super().__init__(service_names)
        self.call_slots, self.config, self.metrics = call_slots, config, metrics  # bidi_stream's

    @bidi_stream("ServerReflectionInfo")
    def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> Any:
        yield from super().ServerReflectionInfo(request_iterator, context)


def _credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read the TLS key or certificate: {exc}") from exc
    return grpc.ssl_server_credentials([pair])


def create_server(config: ServiceConfig | None = None) -> tuple[EmbcompServer, int]:
    """Open the store and bind a server for ``config`` (defaults + environment if None).

    Returns ``(server, port)``; call ``server.start()``. ``port`` is the bound port,
    useful with ``port=0``. Raises ``InputError`` if the store is unusable or the
    address cannot be bound.
    """
    config = config if config is not None else ServiceConfig()
    store = CodecStore(
        config.store,
        cache_size=config.cache_size,
        cache_bytes=config.cache_bytes,
        max_artifact_bytes=config.max_stored_artifact_bytes,
    )
    metrics = ServiceMetrics()
    servicer = CompressionServicer(store, config, metrics)
    token = config.token()
    # Last: unary calls read their request under a slot and a time limit (see
    # RequestArrival), and the interceptors before it see that stream-request shape.
    interceptors: list[grpc.ServerInterceptor] = [
        TrafficInterceptor(metrics),
        RequestArrival(servicer.call_slots, config.stream_idle_seconds, metrics),
    ]
    if token:
        interceptors.insert(0, BearerTokenInterceptor(token, metrics))
    # Service and reflection calls are limited to max_workers by the servicer's
    # CallSlots; the spare threads are for health checks, and gRPC refuses calls beyond
    # all threads at once (RESOURCE_EXHAUSTED) instead of queueing them behind busy ones.
    threads = config.max_workers + SPARE_THREADS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embcomp-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=threads,
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
        ],
    )
    compression_service_pb2_grpc.add_CompressionServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection(names, servicer.call_slots, config, metrics), server
    )
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError as exc:
        raise InputError(f"cannot listen on {config.address}: {exc}") from None
    if port == 0:
        raise InputError(f"cannot listen on {config.address} (port in use?)")
    for name in ("", SERVICE_NAME):  # the store is open: ready for traffic
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return EmbcompServer(server, port, config, store, metrics, health_servicer), port


def _warm_up() -> None:
    try:
        seconds = _jit.warm_up()
    except Exception:  # noqa: BLE001 - a failed warm-up only delays first calls
        logger.exception("kernel warm-up failed")
        return
    logger.info("kernels ready", extra={"compiled": _jit.ENABLED, "seconds": round(seconds, 2)})


def serve(config: ServiceConfig | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain in-flight calls for ``grace_seconds``."""
    config = config if config is not None else ServiceConfig()
    configure_logging(config.log_level, config.log_format, config.access_log)
    server, port = create_server(config)
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        # compile the quantizer kernels off the request path (see embcomp._jit)
        threading.Thread(target=_warm_up, name="embcomp-warm-up", daemon=True).start()
        logger.info(
            "serving",
            extra={
                "version": __version__,
                "address": f"{config.host}:{port}",
                "store": str(config.store.resolve()),
                "codecs": len(server.store),
                "tls": config.tls_cert is not None,
                "auth": config.token() is not None,
                "metrics_port": server.metrics_port,
            },
        )
        while not stop_requested.wait(timeout=1.0):
            pass
        done = server.stop(config.grace_seconds)  # from here on, new calls are refused
        logger.info("draining", extra={"grace_seconds": config.grace_seconds})
        done.wait()
        logger.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
