"""Limits, bearer-token auth and TLS, each against a real server on a loopback port."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import running_server, store_snapshot

from embcomp.artifacts import codec_to_bytes
from embcomp.client import CompressionClient, ServiceError
from embcomp.codec import Codec
from embcomp.service.config import MiB
from embcomp.service.convert import array_to_codes, array_to_matrix
from embcomp.v1 import compression_service_pb2 as pb
from embcomp.v1 import compression_service_pb2_grpc as pb_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _code(call):
    with pytest.raises(ServiceError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# -- limits --------------------------------------------------------------------------------
def test_default_message_limit_is_well_above_grpc_4mb(tmp_path, sample):
    base = sample[0]
    with running_server(tmp_path / "s") as srv:
        assert srv.config.max_message_bytes >= 64 * MiB
        # One 12 MiB unary Encode: over gRPC's 4 MiB default, fine here.
        big = np.tile(base, (3, 1))[:8192]
        with CompressionClient(f"127.0.0.1:{srv.port}", message_bytes=16 * MiB) as client:
            info = client.fit("fp8", base)
            codes = client.encode(info.id, big)
            assert codes.shape == (8192, 384)
        registry = srv.metrics.registry
        assert registry.get_sample_value("embcomp_requests_total", {"method": "Encode"}) == 1
        received = registry.get_sample_value("embcomp_received_bytes_total", {"method": "Encode"})
        assert received > big.nbytes >= 12 * MiB


def test_limits_give_resource_exhausted(tmp_path, sample):
    base = sample[0]
    store = tmp_path / "s"
    settings = {"max_message_bytes": MiB, "max_rows_per_request": 1000, "max_fit_bytes": 400 * 1536}
    with running_server(store, **settings) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CompressionClient(target, message_bytes=MiB) as client:
            info = client.fit("bin", base[:400])
            before = store_snapshot(store)
            # more rows than max_rows_per_request in one message (float16: 770 kB, one message)
            half = base[:1001].astype(np.float16)
            code, details = _code(lambda: client.encode(info.id, half))
            assert code == EXHAUSTED and "limit of 1000 per request" in details
            # training data over max_fit_bytes
            code, details = _code(lambda: client.fit("int8", base[:401]))
            assert code == EXHAUSTED and "EMBCOMP_MAX_FIT_BYTES" in details
            # a response that would be over the message limit: 800 x 1536 bytes > 1 MiB
            codes = client.encode(info.id, base[:800])
            request = pb.DecodeRequest(codec_id=info.id, codes=array_to_codes(codes))
            code, details = _code(lambda: client._call(client._stub.Decode, request))
            assert code == EXHAUSTED and "message limit" in details
            # the client's own decode splits it into a stream and succeeds
            assert client.decode(info.id, codes).shape == (800, 384)
        # a request message over max_message_bytes is refused by gRPC itself
        with CompressionClient(target, message_bytes=4 * MiB) as client:
            code, _ = _code(lambda: client.encode(info.id, base[:1000]))
            assert code == EXHAUSTED
        assert store_snapshot(store) == before


def test_concurrent_fit_limit(tmp_path, sample, monkeypatch):
    base = sample[0]
    fitting, release = threading.Event(), threading.Event()
    real_fit = Codec.fit

    def held_fit(self, X):  # the int8 fit holds its slot until released
        if str(self.spec) == "int8":
            fitting.set()
            release.wait(30)
        return real_fit(self, X)

    monkeypatch.setattr(Codec, "fit", held_fit)
    with running_server(tmp_path / "s", max_concurrent_fits=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        outcome: dict[str, object] = {}

        def first_fit():
            with CompressionClient(target) as client:
                outcome["info"] = client.fit("int8", base[:200])

        worker = threading.Thread(target=first_fit)
        worker.start()
        assert fitting.wait(30)
        with CompressionClient(target) as client:
            code, details = _code(lambda: client.fit("fp8", base[:100]))
            assert code == EXHAUSTED and "1 fits are already running" in details
            release.set()
            worker.join()
            assert outcome["info"].spec == "int8"
            assert client.fit("fp8", base[:100]).spec == "fp8"  # the slot is free again


def stalled_fit(release):
    """A FitCodec request stream that sends its header, then nothing until ``release``."""
    yield pb.FitCodecRequest(header=pb.FitCodecHeader(spec="int8"))
    release.wait(30)


def test_a_stalled_upload_holds_no_fit_slot(tmp_path, sample):
    """Only a fit whose data has arrived takes a slot: two clients that send a header and
    then nothing must not lock everyone else out of fitting."""
    base = sample[0]
    with running_server(tmp_path / "s", max_concurrent_fits=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        release = threading.Event()

        def upload():
            with CompressionClient(target) as client, contextlib.suppress(ServiceError):
                client._call(client._stub.FitCodec, stalled_fit(release))

        uploads = [threading.Thread(target=upload) for _ in range(2)]
        for thread in uploads:
            thread.start()
        try:
            with CompressionClient(target) as client:
                assert client.fit("fp8", base[:100]).spec == "fp8"
        finally:
            release.set()
            for thread in uploads:
                thread.join()


def test_idle_streams_neither_lock_out_health_checks_nor_hold_their_slots(tmp_path, sample):
    """Once, 16 streams that sent a header and then nothing held all 16 threads: every
    other call, health checks included, hung."""
    with running_server(tmp_path / "s", max_workers=2, stream_idle_seconds=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        release = threading.Event()

        def stalled_encode():
            release.wait(30)  # not even a first message
            yield from ()

        with grpc.insecure_channel(target) as channel, CompressionClient(target) as client:
            stub = pb_grpc.CompressionServiceStub(channel)
            started = time.monotonic()
            streams = [stub.FitCodec.future(stalled_fit(release))]
            encode_stream = stub.EncodeStream(stalled_encode())
            streams.append(encode_stream)
            time.sleep(0.3)  # both streams now hold the two call slots
            try:
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                code, details = _code(lambda: client.list())
                assert code == EXHAUSTED and "all 2 of this server's call slots are busy" in details
                assert time.monotonic() - started < 0.9  # answered at once, not queued
                for outcome in (lambda: streams[0].result(timeout=10), lambda: list(encode_stream)):
                    with pytest.raises(grpc.RpcError) as caught:
                        outcome()
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    assert "arrived for 1 s" in caught.value.details()
                    assert "EMBCOMP_STREAM_IDLE_SECONDS" in caught.value.details()
                assert client.list() == []  # the slots are free again
            finally:
                release.set()
        deadline = time.monotonic() + 5
        while any("reader" in t.name for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a stream's reader thread outlived its call"
            time.sleep(0.05)


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-reader")]


def _wait_for_no_reader_threads(seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while _reader_threads():
        assert time.monotonic() < deadline, (
            f"reader threads outlived their calls: {_reader_threads()}"
        )
        time.sleep(0.05)


def test_a_stream_whose_client_reads_no_responses_is_cancelled_and_frees_its_slot(tmp_path):
    """A DecodeStream client that kept sending but read nothing left the handler blocked
    in gRPC's send (flow control) with its slot held forever: with one slot, every other
    call was refused."""
    rng = np.random.default_rng(11)
    with running_server(tmp_path / "s", max_workers=1, stream_idle_seconds=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CompressionClient(target) as client:
            info = client.fit("int8", rng.standard_normal((64, 1024)).astype(np.float32))
        codes = array_to_codes(rng.integers(0, 256, (1000, 1024), dtype=np.uint8))
        stop = threading.Event()

        def requests():  # 4 MB of decoded vectors per response, none of them read
            for _ in range(40):
                if stop.is_set():
                    return
                yield pb.DecodeStreamRequest(codec_id=info.id, codes=codes)
            stop.wait(30)

        options = [("grpc.max_receive_message_length", 64 * MiB)]
        with grpc.insecure_channel(target, options=options) as channel:
            responses = pb_grpc.CompressionServiceStub(channel).DecodeStream(requests())
            try:
                # The stream starts on its own thread: until it has sent a response it may
                # not hold the slot yet, and a list() that got there first took it.
                deadline = time.monotonic() + 10
                while not srv.metrics.registry.get_sample_value(
                    "embcomp_sent_bytes_total", {"method": "DecodeStream"}
                ):
                    assert time.monotonic() < deadline, "the stream sent nothing"
                    time.sleep(0.01)
                with CompressionClient(target) as client:
                    deadline = time.monotonic() + 10
                    while True:  # refused while the stream holds the only slot
                        try:
                            assert client.list()[0].id == info.id
                            break
                        except ServiceError as exc:
                            assert exc.code() == EXHAUSTED
                            assert time.monotonic() < deadline, "the stalled stream kept its slot"
                            time.sleep(0.2)
                with pytest.raises(grpc.RpcError) as caught:
                    list(responses)
                assert caught.value.code() == grpc.StatusCode.CANCELLED
            finally:
                stop.set()
                responses.cancel()
    _wait_for_no_reader_threads()


def test_stream_requests_are_read_only_when_the_handler_asks():
    """The reader thread read one message ahead of the handler besides the one it
    handed over: for FitCodec, two chunks of up to 64 MiB each outside the upload
    budget. And next() after the end waited the idle limit, then raised
    IdleStreamError instead of StopIteration."""
    from embcomp.service.calls import IdleTimeout

    produced: list[int] = []

    def messages():
        for index in range(4):
            produced.append(index)
            yield index

    stream = IdleTimeout(messages(), 5, "Test")
    try:
        assert next(stream) == 0
        time.sleep(0.3)
        assert produced == [0]  # nothing read ahead
        assert next(stream) == 1
        time.sleep(0.3)
        assert produced == [0, 1]
        assert list(stream) == [2, 3]
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(StopIteration):
                next(stream)
        assert time.monotonic() - started < 0.5
    finally:
        stream.close()
    _wait_for_no_reader_threads()


def test_reflection_streams_take_call_slots_and_end_when_idle(tmp_path):
    """Reflection had no slot and no idle limit and ran on the spare threads: 18 idle
    reflection streams locked out every call, health checks included."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    release = threading.Event()

    def idle_requests():
        release.wait(30)
        yield from ()

    with running_server(tmp_path / "s", max_workers=2, stream_idle_seconds=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel, CompressionClient(target) as client:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            try:
                held = [stub.ServerReflectionInfo(idle_requests()) for _ in range(2)]
                time.sleep(0.3)  # both hold the two call slots
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                code, details = _code(lambda: client.list())
                assert code == EXHAUSTED and "call slots are busy" in details
                with pytest.raises(grpc.RpcError) as caught:
                    list(stub.ServerReflectionInfo(idle_requests(), timeout=5))
                assert caught.value.code() == EXHAUSTED
                for stream in held:
                    with pytest.raises(grpc.RpcError) as caught:
                        list(stream)
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    assert (
                        "no ServerReflectionInfo message arrived for 1 s" in caught.value.details()
                    )
            finally:
                release.set()
            assert client.list() == []  # the slots are free again
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
            names = {s.name for s in answer.list_services_response.service}
            assert "embcomp.v1.CompressionService" in names
            assert (
                "grpc.health.v1.Health" in ProtoReflectionDescriptorDatabase(channel).get_services()
            )
        registry = srv.metrics.registry
        assert (
            registry.get_sample_value("embcomp_requests_total", {"method": "ServerReflectionInfo"})
            >= 4
        )
    _wait_for_no_reader_threads()


def _unary_as_stream(channel, method, request_type, response_type):
    """Service method ``method`` called as a client stream: what a client whose unary
    request is slow, or never comes, looks like on the wire."""
    return channel.stream_unary(
        f"/embcomp.v1.CompressionService/{method}",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )


def test_unary_calls_whose_request_never_arrives_end_and_hold_no_thread_for_long(tmp_path):
    """gRPC read a unary call's request on a server thread, before any handler or slot,
    with no time limit: max_workers + 2 clients that sent headers and no body held
    every thread, health checks' included, for as long as they stayed connected."""
    release = threading.Event()

    def no_body():
        release.wait(30)
        yield from ()

    def slow_body():
        time.sleep(0.5)
        yield pb.ListCodecsRequest()

    with running_server(tmp_path / "s", max_workers=2, stream_idle_seconds=1.5) as srv:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel, CompressionClient(target) as client:
            encode = _unary_as_stream(channel, "Encode", pb.EncodeRequest, pb.EncodeResponse)
            listing = _unary_as_stream(
                channel, "ListCodecs", pb.ListCodecsRequest, pb.ListCodecsResponse
            )
            try:
                started = time.monotonic()
                calls = [encode.future(no_body()) for _ in range(4)]  # as many as threads
                time.sleep(0.3)
                refused = [c for c in calls if c.done()]
                assert len(refused) == 2  # two hold the two slots, two were refused at once
                for call in refused:
                    assert call.exception().code() == EXHAUSTED
                    assert "call slots are busy" in call.exception().details()
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert _code(lambda: client.list())[0] == EXHAUSTED
                for call in calls:
                    with pytest.raises(grpc.RpcError) as caught:
                        call.result(timeout=10)
                    assert caught.value.code() in (EXHAUSTED, grpc.StatusCode.CANCELLED)
                assert 1.5 <= time.monotonic() - started < 5  # ended by the server's limit
            finally:
                release.set()
            assert client.list() == []  # the slots are free again
            # a request that takes a while but arrives within the limit is served
            assert list(listing(slow_body(), timeout=10).codecs) == []
            # a server-streaming method (health's Watch) still answers through the same path
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            # a unary call must carry exactly one message, as gRPC itself answers
            with pytest.raises(grpc.RpcError) as caught:
                listing(iter(()), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "requires exactly one request message" in caught.value.details()
        errors = srv.metrics.registry.get_sample_value
        for code in ("CANCELLED", "RESOURCE_EXHAUSTED"):
            assert errors("embcomp_errors_total", {"method": "Encode", "code": code}) == 2


def test_waits_are_at_most_a_week_and_a_week_works(tmp_path, sample):
    """1e12 s (or inf) overflowed the platform's timeouts: as the idle limit every
    FitCodec failed with INTERNAL and the request watchdog's thread died; as the grace
    period gRPC's stop crashed a thread."""
    from pydantic import ValidationError

    from embcomp.service.config import MAX_WAIT_SECONDS, ServiceConfig

    for setting in ("stream_idle_seconds", "grace_seconds"):
        for bad in (float("inf"), 1e12, MAX_WAIT_SECONDS + 1):
            with pytest.raises(ValidationError, match="less than or equal to 604800"):
                ServiceConfig(**{setting: bad})
    week = {"stream_idle_seconds": MAX_WAIT_SECONDS, "grace_seconds": MAX_WAIT_SECONDS}
    with running_server(tmp_path / "s", **week) as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}") as client:
            info = client.fit("int8", sample[0][:200])
            assert client.encode(info.id, sample[0][:3]).shape == (3, 384)
            assert [c.id for c in client.list()] == [info.id]


def test_the_request_watchdog_expires_open_watches_in_order():
    from embcomp.service.calls import _Watchdog

    fired = []
    watchdog = _Watchdog(0.2)
    first = watchdog.open(lambda: fired.append(1))
    watchdog.close(watchdog.open(lambda: fired.append(2)))  # closed in time: never fires
    third = watchdog.open(lambda: fired.append(3))
    time.sleep(0.6)
    assert fired == [1, 3]
    watchdog.close(first)  # closing an expired watch is harmless
    watchdog.close(third)
    watchdog.open(lambda: fired.append(4))  # the sleeping thread finds a new watch
    time.sleep(0.6)
    assert fired == [1, 3, 4]
    deadline = time.monotonic() + 5
    while watchdog._thread is not None:  # nothing to watch for 0.2 s: the thread ends
        assert time.monotonic() < deadline, "the idle watchdog thread did not end"
        time.sleep(0.05)
    watchdog.open(lambda: fired.append(5))  # and a new watch starts another
    time.sleep(0.6)
    assert fired == [1, 3, 4, 5]


def test_an_upload_cut_by_its_deadline_stores_nothing(tmp_path, sample):
    """gRPC may end a client stream whose deadline passed as if it were complete; the
    server must not fit (and store) the chunks that arrived before it."""
    base = sample[0]
    store = tmp_path / "s"
    with running_server(store) as srv:
        target = f"127.0.0.1:{srv.port}"
        for _ in range(5):  # the server sees the cut as an end of stream in about half

            def slow():  # declares its rows, as CompressionClient.fit does
                yield pb.FitCodecRequest(header=pb.FitCodecHeader(spec="int8", rows=1000))
                for start in range(0, 1000, 100):
                    yield pb.FitCodecRequest(chunk=array_to_matrix(base[start : start + 100]))
                    time.sleep(0.15)

            with CompressionClient(target, timeout=0.5) as client:
                with pytest.raises(ServiceError) as caught:
                    client._call(client._stub.FitCodec, slow())
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finished = lambda: srv.metrics.registry.get_sample_value(  # noqa: E731
            "embcomp_requests_total", {"method": "FitCodec"}
        )
        deadline = time.monotonic() + 30
        while (finished() or 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # synchronization only: wait until the server ended all five
        assert finished() == 5
        assert not [p for p in store.iterdir() if p.suffix == ".codec"]


def test_a_stream_shorter_than_its_header_declares_is_refused_and_stores_nothing(tmp_path, sample):
    base = sample[0]
    store = tmp_path / "s"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        header = pb.FitCodecRequest(header=pb.FitCodecHeader(spec="int8", rows=1000))
        messages = iter([header, pb.FitCodecRequest(chunk=array_to_matrix(base[:200]))])
        with pytest.raises(ServiceError) as caught:
            client._call(client._stub.FitCodec, messages)
        # the client ended its stream cleanly, within its deadline: its rows are wrong
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declared 1000 training rows but 200 arrived" in caught.value.details()
        assert not [p for p in store.iterdir() if p.suffix == ".codec"]


def test_evaluation_and_export_limits(tmp_path, sample):
    base = sample[0]
    store = tmp_path / "s"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        # whitened: a forward and an inverse 384 x 384 float32 matrix, > 1 MiB
        info = client.fit("pca,int8", base[:500], whiten=True)
    # the same store served with a 1 MiB message limit, which that codec is over
    settings = {"max_eval_pairs": 4400, "max_eval_k": 50, "max_message_bytes": MiB}
    with running_server(store, **settings) as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}", message_bytes=MiB) as client:
            # work = queries x (base rows + 32 x k): 11 x (100 + 320) = 4620 > 4400
            code, details = _code(lambda: client.evaluate(info.id, base[:100], base[:11]))
            assert code == EXHAUSTED and "11 queries x (100 base rows + 32 x k=10)" in details
            assert "EMBCOMP_MAX_EVAL_PAIRS" in details
            assert client.evaluate(info.id, base[:100], base[:10]).query_rows == 10
            assert client.evaluate(info.id, base[:100], base[:11], k=1).k == 1
            # the work grows with k: fewer queries than the pairs alone would allow
            code, details = _code(lambda: client.evaluate(info.id, base[:40], base[:4], k=45))
            assert code == EXHAUSTED and "k=40" in details  # k is capped at the base rows
            # k itself has a cap, whatever the rows
            code, details = _code(lambda: client.evaluate(info.id, base[:100], base[:1], k=51))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "k=51 is over this server's limit of 50" in details
            assert "EMBCOMP_MAX_EVAL_K" in details
            assert client.evaluate(info.id, base[:100], base[:1], k=50).k == 50
            # ... after capping it at the base rows: k=2000 on 40 rows runs at k=40
            assert client.evaluate(info.id, base[:40], base[:1], k=2000).k == 40
            code, details = _code(lambda: client.export_codec(info.id))
            assert code == EXHAUSTED and "over this server's message limit" in details


def test_a_fit_too_big_for_its_width_is_refused_before_the_work(tmp_path):
    """A 196 KB upload of 3 x 16384 would make rot build a 2 GiB float64 draw."""
    narrow = np.random.default_rng(3).standard_normal((3, 600)).astype(np.float32)
    widest = np.random.default_rng(3).standard_normal((3, 16384)).astype(np.float32)
    store = tmp_path / "s"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        started = time.perf_counter()
        code, details = _code(lambda: client.fit("rot,int8", widest))
        assert time.perf_counter() - started < 2
        assert code == EXHAUSTED
        assert "builds a 16384 x 16384 float64 matrix (2147483648 bytes)" in details
        info = client.fit("rot,int8", narrow)  # 1.4 MB: fine
        assert client.export_codec(info.id)
    settings = {"max_dims": 1000, "max_fit_bytes": 2 * MiB, "max_message_bytes": MiB}
    with running_server(store, **settings) as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}", message_bytes=MiB) as client:
            before = store_snapshot(store)
            code, details = _code(lambda: client.fit("int8", widest[:, :1001]))
            assert code == EXHAUSTED
            assert "1001-dim vectors, over this server's limit of 1000 dims" in details
            assert "EMBCOMP_MAX_DIMS" in details
            # pca8's artifact is small, but its fit builds a 600 x 600 float64 covariance
            code, details = _code(lambda: client.fit("pca8,int8", narrow))
            assert code == EXHAUSTED
            assert "builds a 600 x 600 float64 matrix (2880000 bytes)" in details
            assert "EMBCOMP_MAX_FIT_BYTES" in details
            # mpad builds no square matrix, but keeps two 300 x 1000 float32 ones: 2.4 MB
            code, details = _code(lambda: client.fit("mpad300,int8", widest[:, :1000]))
            assert code == EXHAUSTED and "would be at least 2405200 bytes" in details
            assert "2097152 bytes per fit (EMBCOMP_MAX_FIT_BYTES)" in details
            wide_codec = Codec("int8").fit(widest[:, :1001])
            code, details = _code(lambda: client.import_codec(wide_codec))
            assert code == EXHAUSTED and "takes 1001-dim vectors" in details
            assert store_snapshot(store) == before
            assert client.fit("pca8,int8", narrow[:, :256]).d_in == 256


@pytest.mark.parametrize("d", [768, 1024, 1536, 3072, 4096])
def test_default_limits_take_rot_and_pca_at_common_widths(tmp_path, d):
    """Format-1 artifacts stored rot's and pca's matrix twice and the limits counted it
    twice: rot,int8 at 3072 dims (75.5 MB) was refused under the 64 MiB message limit."""
    from embcomp.service.config import ServiceConfig
    from embcomp.service.metrics import ServiceMetrics
    from embcomp.service.servicer import CompressionServicer, _fit_footprint
    from embcomp.service.store import CodecStore

    config = ServiceConfig(store=tmp_path)
    servicer = CompressionServicer(CodecStore(tmp_path), config, ServiceMetrics())
    for spec, options in [
        ("rot,int8", {}),
        ("pca,fp8", {}),
        (f"pca{d // 2},int8", {}),
        (f"pca{d // 4},int8", {"whiten": True}),
    ]:
        codec = Codec(spec, **options)
        servicer._check_fit_width(codec, d)  # accepted: no error
        artifact, _ = _fit_footprint(codec, d)
        # all but rot and full pca at 4096 dims can be exported too
        exportable = artifact <= config.max_artifact_bytes
        assert exportable == (d < 4096 or spec.startswith(f"pca{d // 2}") or "whiten" in options)


@pytest.mark.parametrize(
    "spec,options",
    [("rot,int8", {}), ("pca,fp8", {}), ("pca5,int4", {}), ("pca,bin", {"whiten": True})]
    + [("mpad6,int8", {}), ("l2norm,pca7,fp8", {}), ("int8", {})],
)
def test_the_artifact_estimate_is_a_lower_bound(spec, options):
    from embcomp.service.servicer import _fit_footprint

    train = np.random.default_rng(5).standard_normal((60, 24)).astype(np.float32)
    codec = Codec(spec, **options)
    estimate, _ = _fit_footprint(codec, 24)
    actual = len(codec_to_bytes(codec.fit(train)))
    assert estimate <= actual < estimate + 4096  # the manifest and alignment padding


def test_a_codec_too_big_to_export_is_still_fitted_stored_and_used(tmp_path):
    """rot at 4096 dims makes a 64 MiB + 50 KB artifact, over the default message limit
    by 50 KB: it is stored and used; only ExportCodec refuses it, saying what to do. Shown
    at 512 dims under a 1 MiB limit (a 4096-dim rot takes seconds to fit)."""
    train = np.random.default_rng(4).standard_normal((40, 512)).astype(np.float32)
    store = tmp_path / "s"
    with running_server(store, max_message_bytes=MiB) as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}", max_message_bytes=MiB) as client:
            info = client.fit("rot,int8", train)
            assert info.artifact_size > MiB
            local = Codec("rot,int8").fit(train)
            np.testing.assert_array_equal(
                client.encode(info.id, train[:5]), local.encode(train[:5])
            )
            code, details = _code(lambda: client.export_codec(info.id))
            assert code == EXHAUSTED and "over this server's message limit" in details
            assert "copy the file from the store directory" in details
            assert (store / f"{info.id}.codec").stat().st_size == info.artifact_size
            # a narrower one still exports
            assert client.export_codec(client.fit("rot,int8", train[:, :384]).id)


def test_an_evaluation_out_of_memory_names_its_k_and_rows(tmp_path, sample, monkeypatch):
    """The generic out-of-memory message says 'send fewer rows'; for an evaluation the
    cause may as well be k, so it names both."""
    import embcomp.service.servicer as servicer

    def no_memory(*args, **kwargs):
        raise MemoryError

    base = sample[0]
    with running_server(tmp_path / "s") as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}") as client:
            info = client.fit("int8", base[:200])
            monkeypatch.setattr(servicer, "exact_knn", no_memory)
            code, details = _code(lambda: client.evaluate(info.id, base[:100], base[:7], k=20))
    assert code == EXHAUSTED
    assert "evaluating 7 queries against 100 base rows at k=20" in details
    assert "smaller k" in details


# -- auth ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("auth"), auth_token="s3cret-token") as srv:
        yield srv


def test_auth_rejects_missing_and_wrong_tokens(auth_server, sample):
    target = f"127.0.0.1:{auth_server.port}"
    for token, reason in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        with CompressionClient(target, token=token) as client:
            for call in (
                lambda c=client: c.list(),
                lambda c=client: c.fit("int8", sample[0][:10]),
                lambda c=client: c.encode_stream("0" * 24, sample[0][:10]),
            ):
                code, details = _code(call)
                assert code == UNAUTHENTICATED and reason in details
    assert len(auth_server.store) == 0  # the rejected fit stored nothing


def test_auth_accepts_the_token_and_exempts_health(auth_server, sample):
    target = f"127.0.0.1:{auth_server.port}"
    with CompressionClient(target, token="s3cret-token") as client:
        info = client.fit("int8", sample[0][:100])
        assert client.encode(info.id, sample[0][:3]).shape == (3, 384)
    with grpc.insecure_channel(target) as channel:  # no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    labels = {"method": "ListCodecs", "code": "UNAUTHENTICATED"}
    registry = auth_server.metrics.registry
    before = registry.get_sample_value("embcomp_errors_total", labels) or 0
    with CompressionClient(target, token="nope") as client:
        assert _code(client.list)[0] == UNAUTHENTICATED
    assert registry.get_sample_value("embcomp_errors_total", labels) == before + 1


def test_auth_refuses_a_call_without_waiting_for_its_request(auth_server):
    """The rejection used to wait, on a server thread, for a body that might never come."""
    release = threading.Event()

    def no_body():
        release.wait(30)
        yield from ()

    target = f"127.0.0.1:{auth_server.port}"
    with grpc.insecure_channel(target) as channel:
        encode = _unary_as_stream(channel, "Encode", pb.EncodeRequest, pb.EncodeResponse)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                encode(no_body(), timeout=10)
            assert caught.value.code() == UNAUTHENTICATED
            assert time.monotonic() - started < 5  # not the 60 s request limit
        finally:
            release.set()


def test_auth_token_file(tmp_path, sample):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    with running_server(tmp_path / "s", auth_token_file=token_file) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CompressionClient(target, token="from-a-file") as client:
            assert client.list() == []
        with CompressionClient(target, token="from-a-fil") as client:
            assert _code(client.list)[0] == UNAUTHENTICATED


# -- TLS -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A self-signed EC certificate for localhost/127.0.0.1, made with the openssl CLI."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_with_self_signed_certificate(tmp_path, self_signed, sample):
    cert, key = self_signed
    base = sample[0]
    with running_server(tmp_path / "s", tls_cert=cert, tls_key=key, auth_token="tok") as srv:
        target = f"localhost:{srv.port}"
        with CompressionClient(target, tls=cert, token="tok") as client:
            info = client.fit("fp8", base[:300])
            np.testing.assert_array_equal(
                client.decode(info.id, client.encode(info.id, base[:50])).shape, (50, 384)
            )
        with CompressionClient(target, tls=cert.read_bytes()) as client:  # TLS, no token
            assert _code(client.list)[0] == UNAUTHENTICATED
        with CompressionClient(target, token="tok", timeout=5) as client:  # plaintext to TLS
            assert _code(client.list)[0] == grpc.StatusCode.UNAVAILABLE


def test_a_fit_stops_at_its_next_step_once_its_call_has_ended(tmp_path, sample, monkeypatch):
    """numpy and scipy cannot be interrupted, so a long fit checks between steps (here
    MPAD axes) whether its client is still there; a cancelled one frees its slot early."""
    from embcomp.reducers import _mpad

    fitted_axes = []
    real_fit_axis = _mpad._fit_axis

    def slow_fit_axis(*args, **kwargs):  # a slow machine, deterministically: 0.25 s an axis
        time.sleep(0.25)
        fitted_axes.append(1)
        return real_fit_axis(*args, **kwargs)

    monkeypatch.setattr(_mpad, "_fit_axis", slow_fit_axis)
    base = sample[0][:500]
    store = tmp_path / "s"
    with running_server(store, max_concurrent_fits=1) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CompressionClient(target, timeout=1.5) as client:  # 64 axes would take 16 s
            code, _ = _code(lambda: client.fit("mpad64,int8", base, n_train=500))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        running = lambda: srv.metrics.registry.get_sample_value("embcomp_fits_running")  # noqa: E731
        deadline = time.monotonic() + 60
        while running() and time.monotonic() < deadline:
            time.sleep(0.01)  # synchronization only: wait until the server gave up the fit
        assert running() == 0
        assert 1 <= len(fitted_axes) < 32, len(fitted_axes)
        assert not [p for p in store.iterdir() if p.suffix == ".codec"]
        with CompressionClient(target) as client:  # the slot is free again
            assert client.fit("int8", base).code_size == 384


def test_an_evaluation_stops_between_blocks_once_its_call_has_ended(tmp_path, sample, monkeypatch):
    from embcomp import evaluation

    blocks = []
    real_scores = evaluation._scores

    def slow_scores(*args):  # a slow machine, deterministically: 0.05 s a block
        time.sleep(0.05)
        blocks.append(1)
        return real_scores(*args)

    monkeypatch.setattr(evaluation, "_scores", slow_scores)
    monkeypatch.setattr(evaluation, "_B_BLOCK", 50)  # 60 blocks per search, 2 searches
    base, queries = sample[0], sample[1][:20]
    with running_server(tmp_path / "s") as srv:
        target = f"127.0.0.1:{srv.port}"
        with CompressionClient(target) as client:
            info = client.fit("int8", base)
        with CompressionClient(target, timeout=1.0) as client:  # 120 blocks would take 6 s
            code, _ = _code(lambda: client.evaluate(info.id, base, queries))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        done = lambda: srv.metrics.registry.get_sample_value(  # noqa: E731
            "embcomp_requests_total", {"method": "EvaluateCodec"}
        )
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)  # synchronization only: wait until the server ended the call
        assert done() == 1
        assert 1 <= len(blocks) < 60, len(blocks)
