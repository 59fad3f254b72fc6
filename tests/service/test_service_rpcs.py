"""Every RPC against a real server: results byte-identical to the library's own calls."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from matching import assert_codes_match, assert_vectors_match

import embcomp
from embcomp import InputError
from embcomp.artifacts import codec_id
from embcomp.cli import main as cli_main
from embcomp.client import CompressionClient
from embcomp.v1 import compression_service_pb2 as pb
from embcomp.v1 import types_pb2

SPECS = ["fp8", "int8", "fp16", "fp4", "pca128,int8", "l2norm,pca64,bin", "rot,int4"]


@pytest.fixture(scope="module")
def fitted(client, sample):
    """spec -> (CodecInfo from the service, the same codec fitted in-process)."""
    base, _ = sample
    train = base[:1500]
    return {
        spec: (client.fit(spec, train, seed=3), embcomp.make_codec(spec, seed=3).fit(train))
        for spec in SPECS
    }


@pytest.mark.parametrize("spec", SPECS)
def test_fit_matches_library_fit(fitted, client, spec):
    info, codec = fitted[spec]
    assert info.id == codec_id(codec)
    assert (info.spec, info.d_in, info.d_out, info.code_size) == (
        str(codec.spec),
        codec.d_in,
        codec.d_out,
        codec.code_size,
    )
    assert info.options == codec.options and info.options["seed"] == 3
    assert info.compression_ratio == pytest.approx(codec.compression_ratio)
    assert client.export_codec(info.id) == embcomp.codec_to_bytes(codec)


@pytest.mark.parametrize("spec", SPECS)
def test_encode_decode_project_byte_identical(fitted, client, sample, spec):
    base, queries = sample
    info, codec = fitted[spec]
    codes = client.encode(info.id, base)
    assert codes.dtype == np.uint8 and codes.shape == (3000, codec.code_size)
    np.testing.assert_array_equal(codes, codec.encode(base))
    np.testing.assert_array_equal(client.decode(info.id, codes), codec.decode(codes))
    reduced = client.decode(info.id, codes, reduced=True)
    np.testing.assert_array_equal(reduced, codec.decode(codes, reduced=True))
    np.testing.assert_array_equal(
        client.project_queries(info.id, queries), codec.project_queries(queries)
    )
    if codec.reducer is None or codec.reducer.has_orthonormal_rows:
        np.testing.assert_array_equal(
            client.project_queries(info.id, queries, metric="l2"),
            codec.project_queries(queries, metric="l2"),
        )


def test_float16_input_encodes_like_the_library(fitted, client, sample):
    base, _ = sample
    info, codec = fitted["pca128,int8"]
    half = base[:500].astype(np.float16)
    np.testing.assert_array_equal(client.encode(info.id, half), codec.encode(half))


def test_streams_preserve_order_and_bytes(fitted, client, sample):
    base, _ = sample
    info, codec = fitted["rot,int4"]
    # Small messages: many stream messages, offsets checked by the client.
    # (Messages not aligned to the library's blocks: equal up to BLAS rounding.)
    codes = client.encode_stream(info.id, base, rows_per_message=97)
    assert_codes_match(codec, codes, codec.encode(base))
    decoded = client.decode_stream(info.id, codes, rows_per_message=682)
    assert_vectors_match(codec, decoded, codec.decode(codes))


def test_stream_responses_carry_row_offsets(fitted, stub, sample):
    base, _ = sample
    info, codec = fitted["fp8"]
    sizes = [5, 1, 17, 3]
    requests, start = [], 0
    for size in sizes:
        matrix = types_pb2.Matrix(
            rows=size,
            cols=384,
            dtype=types_pb2.DTYPE_FLOAT32,
            data=base[start : start + size].tobytes(),
        )
        requests.append(pb.EncodeStreamRequest(codec_id=info.id, vectors=matrix))
        start += size
    replies = list(stub.EncodeStream(iter(requests)))
    assert [r.row_offset for r in replies] == [0, 5, 6, 23]
    joined = b"".join(r.codes.data for r in replies)
    assert joined == codec.encode(base[:start]).tobytes()


def test_evaluate_matches_library_recall(fitted, client, sample):
    base, queries = sample
    info, codec = fitted["pca128,int8"]
    result = client.evaluate(info.id, base, queries, k=10)
    true_ids, _ = embcomp.evaluation.exact_knn(base, queries, 10)
    found_ids, _ = embcomp.evaluation.exact_knn(codec.decode(codec.encode(base)), queries, 10)
    expected = embcomp.evaluation.recall_at_k(found_ids, true_ids, 10, base=base, queries=queries)
    assert result.recall_at_k == pytest.approx(expected, abs=1e-12)
    assert 0.3 < result.recall_at_k < 1.0
    assert (result.k, result.bytes_per_vector, result.base_rows, result.query_rows) == (
        10,
        128,
        3000,
        200,
    )
    assert result.compression_ratio == pytest.approx(12.0)
    lossless = client.evaluate(fitted["fp16"][0].id, base, queries, k=5, metric="l2")
    assert lossless.recall_at_k == pytest.approx(1.0)
    for k in (0, -1, 2.5, True):  # k=0 on the wire means 10: refused before sending
        with pytest.raises(embcomp.InputError, match="k must be an integer >= 1"):
            client.evaluate(info.id, base, queries, k=k)


def test_evaluate_metrics(fitted, client, sample):
    """Cosine, and the default metric: cosine for a codec that normalizes (as `embcomp
    eval`), inner product otherwise; the reply says which it used."""
    base, queries = sample
    norms = np.random.default_rng(4).uniform(0.5, 20.0, size=(base.shape[0], 1))
    scaled = (base * norms).astype(np.float32)  # cosine and inner product now disagree

    def library(codec, metric):
        true_ids, _ = embcomp.evaluation.exact_knn(scaled, queries, 10, metric=metric)
        decoded = codec.decode(codec.encode(scaled))
        found_ids, _ = embcomp.evaluation.exact_knn(decoded, queries, 10, metric=metric)
        return embcomp.evaluation.recall_at_k(
            found_ids, true_ids, 10, base=scaled, queries=queries, metric=metric
        )

    info, codec = fitted["l2norm,pca64,bin"]
    by_default = client.evaluate(info.id, scaled, queries)
    assert by_default.metric == "cos"
    assert by_default.recall_at_k == pytest.approx(library(codec, "cos"), abs=1e-12)
    by_ip = client.evaluate(info.id, scaled, queries, metric="ip")
    assert by_ip.metric == "ip" and by_ip.recall_at_k == pytest.approx(library(codec, "ip"))
    assert by_ip.recall_at_k < by_default.recall_at_k - 0.1  # the norms it drops dominate ip
    info, codec = fitted["pca128,int8"]
    assert client.evaluate(info.id, scaled, queries).metric == "ip"
    cosine = client.evaluate(info.id, scaled, queries, metric="cos")
    assert cosine.metric == "cos"
    assert cosine.recall_at_k == pytest.approx(library(codec, "cos"), abs=1e-12)
    with pytest.raises(embcomp.InputError, match="metric must be 'ip', 'l2' or 'cos'"):
        client.evaluate(info.id, scaled, queries, metric="cosine")
    with pytest.raises(embcomp.InputError, match="metric must be 'ip' or 'l2'"):
        client.project_queries(info.id, queries, metric="cos")


def test_get_list_delete(client, sample):
    base, _ = sample
    info = client.fit("int4", base[:300])
    assert client.get(info.id) == info
    assert info.id in {i.id for i in client.list()}
    again = client.fit("int4", base[:300])  # identical fit: same content address, same entry
    assert again == info
    client.delete(info.id)
    assert info.id not in {i.id for i in client.list()}


def test_list_pages_cover_every_codec_once(client, stub, fitted):
    ids = []
    token = ""
    while True:
        reply = stub.ListCodecs(pb.ListCodecsRequest(page_size=2, page_token=token))
        assert len(reply.codecs) <= 2
        ids.extend(c.id for c in reply.codecs)
        token = reply.next_page_token
        if not token:
            break
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert {info.id for info, _ in fitted.values()} <= set(ids)
    assert ids == [i.id for i in client.list()]


def test_cli_fitted_codec_imports_and_exports(client, tmp_path, sample):
    base, queries = sample
    np.save(tmp_path / "train.npy", base[:1000])
    path = tmp_path / "cli.codec"
    assert (
        cli_main(
            ["fit", "--spec", "pca64,fp8", "--train", str(tmp_path / "train.npy"), "-o", str(path)]
        )
        == 0
    )
    info = client.import_codec(path)
    offline = embcomp.load_codec(path)
    assert info.id == codec_id(offline) and info.spec == "pca64,fp8"
    np.testing.assert_array_equal(client.encode(info.id, queries), offline.encode(queries))
    assert client.export_codec(info.id) == path.read_bytes()
    assert client.import_codec(path.read_bytes()) == info  # idempotent
    exported = tmp_path / "exported.codec"
    exported.write_bytes(client.export_codec(info.id))
    assert (
        cli_main(
            ["encode", "-c", str(exported), str(tmp_path / "train.npy"), str(tmp_path / "c.npy")]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), client.encode(info.id, base[:1000]))


def test_request_id_is_echoed(fitted, stub, sample):
    info, _ = fitted["fp8"]
    matrix = types_pb2.Matrix(
        rows=1, cols=384, dtype=types_pb2.DTYPE_FLOAT32, data=sample[0][:1].tobytes()
    )
    _, call = stub.Encode.with_call(
        pb.EncodeRequest(codec_id=info.id, vectors=matrix),
        metadata=(("x-request-id", "trace-42"),),
    )
    assert ("x-request-id", "trace-42") in tuple(call.trailing_metadata())


def test_sixteen_threads_encode_at_once(fitted, server, sample):
    base, _ = sample
    infos = [fitted[s] for s in ("fp8", "pca128,int8", "rot,int4", "l2norm,pca64,bin")]
    start = threading.Barrier(16)
    results: dict[int, bool] = {}

    def work(index: int) -> None:
        info, codec = infos[index % len(infos)]
        rows = base[index * 150 : index * 150 + 300]
        with CompressionClient(f"127.0.0.1:{server.port}") as own:
            start.wait()
            ok = True
            for _ in range(5):
                codes = own.encode(info.id, rows)
                ok &= np.array_equal(codes, codec.encode(rows))
                ok &= np.array_equal(own.decode(info.id, codes), codec.decode(codes))
            results[index] = bool(ok)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(16)}


def test_200k_vectors_round_trip_through_streams(client, sample):
    base, _ = sample
    spec = "int8"  # a cheap codec: the time goes to the transport under test
    info = client.fit(spec, base)
    codec = embcomp.make_codec(spec).fit(base)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200_000, 384), dtype=np.float32)
    X *= 0.05
    codes = client.encode_stream(info.id, X)
    assert codes.shape == (200_000, 384)
    np.testing.assert_array_equal(codes, codec.encode(X))
    decoded = client.decode_stream(info.id, codes)
    np.testing.assert_array_equal(decoded, codec.decode(codes))
    # encode() switches to the stream by itself for arrays over one message.
    np.testing.assert_array_equal(client.encode(info.id, X[:20_000]), codes[:20_000])


def test_health_and_reflection_are_registered(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embcomp.v1.CompressionService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "embcomp.v1.CompressionService" in services
        assert "grpc.health.v1.Health" in services


def test_client_keeps_to_the_servers_row_limit(tmp_path, sample):
    """Narrow vectors reach a row limit long before the byte limit: the client splits by
    rows too, so every call the library can make goes through."""
    from service_helpers import running_server

    base = sample[0]
    with running_server(tmp_path / "s", max_rows_per_request=500) as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}", max_rows_per_message=500) as client:
            info = client.fit("int8", base[:1200])  # no matmul: any grouping, same bytes
            codec = embcomp.make_codec("int8").fit(base[:1200])
            assert info.id == codec_id(codec)
            codes = client.encode(info.id, base[:1200])
            np.testing.assert_array_equal(codes, codec.encode(base[:1200]))
            np.testing.assert_array_equal(client.decode(info.id, codes), codec.decode(codes))


def test_client_empty_and_out_of_range_inputs_behave_like_the_library(fitted, client):
    info, codec = fitted["pca128,int8"]
    empty = np.empty((0, 384), np.float32)
    for encode in (client.encode, client.encode_stream):
        assert encode(info.id, empty).shape == codec.encode(empty).shape == (0, codec.code_size)
    no_codes = np.empty((0, codec.code_size), np.uint8)
    for decode in (client.decode, client.decode_stream):
        assert decode(info.id, no_codes).shape == codec.decode(no_codes).shape == (0, 384)
    huge = np.zeros((3, 384))
    huge[2, 5] = 1e300
    with pytest.raises(embcomp.InputError, match="vectors row 2 holds 1e\\+300, beyond float32"):
        client.encode(info.id, huge)


def test_client_sends_numpy_option_values_as_the_numbers_they_hold(client, sample):
    """Once, seed=np.int64(3) raised a bare TypeError from json.dumps."""
    train = sample[0][:300]
    info = client.fit("rot,int8", train, seed=np.int64(3), percentile=np.float32(99.5))
    assert info.options["seed"] == 3 and info.options["percentile"] == 99.5
    assert info == client.fit("rot,int8", train, seed=3, percentile=99.5)
    with pytest.raises(InputError, match="option seed=.* cannot be sent: object is not a JSON"):
        client.fit("int8", train, seed=object())


def test_client_projects_many_queries_and_refuses_overflow_up_front(fitted, server, sample):
    info, codec = fitted["pca128,int8"]
    queries = np.tile(sample[1], (3, 1))  # 600 queries in 500-row messages
    target = f"127.0.0.1:{server.port}"
    with CompressionClient(target, max_rows_per_message=500) as small:
        assert_vectors_match(
            codec, small.project_queries(info.id, queries), codec.project_queries(queries)
        )
        assert small.project_queries(info.id, queries[:0]).shape == (0, codec.d_out)
        huge = np.zeros((4, 384))
        huge[3, 0] = 1e300
        with pytest.raises(embcomp.InputError, match="training vectors row 3 holds 1e\\+300"):
            small.fit("int8", huge)
        with pytest.raises(embcomp.InputError, match="vectors row 3 holds 1e\\+300"):
            small.encode_stream(info.id, huge)
