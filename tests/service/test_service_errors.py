"""Every bad input gets its status code and a message naming the problem; the store is
unchanged after each failure (checked file by file)."""

from __future__ import annotations

import pickle
import shutil

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from service_helpers import running_server, store_snapshot
from test_artifacts import rewrite_manifest

import embcomp
from embcomp.client import CompressionClient, ServiceError
from embcomp.v1 import compression_service_pb2 as pb
from embcomp.v1 import types_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MISSING_ID = "0123456789abcdef01234567"


def matrix(X, dtype=types_pb2.DTYPE_FLOAT32, **overrides):
    X = np.asarray(X)
    fields = {"rows": X.shape[0], "cols": X.shape[1], "dtype": dtype, "data": X.tobytes()}
    fields.update(overrides)
    return types_pb2.Matrix(**fields)


def codes_message(codes, **overrides):
    fields = {"rows": codes.shape[0], "code_size": codes.shape[1], "data": codes.tobytes()}
    fields.update(overrides)
    return types_pb2.Codes(**fields)


def fit_messages(spec, *chunks, options=None):
    yield pb.FitCodecRequest(header=pb.FitCodecHeader(spec=spec, options=options or {}))
    for chunk in chunks:
        yield pb.FitCodecRequest(chunk=chunk)


def expect(code, call, *args, match):
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args)
        if not isinstance(result, Message):
            list(result)  # drain a response stream so its error surfaces
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details()
    assert match in details
    assert "Traceback" not in details
    return details


@pytest.fixture(scope="module")
def codec_id(client, sample):
    return client.fit("pca64,int8", sample[0][:1000]).id


@pytest.fixture(autouse=True)
def store_is_unchanged(server, codec_id):
    before = store_snapshot(server.store.root)
    yield
    assert store_snapshot(server.store.root) == before


@pytest.fixture()
def rows(sample):
    return sample[0][:8].copy()


# -- FitCodec ------------------------------------------------------------------------------
def test_fit_bad_spec(stub, rows):
    details = expect(INVALID, stub.FitCodec, fit_messages("pca64,nope", matrix(rows)), match="nope")
    assert "valid names" in details


def test_fit_unknown_option(stub, rows):
    messages = fit_messages("int8", matrix(rows), options={"bogus": "1"})
    expect(INVALID, stub.FitCodec, messages, match="unknown option")


@pytest.mark.parametrize(
    "spec,options,expected",
    [
        ("int8", {"percentile": '"abc"'}, "percentile='abc'"),
        ("pca8,int8", {"whiten": '"yes"'}, "whiten='yes'"),
        ("fp8", {"scale": '"nope"'}, "scale='nope'"),
        ("int8", {"seed": '"x"'}, "seed='x'"),
        ("int4", {"percentile": "[99, 100]"}, "percentile=[99, 100]"),
    ],
)
def test_fit_option_of_the_wrong_type(stub, rows, spec, options, expected):
    messages = fit_messages(spec, matrix(rows), options=options)
    details = expect(INVALID, stub.FitCodec, messages, match=expected)
    assert "wrong type" in details


@pytest.mark.parametrize(
    "spec,options,expected",
    [
        ("rot,int8", {"seed": "-1"}, "seed must be an integer >= 0"),
        ("alloc4", {"vq_below": "NaN"}, "vq_below=nan must be a plain JSON value"),
        ("alloc4", {"vq_below": "Infinity"}, "vq_below=inf must be a plain JSON value"),
    ],
)
def test_fit_option_of_a_bad_value(stub, rows, spec, options, expected):
    messages = fit_messages(spec, matrix(rows), options=options)
    expect(INVALID, stub.FitCodec, messages, match=expected)


def test_fit_reducer_wider_than_data(stub, rows):
    expect(INVALID, stub.FitCodec, fit_messages("pca500,int8", matrix(rows)), match="pca384")


def test_fit_without_header(stub, rows):
    messages = iter([pb.FitCodecRequest(chunk=matrix(rows))])
    expect(INVALID, stub.FitCodec, messages, match="first FitCodec message must be a header")


def test_fit_empty_stream(stub):
    expect(INVALID, stub.FitCodec, iter([]), match="header")


def test_fit_header_only(stub):
    expect(INVALID, stub.FitCodec, fit_messages("int8"), match="no training vectors")


def test_fit_second_header(stub, rows):
    def messages():
        yield from fit_messages("int8", matrix(rows))
        yield pb.FitCodecRequest(header=pb.FitCodecHeader(spec="fp8"))

    expect(INVALID, stub.FitCodec, messages(), match="only the first")


def test_fit_chunks_of_different_widths(stub, rows):
    messages = fit_messages("int8", matrix(rows), matrix(rows[:, :100]))
    expect(INVALID, stub.FitCodec, messages, match="same width")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_non_finite(stub, rows, bad):
    rows[3, 7] = bad
    expect(INVALID, stub.FitCodec, fit_messages("int8", matrix(rows)), match="NaN or inf")


# -- vectors in ----------------------------------------------------------------------------
def test_encode_wrong_dims(stub, codec_id, rows):
    request = pb.EncodeRequest(codec_id=codec_id, vectors=matrix(rows[:, :100]))
    expect(INVALID, stub.Encode, request, match="vectors has 100 dims")


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_encode_non_finite(stub, codec_id, rows, bad):
    rows[5, 0] = bad
    request = pb.EncodeRequest(codec_id=codec_id, vectors=matrix(rows))
    expect(INVALID, stub.Encode, request, match="vectors row 5 contains NaN or inf")


def test_encode_empty(stub, codec_id):
    request = pb.EncodeRequest(
        codec_id=codec_id, vectors=types_pb2.Matrix(rows=0, cols=384, dtype=1)
    )
    expect(INVALID, stub.Encode, request, match="empty")


@pytest.mark.parametrize("dtype", [types_pb2.DTYPE_UNSPECIFIED, 7])
def test_encode_bad_dtype(stub, codec_id, rows, dtype):
    request = pb.EncodeRequest(codec_id=codec_id, vectors=matrix(rows, dtype=dtype))
    expect(INVALID, stub.Encode, request, match="DTYPE_FLOAT32 or DTYPE_FLOAT16")


def test_encode_data_length_mismatch(stub, codec_id, rows):
    request = pb.EncodeRequest(codec_id=codec_id, vectors=matrix(rows, rows=9))
    expect(INVALID, stub.Encode, request, match="data bytes")
    request = pb.EncodeRequest(codec_id=codec_id, vectors=matrix(rows, dtype=2))  # f32 as f16
    expect(INVALID, stub.Encode, request, match="data bytes")


def test_unknown_codec_is_not_found(stub, rows):
    vectors = matrix(rows)
    cases = [
        (stub.Encode, pb.EncodeRequest(codec_id=MISSING_ID, vectors=vectors)),
        (
            stub.Decode,
            pb.DecodeRequest(codec_id=MISSING_ID, codes=codes_message(np.zeros((1, 4), np.uint8))),
        ),
        (stub.ProjectQueries, pb.ProjectQueriesRequest(codec_id=MISSING_ID, queries=vectors)),
        (stub.GetCodec, pb.GetCodecRequest(codec_id=MISSING_ID)),
        (stub.DeleteCodec, pb.DeleteCodecRequest(codec_id=MISSING_ID)),
        (stub.ExportCodec, pb.ExportCodecRequest(codec_id=MISSING_ID)),
        (
            stub.EvaluateCodec,
            pb.EvaluateCodecRequest(codec_id=MISSING_ID, base=vectors, queries=vectors),
        ),
    ]
    for call, request in cases:
        expect(NOT_FOUND, call, request, match=MISSING_ID)
    stream = iter([pb.EncodeStreamRequest(codec_id=MISSING_ID, vectors=vectors)])
    expect(NOT_FOUND, stub.EncodeStream, stream, match=MISSING_ID)


@pytest.mark.parametrize("bad_id", ["", "../../etc/passwd", "ABCDEF0123456789ABCDEF01", "abc"])
def test_malformed_codec_id(stub, rows, bad_id):
    request = pb.EncodeRequest(codec_id=bad_id, vectors=matrix(rows))
    expect(INVALID, stub.Encode, request, match="24 lowercase hex digits")


def test_decode_wrong_code_size(stub, codec_id):
    codes = np.zeros((3, 65), dtype=np.uint8)
    request = pb.DecodeRequest(codec_id=codec_id, codes=codes_message(codes))
    expect(INVALID, stub.Decode, request, match="code_size is 64")


def test_decode_bad_codes(stub, codec_id):
    codes = np.zeros((3, 64), dtype=np.uint8)
    short = pb.DecodeRequest(codec_id=codec_id, codes=codes_message(codes, rows=4))
    expect(INVALID, stub.Decode, short, match="data bytes")
    empty = pb.DecodeRequest(codec_id=codec_id, codes=types_pb2.Codes(rows=0, code_size=64))
    expect(INVALID, stub.Decode, empty, match="empty")


def test_project_queries_bad_input(stub, codec_id, rows):
    wrong = pb.ProjectQueriesRequest(codec_id=codec_id, queries=matrix(rows[:, :10]))
    expect(INVALID, stub.ProjectQueries, wrong, match="10 dims")
    metric = pb.ProjectQueriesRequest(codec_id=codec_id, queries=matrix(rows), metric=9)
    expect(INVALID, stub.ProjectQueries, metric, match="metric")
    cosine = pb.ProjectQueriesRequest(
        codec_id=codec_id, queries=matrix(rows), metric=types_pb2.METRIC_COSINE
    )
    expect(INVALID, stub.ProjectQueries, cosine, match="not METRIC_COSINE: for cosine, normalize")
    rows[0, 0] = np.nan
    nan = pb.ProjectQueriesRequest(codec_id=codec_id, queries=matrix(rows))
    expect(INVALID, stub.ProjectQueries, nan, match="NaN")


def test_evaluate_bad_queries(stub, codec_id, rows):
    wrong = pb.EvaluateCodecRequest(
        codec_id=codec_id, base=matrix(rows), queries=matrix(rows[:, :9])
    )
    expect(INVALID, stub.EvaluateCodec, wrong, match="9 dims")
    rows[1, 1] = np.inf
    nan = pb.EvaluateCodecRequest(codec_id=codec_id, base=matrix(rows[2:]), queries=matrix(rows))
    expect(INVALID, stub.EvaluateCodec, nan, match="NaN or inf")


# -- streams -------------------------------------------------------------------------------
def test_stream_needs_codec_id_first(stub, rows):
    stream = iter([pb.EncodeStreamRequest(vectors=matrix(rows))])
    expect(INVALID, stub.EncodeStream, stream, match="must set codec_id")


def test_stream_cannot_switch_codec(stub, codec_id, client, sample, rows):
    other = client.fit("fp16", sample[0][:50]).id
    try:
        stream = iter(
            [
                pb.EncodeStreamRequest(codec_id=codec_id, vectors=matrix(rows)),
                pb.EncodeStreamRequest(codec_id=other, vectors=matrix(rows)),
            ]
        )
        expect(INVALID, stub.EncodeStream, stream, match="must all use codec")
    finally:
        client.delete(other)


def test_stream_error_after_good_messages(stub, codec_id, rows):
    good = pb.EncodeStreamRequest(codec_id=codec_id, vectors=matrix(rows))
    bad = pb.EncodeStreamRequest(vectors=matrix(rows[:, :3]))
    replies = stub.EncodeStream(iter([good, good, bad]))
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for reply in replies:
            received.append(reply.row_offset)
    assert caught.value.code() == INVALID
    assert caught.value.details() == (
        "stream message 2 (first row 16): vectors has 3 dims but the codec was fitted on "
        "384-dim vectors"
    )
    assert received == [0, 8]


def test_decode_stream_cannot_switch_reduced(stub, codec_id):
    codes = codes_message(np.zeros((2, 64), dtype=np.uint8))
    stream = iter(
        [
            pb.DecodeStreamRequest(codec_id=codec_id, codes=codes),
            pb.DecodeStreamRequest(codes=codes, reduced=True),
        ]
    )
    expect(INVALID, stub.DecodeStream, stream, match="reduced")


def test_list_bad_page_token(stub):
    request = pb.ListCodecsRequest(page_token="zz")
    expect(INVALID, stub.ListCodecs, request, match="page_token 'zz' is not one this server")


# -- ImportCodec ---------------------------------------------------------------------------
def _artifact(sample):
    return embcomp.codec_to_bytes(embcomp.make_codec("pca16,int8").fit(sample[0][:200]))


def test_import_rejects_bad_artifacts(stub, sample):
    good = _artifact(sample)
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    cases = {
        "no artifact bytes": b"",
        "bad magic": b"not a codec at all, just some bytes" * 3,
        "truncated": good[: len(good) // 2],
        "checksum mismatch": bytes(flipped),
    }
    for match, blob in cases.items():
        expect(INVALID, stub.ImportCodec, pb.ImportCodecRequest(artifact=blob), match=match)
    pickled = pickle.dumps({"spec": "int8", "payload": list(range(40))})
    request = pb.ImportCodecRequest(artifact=pickled)
    expect(INVALID, stub.ImportCodec, request, match="not an embcomp codec file")


def test_import_rejects_arrays_that_do_not_fit_their_widths(stub, sample):
    """Valid checksums, dishonest widths: once, a decode with such a codec read out of
    bounds and took the server down."""
    codec = embcomp.make_codec("int8").fit(sample[0][:200])
    codec.d_in = codec.quantizer.d_ = 4_000_000
    request = pb.ImportCodecRequest(artifact=embcomp.codec_to_bytes(codec))
    expect(INVALID, stub.ImportCodec, request, match="'min_' is float32 (384,)")
    codec.d_in = codec.quantizer.d_ = 384
    codec.d_in = -3
    request = pb.ImportCodecRequest(artifact=embcomp.codec_to_bytes(codec))
    expect(INVALID, stub.ImportCodec, request, match="d_in must be a positive integer")


def test_import_names_a_missing_or_mistyped_manifest_field(stub, sample):
    """Once, a manifest without code_size (checksums recomputed) was INTERNAL."""
    good = _artifact(sample)
    for edit, match in [
        (lambda m: m.pop("code_size"), "manifest has no 'code_size' field"),
        (lambda m: m.pop("d_out"), "manifest has no 'd_out' field"),
        (lambda m: m.update(options=[]), "'options' must be an object"),
        (lambda m: m["arrays"][0].update(name=3), "field 'name' must be a string"),
    ]:
        request = pb.ImportCodecRequest(artifact=rewrite_manifest(good, edit))
        expect(INVALID, stub.ImportCodec, request, match=match)


# -- failures that are the server's state --------------------------------------------------
def test_corrupt_stored_artifact_is_failed_precondition(tmp_path, sample):
    base = sample[0]
    store = tmp_path / "store"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        info = client.fit("pca32,fp8", base[:500])
    artifact = store / f"{info.id}.codec"
    damaged = bytearray(artifact.read_bytes())
    damaged[-5] ^= 0x01
    artifact.write_bytes(bytes(damaged))
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        for call in (
            lambda: client.encode(info.id, base[:3]),
            lambda: client.export_codec(info.id),
        ):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "corrupted" in caught.value.details() and info.id in caught.value.details()
        assert client.get(info.id).spec == "pca32,fp8"  # metadata still readable
        client.delete(info.id)  # and the bad entry can be removed
        assert client.list() == []


def test_unexpected_error_is_internal_without_details(tmp_path, sample, monkeypatch):
    with (
        running_server(tmp_path / "store") as srv,
        CompressionClient(f"127.0.0.1:{srv.port}") as client,
    ):
        info = client.fit("fp16", sample[0][:50])

        def broken(codec_id):
            raise RuntimeError("secret /srv/path exploded")

        monkeypatch.setattr(srv.store, "get", broken)
        with pytest.raises(ServiceError) as caught:
            client.encode(info.id, sample[0][:2])
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "Traceback" not in error.details()
    assert error.request_id and error.request_id in error.details()
    assert isinstance(error, embcomp.EmbcompError) and isinstance(error, grpc.RpcError)


def test_failed_fit_leaves_a_copied_store_byte_identical(tmp_path, server, rows):
    # The autouse fixture checks the shared store; this checks a store with many entries.
    copy = tmp_path / "copy"
    shutil.copytree(server.store.root, copy)
    before = store_snapshot(copy)
    with running_server(copy) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        rows[0, 0] = np.nan
        with pytest.raises(ServiceError):
            client.fit("pca8,int8", rows)
        with pytest.raises(ServiceError):
            client.import_codec(b"EMBCODEC garbage")
    assert store_snapshot(copy) == before


def test_the_client_refuses_a_timeout_grpc_would_turn_into_an_instant_failure(tmp_path):
    """timeout=inf, NaN, 0, -1 or 1e10 s all ended every call at once with
    DEADLINE_EXCEEDED (gRPC's deadline overflows past ~2**63 ns since the epoch)."""
    for bad in (float("inf"), float("nan"), 0.0, -1.0, 1e10):
        with pytest.raises(embcomp.InputError, match=r"timeout must be None .*\(a week\); got"):
            CompressionClient("127.0.0.1:1", timeout=bad)
    with running_server(tmp_path / "s") as srv:
        with CompressionClient(f"127.0.0.1:{srv.port}", timeout=7 * 86400) as client:
            assert client.list() == []
