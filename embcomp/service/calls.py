"""The life of one RPC: request id, error mapping, metrics and the access log.

Each servicer method is wrapped by one of the decorators below (by call shape), so the
servicer itself only translates messages into library calls. Bytes on the wire are
counted separately, by :class:`.metrics.TrafficInterceptor`, from the serialized
messages gRPC hands over (asking a message its ``ByteSize()`` would serialize it again).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from .errors import IdleStreamError, LimitExceededError, status_for
from .logs import REQUEST_ID, access_logger, logger
from .metrics import ServiceMetrics

__all__ = [
    "CallSlots",
    "IdleTimeout",
    "RequestArrival",
    "bidi_stream",
    "client_stream",
    "guarded_requests",
    "unary",
    "watched_responses",
]

# Health checks: no call slot (the server's spare threads are theirs) and no bearer token.
HEALTH_METHODS = ("/grpc.health.v1.Health/",)
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


class CallSlots:
    """Calls of the compression service running at once, at most ``limit``.

    gRPC's own limit (``maximum_concurrent_rpcs``) counts every call, health checks
    included; this one counts only the service's (and reflection's), so the server's
    spare threads stay free for health checks however many of those calls run. A unary
    call holds a slot from its headers on, while its request arrives (see
    :class:`RequestArrival`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None]:
        """Take a slot or raise ``LimitExceededError``; returns its release, which may
        be called more than once (from any thread) and gives the slot back once."""
        with self._lock:
            if self.used >= self.limit:
                raise LimitExceededError(
                    f"all {self.limit} of this server's call slots are busy; retry later "
                    "(the limit is EMBCOMP_MAX_WORKERS)"
                )
            self.used += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.used -= 1

        return release

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        release = self.take()
        try:
            yield
        finally:
            release()


_END = object()


class IdleTimeout:
    """The requests of a client stream, ending the call when none arrives for ``seconds``.

    gRPC's request iterator waits for the next message without a timeout, so an idle
    client would hold a server thread forever. The messages are read on a helper thread,
    each only once the handler has asked for it (so none waits in memory beyond the one
    the handler is waiting for: FitCodec's chunks count against the upload budget only
    once taken); waiting longer than ``seconds`` for one raises :class:`IdleStreamError`
    (DEADLINE_EXCEEDED). Once the stream has ended, ``next`` raises ``StopIteration`` at
    once. ``close()`` stops the helper, which gRPC wakes once the call has ended.

    A streaming handler that sends responses also tells it when it hands one to gRPC
    (:meth:`sending`) and when gRPC takes the next (:meth:`sent`): a client that stops
    reading leaves gRPC's send blocked on flow control with the call's thread and slot
    held. While no request is wanted, the helper watches that wait, and after
    ``seconds`` calls ``on_stall`` (which cancels the call and frees its slot).
    """

    def __init__(
        self,
        requests: Iterator[Any],
        seconds: float,
        method: str,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.seconds, self.method = seconds, method
        self._requests = requests
        self._on_stall = on_stall
        self._handed: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._wanted = False  # the handler asked for a message the helper has not read
        self._sending_since: float | None = None  # a response waits in gRPC's send
        self._closed = False
        self._asked = False  # (handler thread only) a message was asked for, not yet taken
        self._ended = False  # (handler thread only) the stream has ended
        self._reader = threading.Thread(
            target=self._read, name=f"embcomp-{method}-reader", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        while self._next_wanted():
            try:
                item: tuple[Any, BaseException | None] = (next(self._requests), None)
            except StopIteration:
                item = (_END, None)
            except BaseException as exc:  # noqa: BLE001 - handed to the handler's thread
                item = (_END, exc)
            self._handed.put(item)
            if item[0] is _END:
                return

    def _next_wanted(self) -> bool:
        """Wait until the handler wants a message (True) or the call is over (False);
        meanwhile end a call whose response has waited in gRPC's send too long."""
        with self._changed:
            while not self._wanted:
                if self._closed:
                    return False
                if self._sending_since is None:
                    self._changed.wait()
                    continue
                left = self._sending_since + self.seconds - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self._closed = True  # stalled: this call is over
                break
            else:
                self._wanted = False
                return True
        logger.warning(
            "a %s client read no response for %g s; the call was cancelled",
            self.method,
            self.seconds,
        )
        if self._on_stall is not None:
            self._on_stall()
        return False

    def sending(self) -> None:
        """A response was handed to gRPC, whose send may block until the client reads."""
        with self._changed:
            self._sending_since = time.monotonic()
            self._changed.notify()

    def sent(self) -> None:
        """gRPC took the next response: the previous one was sent."""
        with self._changed:
            self._sending_since = None

    def __iter__(self) -> IdleTimeout:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        if not self._asked:  # (after an IdleStreamError the old request still stands)
            with self._changed:
                self._wanted = True
                self._changed.notify()
            self._asked = True
        try:
            request, error = self._handed.get(timeout=self.seconds)
        except queue.Empty:
            raise IdleStreamError(
                f"no {self.method} message arrived for {self.seconds:g} s; the server ended "
                "the call (send messages more often; the limit is EMBCOMP_STREAM_IDLE_SECONDS)"
            ) from None
        self._asked = False
        if request is _END:
            self._ended = True
            if error is not None:
                raise error
            raise StopIteration
        return request

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()


@contextlib.contextmanager
def _stream_slot(
    servicer: Any, requests: Iterator[Any], method: str, context: grpc.ServicerContext
) -> Iterator[IdleTimeout]:
    """A call slot for one streaming call, and its requests under the idle limit."""
    with guarded_requests(
        servicer.call_slots, servicer.config.stream_idle_seconds, requests, method, context
    ) as idle:
        yield idle


@contextlib.contextmanager
def guarded_requests(
    slots: CallSlots,
    seconds: float,
    requests: Iterator[Any],
    method: str,
    context: grpc.ServicerContext,
) -> Iterator[IdleTimeout]:
    """Take a slot from ``slots`` and wrap ``requests`` in an :class:`IdleTimeout`; a
    stalled send cancels the call and gives the slot back at once (gRPC then ends the
    handler, which gives it back again: a no-op)."""
    release = slots.take()

    def on_stall() -> None:
        context.cancel()
        release()

    try:
        idle = IdleTimeout(requests, seconds, method, on_stall)
        try:
            yield idle
        finally:
            idle.close()
    finally:
        release()


def watched_responses(idle: IdleTimeout, responses: Iterator[Any]) -> Iterator[Any]:
    """Yield ``responses``, telling ``idle`` how long each waits in gRPC's send."""
    for response in responses:
        idle.sending()
        yield response
        idle.sent()


def unary(method: str) -> Callable[[F], F]:
    """Wrap ``handler(self, request, context) -> response``."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapped(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            call = Call(method, context, self.metrics)
            try:
                with self.call_slots.held():
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
                with _stream_slot(self, requests, method, context) as idle:
                    return handler(self, idle, context)
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
                with _stream_slot(self, requests, method, context) as idle:
                    yield from watched_responses(idle, handler(self, idle, context))
            except GeneratorExit:  # the client cancelled; nothing to send
                call.code = "CANCELLED"
                raise
            except Exception as exc:
                call.fail(exc)
            finally:
                call.finish()

        return wrapped  # type: ignore[return-value]

    return decorate


class RequestArrival(grpc.ServerInterceptor):
    """Serve unary-request methods as client streams of their one message, so that a call
    whose request never (fully) arrives ends after ``seconds`` instead of holding a
    server thread for as long as its client keeps the connection open.

    gRPC reads a unary call's request on a server thread before any handler sees the
    call, with no time limit: 18 clients that sent headers and no body held every
    thread of a default server, health checks' spare ones included, until they
    disconnected. On the wire a unary request is a stream of one message, so the
    handler is registered as a stream-request one and reads that message itself:
    while it waits, the call holds one of ``slots`` (one call too many gets
    RESOURCE_EXHAUSTED at once, leaving the spare threads to health checks, whose
    methods, ``exempt``, take no slot), and one watchdog thread cancels calls whose
    message has not arrived ``seconds`` after their headers (the client sees CANCELLED;
    the server logs why). The slot is given back once the message is in, before the
    servicer's handler takes its own. Put it last among the interceptors: one before
    it (authentication) then sees the stream-request shape and can refuse a call
    without waiting for its body.
    """

    def __init__(
        self,
        slots: CallSlots,
        seconds: float,
        metrics: ServiceMetrics,
        exempt: tuple[str, ...] = HEALTH_METHODS,
    ) -> None:
        self._slots, self._seconds, self._metrics = slots, seconds, metrics
        self._exempt = exempt
        self._watchdog = _Watchdog(seconds)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or not hasattr(handler, "_replace"):
            return handler
        path = handler_call_details.method
        method = path.rsplit("/", 1)[-1]
        slots = None if path.startswith(self._exempt) else self._slots
        if handler.response_streaming:
            respond = handler.unary_stream

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                yield from respond(self._receive(requests, context, method, slots), context)

            return handler._replace(
                request_streaming=True, unary_stream=None, stream_stream=stream_stream
            )
        answer = handler.unary_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return answer(self._receive(requests, context, method, slots), context)

        return handler._replace(request_streaming=True, unary_unary=None, stream_unary=stream_unary)

    def _receive(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        method: str,
        slots: CallSlots | None,
    ) -> Any:
        """The call's one request message, waited for under a slot and the time limit."""
        try:
            release = slots.take() if slots is not None else _no_slot
        except LimitExceededError as exc:
            call = Call(method, context, self._metrics)
            try:
                call.fail(exc)
            finally:
                call.finish()

        def expire() -> None:
            logger.warning(
                "no %s request arrived within %g s of the call's start; the call was "
                "cancelled (the limit is EMBCOMP_STREAM_IDLE_SECONDS)",
                method,
                self._seconds,
            )
            self._metrics.observe(method, "CANCELLED", self._seconds)
            context.cancel()
            release()

        watch = self._watchdog.open(expire)
        try:
            request = next(requests, None)
        finally:
            self._watchdog.close(watch)
            release()
        if request is None:  # the client closed its side without a message: as gRPC says
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f'"{method}" requires exactly one request message.'
            )
        return request


def _no_slot() -> None:
    """The release of a call that holds no slot."""


class _Watchdog:
    """Calls ``expire()`` of each watch still open ``seconds`` after it opened.

    One daemon thread for all calls, started by a watch when there is none, gone once it
    has had nothing to watch for ``seconds``. Every watch lasts the same ``seconds``, so
    they expire in the order they opened (a queue, no heap), and one that opens while
    the thread sleeps expires after the thread wakes: nothing ever wakes it early, and
    a call costs two short locked sections, not a thread switch. Closed watches leave
    the queue from its front, as new ones open and as the thread wakes.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._open: dict[int, Callable[[], None]] = {}
        self._queue: collections.deque[tuple[float, int]] = collections.deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def open(self, expire: Callable[[], None]) -> int:
        """Start watching; returns the key to :meth:`close` the watch with."""
        key = next(self._ids)
        with self._lock:
            self._drop_closed()
            self._open[key] = expire
            self._queue.append((time.monotonic() + self._seconds, key))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="embcomp-request-watchdog", daemon=True
                )
                self._thread.start()
        return key

    def close(self, key: int) -> None:
        with self._lock:
            self._open.pop(key, None)

    def _drop_closed(self) -> None:
        while self._queue and self._queue[0][1] not in self._open:
            self._queue.popleft()

    def _run(self) -> None:
        idle = False
        while True:
            expire = None
            with self._lock:
                self._drop_closed()
                if not self._queue:
                    if idle:  # nothing to watch for a whole limit
                        self._thread = None
                        return
                    idle, wait = True, self._seconds
                else:
                    idle = False
                    deadline, key = self._queue[0]
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        self._queue.popleft()
                        expire = self._open.pop(key)
            if expire is None:
                time.sleep(wait)
                continue
            try:
                expire()
            except Exception:  # noqa: BLE001 - one failed cancel must not stop the watchdog
                logger.exception("cancelling a call whose request did not arrive failed")
