"""``embcomp.v1.CompressionService``: translate messages into library calls.

No math lives here: arrays come from :mod:`.convert`, codecs from :mod:`.store`, the
work from :mod:`embcomp` itself, and every failure goes through the error table by
way of the :mod:`.calls` decorators. A failed call writes nothing: codecs are stored
only after a fit or an import has fully succeeded.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

from .._cancel import cancel_when
from .._validation import check_finite, check_matrix
from ..artifacts import codec_from_bytes
from ..codec import Codec, make_codec
from ..evaluation import exact_knn, recall_at_k
from ..exceptions import ArtifactError, EmbcompError, InputError
from ..v1 import compression_service_pb2 as pb
from ..v1 import compression_service_pb2_grpc as pb_grpc
from ..v1 import types_pb2
from .calls import CallSlots, bidi_stream, client_stream, unary
from .config import ENVELOPE_BYTES, ServiceConfig
from .convert import array_to_codes, array_to_matrix, codes_to_array, matrix_to_array
from .errors import CallEndedError, LimitExceededError
from .metrics import ServiceMetrics
from .store import CodecStore, StoredCodec, check_codec_id

__all__ = ["CompressionServicer", "codec_info_message", "parse_options"]

_METRICS: dict[int, str] = {
    types_pb2.METRIC_INNER_PRODUCT: "ip",
    types_pb2.METRIC_L2: "l2",
    types_pb2.METRIC_COSINE: "cos",
}
_METRIC_ENUMS = {name: types_pb2.Metric.Name(value) for value, name in _METRICS.items()}
_DEFAULT_PAGE, _MAX_PAGE = 100, 1000
# EvaluateCodec's cost of one neighbour kept per query, in scored pairs: measured
# (384-d, 1 thread) at ~1 us per neighbour against ~0.03 us per pair.
_PAIRS_PER_NEIGHBOUR = 32


def parse_options(raw: dict[str, str]) -> dict[str, Any]:
    """Option values are JSON text; a value that is not JSON is a plain string (as the CLI)."""
    options: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def codec_info_message(meta: StoredCodec) -> types_pb2.CodecInfo:
    info = types_pb2.CodecInfo(
        id=meta.id,
        spec=meta.spec,
        d_in=meta.d_in,
        d_out=meta.d_out,
        code_size=meta.code_size,
        options={k: json.dumps(v, sort_keys=True) for k, v in meta.options.items()},
        compression_ratio=meta.compression_ratio,
        artifact_size=meta.artifact_size,
        sha256=meta.sha256,
    )
    info.created.FromDatetime(meta.created)
    return info


@contextlib.contextmanager
def _in_stream_message(index: int, offset: int) -> Iterator[None]:
    """Prefix errors with where in the stream they happened (rows count from 0)."""
    try:
        yield
    except EmbcompError as exc:
        raise type(exc)(f"stream message {index} (first row {offset}): {exc}") from exc


@contextlib.contextmanager
def _named(field: str) -> Iterator[None]:
    """Errors about the library's ``X`` name the request field instead."""
    try:
        yield
    except InputError as exc:
        if str(exc).startswith("X "):
            raise type(exc)(f"{field}{str(exc)[1:]}") from exc
        raise


def _check_active(context: Any, during: str) -> None:
    """Stop a call whose client cancelled or whose deadline passed (gRPC may end such a
    client stream as if it were complete: what arrived must not be used)."""
    if not context.is_active():
        raise CallEndedError(f"the call was cancelled or timed out during {during}")


class _UploadBytes:
    """Bytes of training data held by uploads in progress, capped at ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise LimitExceededError(
                    f"uploads in progress already hold {self.used} of this server's "
                    f"{self.limit} bytes for training data; retry later (the limit is "
                    "EMBCOMP_MAX_CONCURRENT_FITS x EMBCOMP_MAX_FIT_BYTES)"
                )
            self.used += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used -= n


def _fit_footprint(codec: Codec, d_in: int) -> tuple[int, int]:
    """What fitting ``codec`` on ``d_in``-wide vectors costs whatever the rows, in bytes:
    ``(artifact, matrix)``.

    ``artifact`` is a lower bound on the artifact's size: a reducer stores its float32
    (d_out, d_in) forward matrix, its inverse too unless that is the same matrix (``rot``
    and ``pca`` without whitening; see :mod:`embcomp.artifacts`), and its float32 mean;
    a quantizer at least one float32 per dimension. ``matrix`` is the float64
    (d_in, d_in) matrix the fit builds: the covariance of ``pca`` (whatever its d_out)
    and of ``mpad`` started from PCA, the random draw of ``rot``; 0 for other specs.
    """
    reducer, d_out = codec.reducer, min(codec.spec.d_out(d_in), d_in)
    artifact = 4 * d_out
    if reducer is not None:
        matrices = 1 if reducer.has_orthonormal_rows else 2
        artifact += matrices * 4 * d_out * d_in + 4 * d_in
    name = codec.spec.reducer.name if codec.spec.reducer is not None else None
    square = name in ("pca", "rot") or (name is not None and codec.options.get("init") == "pca")
    return artifact, 8 * d_in * d_in if square else 0


def _metric(value: int, *, unset: str = "ip") -> str:
    """The library's name of a Metric enum value; ``unset`` for METRIC_UNSPECIFIED."""
    if value == types_pb2.METRIC_UNSPECIFIED:
        return unset
    try:
        return _METRICS[value]
    except KeyError:
        raise InputError(
            f"metric must be METRIC_INNER_PRODUCT, METRIC_L2 or METRIC_COSINE; got enum "
            f"value {value}"
        ) from None


class CompressionServicer(pb_grpc.CompressionServiceServicer):
    """The service's RPCs over one :class:`CodecStore`.

    Parameters
    ----------
    store : where codecs live.
    config : limits (rows per request, message size, fit size and concurrency).
    metrics : where the RPC wrappers record requests, errors, latency and bytes.
    """

    def __init__(self, store: CodecStore, config: ServiceConfig, metrics: ServiceMetrics):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.call_slots = CallSlots(config.max_workers)  # taken by the .calls decorators
        self._fit_slots = threading.BoundedSemaphore(config.max_concurrent_fits)
        self._uploads = _UploadBytes(config.max_concurrent_fits * config.max_fit_bytes)

    # -- helpers ----------------------------------------------------------------------
    def _vectors(self, matrix: types_pb2.Matrix, name: str) -> np.ndarray:
        return matrix_to_array(matrix, name=name, max_rows=self.config.max_rows_per_request)

    def _codes(self, codes: types_pb2.Codes, name: str = "codes") -> np.ndarray:
        return codes_to_array(codes, name=name, max_rows=self.config.max_rows_per_request)

    def _vectors_for(self, codec: Codec, matrix: types_pb2.Matrix, name: str) -> np.ndarray:
        """The matrix as an array, checked against the codec's input width."""
        return check_matrix(self._vectors(matrix, name), name=name, d=codec._check_fitted())

    def _check_response_size(self, rows: int, bytes_per_row: int) -> None:
        size = rows * bytes_per_row + ENVELOPE_BYTES
        if size > self.config.max_message_bytes:
            raise LimitExceededError(
                f"the response would be {size} bytes, over this server's message limit of "
                f"{self.config.max_message_bytes}; send at most "
                f"{(self.config.max_message_bytes - ENVELOPE_BYTES) // bytes_per_row} rows "
                "per request"
            )

    def _stream_codec_id(self, sent: str, current: str | None, rpc: str) -> str:
        if current is None:
            if not sent:
                raise InputError(f"the first {rpc} message must set codec_id")
            return check_codec_id(sent)
        if sent and sent != current:
            raise InputError(
                f"{rpc} messages must all use codec {current}; a later one named {sent!r}"
            )
        return current

    # -- fitting ----------------------------------------------------------------------
    @client_stream("FitCodec")
    def FitCodec(self, request_iterator: Iterator[pb.FitCodecRequest], context: Any) -> Any:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InputError(
                "the first FitCodec message must be a header with the spec, e.g. "
                "FitCodecHeader(spec='pca256,fp8'); training chunks follow it"
            )
        options = parse_options(dict(first.header.options))
        codec = make_codec(first.header.spec, **options)  # checks the options' types too
        self._take_fit_slot()  # refuse before the upload when fits are running already
        self._fit_slots.release()
        held = [0]  # upload bytes taken from self._uploads
        try:
            train = self._read_training_chunks(request_iterator, held, codec)
            _check_active(context, "the upload")
            declared = first.header.rows
            if declared and train.shape[0] != declared:
                arrived = train.shape[0]
                message = f"the header declared {declared} training rows but {arrived} arrived"
                # gRPC may end a stream cut by its deadline as if it were complete; a
                # client still waiting, within its deadline, sent the wrong rows
                remaining = context.time_remaining()
                if not context.is_active() or (remaining is not None and remaining <= 0):
                    raise CallEndedError(f"{message}: the upload was cut short; nothing stored")
                raise InputError(
                    f"{message}; send exactly the rows it declares (or rows=0 for any "
                    "number); nothing stored"
                )
            self._take_fit_slot()  # a stalled upload holds no slot: taken now
            try:
                self.metrics.fits_running.inc()
                # the fit's long loops stop at their next step once the call has ended
                with cancel_when(partial(_check_active, context, "the fit")):
                    codec.fit(train)
                del train
                _check_active(context, "the fit")
                meta = self.store.put(codec)
            finally:
                self.metrics.fits_running.dec()
                self._fit_slots.release()
        finally:
            self._uploads.give_back(held[0])
            self.metrics.fit_upload_bytes.dec(held[0])
        return pb.FitCodecResponse(codec=codec_info_message(meta))

    def _check_width(self, d_in: int, what: str) -> None:
        if d_in > self.config.max_dims:
            raise LimitExceededError(
                f"{what} {d_in}-dim vectors, over this server's limit of "
                f"{self.config.max_dims} dims (the limit is EMBCOMP_MAX_DIMS)"
            )

    def _check_fit_width(self, codec: Codec, d_in: int) -> None:
        """Refuse a fit whose width alone makes it too big, before any work is done."""
        self._check_width(d_in, "the training chunks hold")
        artifact, matrix = _fit_footprint(codec, d_in)
        if matrix > self.config.max_fit_bytes:
            raise LimitExceededError(
                f"fitting {codec.spec} on {d_in}-dim vectors builds a {d_in} x {d_in} float64 "
                f"matrix ({matrix} bytes), over this server's limit of "
                f"{self.config.max_fit_bytes} bytes per fit (EMBCOMP_MAX_FIT_BYTES); reduce "
                "the width first or use a spec without pca/rot"
            )
        if artifact > self.config.max_fit_bytes:
            raise LimitExceededError(
                f"a {codec.spec} codec for {d_in}-dim vectors would be at least {artifact} "
                f"bytes, over this server's limit of {self.config.max_fit_bytes} bytes per fit "
                "(EMBCOMP_MAX_FIT_BYTES); use fewer dims or a smaller reducer"
            )

    def _take_fit_slot(self) -> None:
        if not self._fit_slots.acquire(blocking=False):
            raise LimitExceededError(
                f"{self.config.max_concurrent_fits} fits are already running on this server; "
                "retry later (the limit is EMBCOMP_MAX_CONCURRENT_FITS)"
            )

    def _read_training_chunks(
        self, requests: Iterator[pb.FitCodecRequest], held: list[int], codec: Codec
    ) -> np.ndarray:
        """The training chunks for ``codec`` as one array; ``held[0]`` counts the bytes
        taken from the upload budget (the caller gives them back)."""
        chunks: list[np.ndarray] = []
        float32_bytes = 0
        for index, message in enumerate(requests, start=1):
            if message.WhichOneof("part") != "chunk":
                raise InputError(
                    f"FitCodec message {index} is not a training chunk: only the first "
                    "message may be a header"
                )
            chunk = self._vectors(message.chunk, f"training chunk {index}")
            if not chunks:  # the width is known: refuse what it makes too big, before the work
                self._check_fit_width(codec, chunk.shape[1])
            elif chunk.shape[1] != chunks[0].shape[1]:
                raise InputError(
                    f"training chunk {index} has {chunk.shape[1]} cols but earlier chunks "
                    f"have {chunks[0].shape[1]}; every chunk must have the same width"
                )
            float32_bytes += 4 * chunk.size
            if float32_bytes > self.config.max_fit_bytes:
                raise LimitExceededError(
                    f"training data exceeds this server's limit of {self.config.max_fit_bytes} "
                    "float32 bytes per fit; fit on a random sample (the limit is "
                    "EMBCOMP_MAX_FIT_BYTES)"
                )
            self._uploads.take(chunk.nbytes)
            held[0] += chunk.nbytes
            self.metrics.fit_upload_bytes.inc(chunk.nbytes)
            chunks.append(chunk)
        if not chunks:
            raise InputError("FitCodec got a header but no training vectors; send chunks")
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks, axis=0, dtype=np.float32)

    # -- encode / decode / project ----------------------------------------------------
    @unary("Encode")
    def Encode(self, request: pb.EncodeRequest, context: Any) -> pb.EncodeResponse:
        codec = self.store.get(check_codec_id(request.codec_id))
        vectors = self._vectors_for(codec, request.vectors, "vectors")
        self._check_response_size(vectors.shape[0], codec.code_size)
        response = pb.EncodeResponse()
        with _named("vectors"):
            array_to_codes(codec.encode(vectors), out=response.codes)
        return response

    @unary("Decode")
    def Decode(self, request: pb.DecodeRequest, context: Any) -> pb.DecodeResponse:
        codec = self.store.get(check_codec_id(request.codec_id))
        codes = self._codes(request.codes)
        width = codec.d_out if request.reduced else codec._check_fitted()
        self._check_response_size(codes.shape[0], 4 * width)
        response = pb.DecodeResponse()
        array_to_matrix(codec.decode(codes, reduced=request.reduced), out=response.vectors)
        return response

    @unary("ProjectQueries")
    def ProjectQueries(
        self, request: pb.ProjectQueriesRequest, context: Any
    ) -> pb.ProjectQueriesResponse:
        codec = self.store.get(check_codec_id(request.codec_id))
        queries = self._vectors_for(codec, request.queries, "queries")
        metric = _metric(request.metric)
        if metric == "cos":
            raise InputError(
                "ProjectQueries maps queries for METRIC_INNER_PRODUCT or METRIC_L2 search, "
                "not METRIC_COSINE: for cosine, normalize the queries and search a codec "
                "whose spec starts with l2norm by inner product"
            )
        self._check_response_size(queries.shape[0], 4 * codec.d_out)
        response = pb.ProjectQueriesResponse()
        with _named("queries"):
            projected = codec.project_queries(queries, metric=metric)
        array_to_matrix(projected, out=response.queries)
        return response

    @bidi_stream("EncodeStream")
    def EncodeStream(
        self, request_iterator: Iterator[pb.EncodeStreamRequest], context: Any
    ) -> Iterator[pb.EncodeStreamResponse]:
        codec_id: str | None = None
        codec = None
        offset = 0
        for index, request in enumerate(request_iterator):
            codec_id = self._stream_codec_id(request.codec_id, codec_id, "EncodeStream")
            if codec is None:
                codec = self.store.get(codec_id)
            with _in_stream_message(index, offset):
                vectors = self._vectors_for(codec, request.vectors, "vectors")
                self._check_response_size(vectors.shape[0], codec.code_size)
                response = pb.EncodeStreamResponse(row_offset=offset)
                with _named("vectors"):
                    array_to_codes(codec.encode(vectors), out=response.codes)
            yield response
            offset += vectors.shape[0]

    @bidi_stream("DecodeStream")
    def DecodeStream(
        self, request_iterator: Iterator[pb.DecodeStreamRequest], context: Any
    ) -> Iterator[pb.DecodeStreamResponse]:
        codec_id: str | None = None
        codec = None
        reduced: bool | None = None
        offset = 0
        for index, request in enumerate(request_iterator):
            codec_id = self._stream_codec_id(request.codec_id, codec_id, "DecodeStream")
            if codec is None:
                codec = self.store.get(codec_id)
                reduced = request.reduced
            elif request.reduced != reduced:
                raise InputError(f"DecodeStream message {index} changed 'reduced' mid-stream")
            with _in_stream_message(index, offset):
                codes = self._codes(request.codes)
                width = codec.d_out if reduced else codec._check_fitted()
                self._check_response_size(codes.shape[0], 4 * width)
                response = pb.DecodeStreamResponse(row_offset=offset)
                array_to_matrix(codec.decode(codes, reduced=bool(reduced)), out=response.vectors)
            yield response
            offset += codes.shape[0]

    # -- the store --------------------------------------------------------------------
    @unary("GetCodec")
    def GetCodec(self, request: pb.GetCodecRequest, context: Any) -> pb.GetCodecResponse:
        meta = self.store.info(check_codec_id(request.codec_id))
        return pb.GetCodecResponse(codec=codec_info_message(meta))

    @unary("ListCodecs")
    def ListCodecs(self, request: pb.ListCodecsRequest, context: Any) -> pb.ListCodecsResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        ids = self.store.ids()
        if request.page_token:
            try:
                after = check_codec_id(request.page_token)
            except InputError:
                raise InputError(
                    f"page_token {request.page_token!r} is not one this server returned: "
                    "pass next_page_token from the previous ListCodecs response"
                ) from None
            ids = [codec_id for codec_id in ids if codec_id > after]
        page, rest = ids[:size], ids[size:]
        infos = []
        for codec_id in page:
            try:
                infos.append(codec_info_message(self.store.info(codec_id)))
            except LookupError:  # deleted while we listed
                continue
        return pb.ListCodecsResponse(codecs=infos, next_page_token=page[-1] if rest else "")

    @unary("DeleteCodec")
    def DeleteCodec(self, request: pb.DeleteCodecRequest, context: Any) -> pb.DeleteCodecResponse:
        self.store.delete(check_codec_id(request.codec_id))
        return pb.DeleteCodecResponse()

    @unary("ImportCodec")
    def ImportCodec(self, request: pb.ImportCodecRequest, context: Any) -> pb.ImportCodecResponse:
        if not request.artifact:
            raise InputError("ImportCodec got no artifact bytes")
        try:
            codec = codec_from_bytes(request.artifact, source="uploaded artifact")
        except ArtifactError as exc:  # a bad upload is the caller's argument, not our state
            raise InputError(str(exc)) from exc
        self._check_width(codec._check_fitted(), "the artifact's codec takes")
        meta = self.store.put_loaded(request.artifact, codec)
        return pb.ImportCodecResponse(codec=codec_info_message(meta))

    @unary("ExportCodec")
    def ExportCodec(self, request: pb.ExportCodecRequest, context: Any) -> pb.ExportCodecResponse:
        codec_id = check_codec_id(request.codec_id)
        blob = self.store.read_bytes(codec_id)
        if len(blob) + ENVELOPE_BYTES > self.config.max_message_bytes:
            raise LimitExceededError(
                f"codec {codec_id}'s artifact is {len(blob)} bytes, over this server's message "
                f"limit of {self.config.max_message_bytes}; raise EMBCOMP_MAX_MESSAGE_BYTES "
                "(on the client too) or copy the file from the store directory"
            )
        meta = self.store.info(codec_id)
        return pb.ExportCodecResponse(artifact=blob, codec=codec_info_message(meta))

    # -- evaluation -------------------------------------------------------------------
    def _evaluation_k(self, k: int, base_rows: int, query_rows: int) -> int:
        """The k to evaluate at (capped at the base rows), after checking the limits.

        The two searches score base x queries pairs; the neighbour lists and the recall
        count hold queries x k entries, each costing about as much as
        ``_PAIRS_PER_NEIGHBOUR`` scored pairs (it is gathered, re-scored for ties and
        de-duplicated), so ``max_eval_pairs`` bounds their sum.
        """
        k = min(k, base_rows)  # first: a k over the base rows runs at the base rows
        if k > self.config.max_eval_k:
            raise InputError(
                f"k={k} is over this server's limit of {self.config.max_eval_k} neighbours "
                "per query; ask for a smaller k (the limit is EMBCOMP_MAX_EVAL_K)"
            )
        work = query_rows * (base_rows + _PAIRS_PER_NEIGHBOUR * k)
        if work > self.config.max_eval_pairs:
            raise LimitExceededError(
                f"{query_rows} queries x ({base_rows} base rows + {_PAIRS_PER_NEIGHBOUR} x "
                f"k={k}) = {work} pairs' worth of work, over this server's limit of "
                f"{self.config.max_eval_pairs}; send fewer queries or base rows, or a smaller "
                "k (the limit is EMBCOMP_MAX_EVAL_PAIRS)"
            )
        return k

    @unary("EvaluateCodec")
    def EvaluateCodec(
        self, request: pb.EvaluateCodecRequest, context: Any
    ) -> pb.EvaluateCodecResponse:
        codec = self.store.get(check_codec_id(request.codec_id))
        base = self._vectors(request.base, "base")
        queries = self._vectors(request.queries, "queries")
        # A codec that normalizes is for cosine search: judged by cosine unless told.
        metric = _metric(request.metric, unset="cos" if codec.spec.normalize else "ip")
        k = self._evaluation_k(request.k or 10, base.shape[0], queries.shape[0])
        check_matrix(base, name="base", d=codec._check_fitted())
        check_finite(base, name="base")
        check_matrix(queries, name="queries", d=codec._check_fitted())
        check_finite(queries, name="queries")
        try:
            with _named("base"):
                decoded = codec.decode(codec.encode(base))
            with cancel_when(partial(_check_active, context, "the evaluation")):
                true_ids, _ = exact_knn(base, queries, k, metric=metric)
                found_ids, _ = exact_knn(decoded, queries, k, metric=metric)
            recall = recall_at_k(found_ids, true_ids, k, base=base, queries=queries, metric=metric)
        except MemoryError:
            raise LimitExceededError(
                f"the server ran out of memory evaluating {queries.shape[0]} queries against "
                f"{base.shape[0]} base rows at k={k}; send fewer queries or base rows, or a "
                "smaller k"
            ) from None
        return pb.EvaluateCodecResponse(
            recall_at_k=recall,
            k=k,
            bytes_per_vector=codec.code_size,
            compression_ratio=codec.compression_ratio,
            base_rows=base.shape[0],
            query_rows=queries.shape[0],
            metric=_METRIC_ENUMS[metric],
        )
