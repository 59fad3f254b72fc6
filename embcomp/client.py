"""A Python client for the embcomp gRPC service, numpy in and out (needs the ``service`` extra).

>>> from embcomp.client import CompressionClient              # doctest: +SKIP
>>> with CompressionClient("localhost:50051") as client:
...     info = client.fit("pca256,fp8", train)                 # float (n, d) -> CodecInfo
...     codes = client.encode(info.id, X)                      # uint8 (n, info.code_size)
...     approx = client.decode(info.id, codes)                 # float32 (n, info.d_in)

Arrays larger than one message (``message_bytes``, 4 MiB by default) go through the
streaming RPCs in chunks automatically; ``encode_stream``/``decode_stream`` do so
explicitly. Failures raise :class:`ServiceError` (an ``EmbcompError`` and a
``grpc.RpcError``) carrying the status code, the server's message and the request id.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

try:
    import grpc
except ModuleNotFoundError as _missing:  # the core install has no gRPC
    raise ModuleNotFoundError(
        "embcomp.client needs grpcio: pip install 'embcomp[service]'", name=_missing.name
    ) from _missing

from ._blocks import rows_per_block
from ._validation import check_float32_range, check_matrix
from .artifacts import codec_to_bytes
from .codec import Codec
from .exceptions import EmbcompError, InputError
from .service.convert import array_to_codes, array_to_matrix, codes_to_array, matrix_to_array
from .v1 import compression_service_pb2 as pb
from .v1 import compression_service_pb2_grpc as pb_grpc
from .v1 import types_pb2

__all__ = ["CodecInfo", "CompressionClient", "Evaluation", "ServiceError"]

# The longest per-call timeout: a week. gRPC turns a deadline past ~2**63 ns since the
# epoch (a timeout of 1e10 s) into an immediate DEADLINE_EXCEEDED, as it does inf and
# NaN; those are refused instead.
_MAX_TIMEOUT = 7 * 86400.0

MiB = 1 << 20
_METRICS = {"ip": types_pb2.METRIC_INNER_PRODUCT, "l2": types_pb2.METRIC_L2}
_EVALUATION_METRICS = {**_METRICS, "cos": types_pb2.METRIC_COSINE}
_METRIC_NAMES = {value: name for name, value in _EVALUATION_METRICS.items()}


class ServiceError(EmbcompError, grpc.RpcError):
    """An RPC failed. ``code()`` and ``details()`` as on ``grpc.RpcError``.

    Attributes
    ----------
    status : grpc.StatusCode
    message : the server's explanation.
    request_id : the id the server logged the call under (``None`` if it never ran).
    """

    def __init__(self, status: grpc.StatusCode, message: str, request_id: str | None):
        super().__init__(f"{status.name}: {message}" + (f" [{request_id}]" if request_id else ""))
        self.status, self.message, self.request_id = status, message, request_id

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> ServiceError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        request_id = None
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == "x-request-id":
                request_id = value
        return cls(code, details or "", request_id)


@dataclass(frozen=True)
class CodecInfo:
    """A stored codec as the service describes it (see ``embcomp.v1.CodecInfo``)."""

    id: str
    spec: str
    d_in: int
    d_out: int
    code_size: int
    created: datetime
    options: dict[str, Any]
    compression_ratio: float
    artifact_size: int
    sha256: str

    @classmethod
    def from_message(cls, info: types_pb2.CodecInfo) -> CodecInfo:
        return cls(
            id=info.id,
            spec=info.spec,
            d_in=info.d_in,
            d_out=info.d_out,
            code_size=info.code_size,
            created=info.created.ToDatetime(tzinfo=timezone.utc),
            options={key: json.loads(value) for key, value in info.options.items()},
            compression_ratio=info.compression_ratio,
            artifact_size=info.artifact_size,
            sha256=info.sha256,
        )


@dataclass(frozen=True)
class Evaluation:
    """Result of :meth:`CompressionClient.evaluate`."""

    recall_at_k: float
    k: int
    bytes_per_vector: int
    compression_ratio: float
    base_rows: int
    query_rows: int
    # "ip", "l2" or "cos": the metric the server used (None from a server too old to say)
    metric: str | None = None


def _channel_credentials(tls: Any) -> grpc.ChannelCredentials:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is True:
        return grpc.ssl_channel_credentials()  # the system's trusted roots
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    if isinstance(tls, (str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    raise InputError(
        "tls must be None, True (system roots), a PEM root certificate path or bytes, "
        f"or grpc.ChannelCredentials; got {type(tls).__name__}"
    )


def _option_json(name: str, value: Any) -> str:
    """A training option as the JSON text FitCodecHeader carries; numpy scalars and
    arrays count as the Python numbers and lists they hold."""

    def plain(item: Any) -> Any:
        if isinstance(item, (np.generic, np.ndarray)):
            return item.tolist()
        raise TypeError(f"{type(item).__name__} is not a JSON value")

    try:
        return json.dumps(value, default=plain)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"option {name}={value!r} cannot be sent: {exc}; pass numbers, strings, "
            "booleans, None or lists of them"
        ) from None


def _writable(array: np.ndarray) -> np.ndarray:
    return array.copy()  # frombuffer views of response bytes are read-only


class CompressionClient:
    """Talk to an embcomp service at ``target`` (``host:port``).

    Parameters
    ----------
    target : server address, e.g. ``"localhost:50051"``.
    token : bearer token, sent as ``authorization: Bearer <token>`` on every call.
    tls : ``None`` for plaintext; ``True`` for TLS with the system roots; a PEM root
        certificate (path or bytes) to trust; or ready ``grpc.ChannelCredentials``.
    timeout : seconds per call (``None``: no deadline), at most a week.
    message_bytes : payload per request message; larger arrays are streamed in chunks.
    max_rows_per_message : rows per request message at most (match the server's
        ``EMBCOMP_MAX_ROWS_PER_REQUEST``, 262,144 by default): narrow vectors reach it
        before ``message_bytes``.
    max_message_bytes : largest message this client accepts (match the server's limit).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: Any = None,
        timeout: float | None = None,
        message_bytes: int = 4 * MiB,
        max_rows_per_message: int = 262_144,
        max_message_bytes: int = 64 * MiB,
    ) -> None:
        if max_rows_per_message < 1 or message_bytes < 1:
            raise InputError("message_bytes and max_rows_per_message must be >= 1")
        if timeout is not None and not 0 < timeout <= _MAX_TIMEOUT:  # also NaN
            raise InputError(
                f"timeout must be None (no deadline) or seconds > 0 and at most "
                f"{_MAX_TIMEOUT:.0f} (a week); got {timeout}"
            )
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls is None or tls is False:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, _channel_credentials(tls), options=options)
        self._stub = pb_grpc.CompressionServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.timeout = timeout
        self.message_bytes = message_bytes
        self.max_rows_per_message = max_rows_per_message
        self._infos: dict[str, CodecInfo] = {}

    # -- plumbing ---------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CompressionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc(exc) from None

    def _rows_per_message(self, bytes_per_row: int, d_in: int | None = None) -> int:
        """Rows per streamed message: as many as fit in ``message_bytes``.

        With ``d_in``, rounded down to whole blocks of the library's blocked loops, so
        every block the server computes is a block ``Codec.encode``/``decode`` would
        compute on the whole array: results are then byte-identical to in-process ones
        (a matmul's last bit can depend on how rows are grouped).
        """
        rows = max(1, min(self.message_bytes // max(1, bytes_per_row), self.max_rows_per_message))
        if d_in is not None:
            block = rows_per_block(4 * d_in)
            rows = rows // block * block if rows >= block else rows
        return rows

    def _info(self, codec_id: str) -> CodecInfo:
        """Cached metadata (ids are content addresses, so the content never changes)."""
        info = self._infos.get(codec_id)
        if info is None:
            info = self.get(codec_id)
        return info

    def _remember(self, info: CodecInfo) -> CodecInfo:
        self._infos[info.id] = info
        return info

    # -- fitting and the store ------------------------------------------------------------
    def fit(self, spec: str, train: Any, **options: Any) -> CodecInfo:
        """Fit a codec on ``train`` (n, d) float, streamed in chunks; returns its info.

        ``options`` are the codec's training options (``seed``, ``percentile``...).
        """
        train = check_matrix(train, name="training vectors", allow_empty=True)
        if train.dtype == np.float64:  # an error from inside the stream reaches us as UNKNOWN
            check_float32_range(train, name="training vectors")
        header = pb.FitCodecHeader(
            spec=spec,
            options={key: _option_json(key, value) for key, value in options.items()},
            rows=train.shape[0],  # so the server can tell a cut stream from a complete one
        )
        step = self._rows_per_message(4 * train.shape[1])

        def messages() -> Iterator[pb.FitCodecRequest]:
            yield pb.FitCodecRequest(header=header)
            for start in range(0, train.shape[0], step):
                request = pb.FitCodecRequest()
                chunk = train[start : start + step]
                array_to_matrix(chunk, name="training vectors", out=request.chunk)
                yield request

        reply = self._call(self._stub.FitCodec, messages())
        return self._remember(CodecInfo.from_message(reply.codec))

    def get(self, codec_id: str) -> CodecInfo:
        """Metadata of a stored codec."""
        reply = self._call(self._stub.GetCodec, pb.GetCodecRequest(codec_id=codec_id))
        return self._remember(CodecInfo.from_message(reply.codec))

    def list(self) -> builtins.list[CodecInfo]:
        """Every stored codec, ordered by id (follows the pages)."""
        infos: builtins.list[CodecInfo] = []
        token = ""
        while True:
            reply = self._call(self._stub.ListCodecs, pb.ListCodecsRequest(page_token=token))
            infos.extend(CodecInfo.from_message(info) for info in reply.codecs)
            token = reply.next_page_token
            if not token:
                return infos

    def delete(self, codec_id: str) -> None:
        """Remove a codec from the store."""
        self._call(self._stub.DeleteCodec, pb.DeleteCodecRequest(codec_id=codec_id))
        self._infos.pop(codec_id, None)

    def import_codec(self, artifact: bytes | Codec | str | os.PathLike[str]) -> CodecInfo:
        """Store a codec fitted elsewhere: artifact bytes, a fitted Codec or a codec file."""
        if isinstance(artifact, Codec):
            blob = codec_to_bytes(artifact)
        elif isinstance(artifact, (str, os.PathLike)):
            blob = Path(artifact).read_bytes()
        else:
            blob = bytes(artifact)
        reply = self._call(self._stub.ImportCodec, pb.ImportCodecRequest(artifact=blob))
        return self._remember(CodecInfo.from_message(reply.codec))

    def export_codec(self, codec_id: str) -> bytes:
        """The artifact bytes of a stored codec (``embcomp.codec_from_bytes`` loads them)."""
        reply = self._call(self._stub.ExportCodec, pb.ExportCodecRequest(codec_id=codec_id))
        return bytes(reply.artifact)

    # -- vectors ----------------------------------------------------------------------
    def encode(self, codec_id: str, X: Any) -> np.ndarray:
        """Encode ``X`` (n, d_in) float -> uint8 codes (n, code_size).

        One Encode call when ``X`` fits in ``message_bytes``, else EncodeStream.
        """
        X = check_matrix(X, allow_empty=True)
        if X.shape[0] == 0:  # as the library: no vectors, no codes (nothing to send)
            return np.empty((0, self._info(codec_id).code_size), dtype=np.uint8)
        size = X.shape[0] * X.shape[1] * (2 if X.dtype == np.float16 else 4)
        if size > self.message_bytes or X.shape[0] > self.max_rows_per_message:
            return self.encode_stream(codec_id, X)
        request = pb.EncodeRequest(codec_id=codec_id)
        array_to_matrix(X, out=request.vectors)
        reply = self._call(self._stub.Encode, request)
        return _writable(codes_to_array(reply.codes))

    def decode(self, codec_id: str, codes: Any, *, reduced: bool = False) -> np.ndarray:
        """Decode uint8 codes (n, code_size) -> float32 (n, d_in), or (n, d_out) if reduced.

        One Decode call when the result fits in ``message_bytes``, else DecodeStream.
        """
        codes = np.asarray(codes)
        info = self._info(codec_id)
        width = info.d_out if reduced else info.d_in
        if codes.ndim == 2 and codes.shape[0] == 0:  # as the library: no codes, no vectors
            return np.empty((0, width), dtype=np.float32)
        rows = codes.shape[0] if codes.ndim == 2 else 0
        if rows * 4 * width > self.message_bytes or rows > self.max_rows_per_message:
            return self.decode_stream(codec_id, codes, reduced=reduced)
        request = pb.DecodeRequest(codec_id=codec_id, reduced=reduced)
        array_to_codes(codes, out=request.codes)
        reply = self._call(self._stub.Decode, request)
        return _writable(matrix_to_array(reply.vectors, name="decoded vectors"))

    def project_queries(self, codec_id: str, Q: Any, *, metric: str = "ip") -> np.ndarray:
        """Queries (n, d_in) float -> (n, d_out) float32 in the codec's reduced space."""
        if metric not in _METRICS:
            raise InputError(f"metric must be 'ip' or 'l2'; got {metric!r}")
        Q = check_matrix(Q, name="queries", allow_empty=True)
        info = self._info(codec_id)
        if Q.shape[0] == 0:  # as the library
            return np.empty((0, info.d_out), dtype=np.float32)
        step = self._rows_per_message(4 * max(Q.shape[1], info.d_out), info.d_in)
        parts = []
        for start in range(0, Q.shape[0], step):  # one call per message-sized slice
            request = pb.ProjectQueriesRequest(codec_id=codec_id, metric=_METRICS[metric])
            array_to_matrix(Q[start : start + step], name="queries", out=request.queries)
            reply = self._call(self._stub.ProjectQueries, request)
            parts.append(matrix_to_array(reply.queries, name="projected queries"))
        return np.concatenate(parts) if len(parts) > 1 else _writable(parts[0])

    def encode_stream(
        self, codec_id: str, X: Any, *, rows_per_message: int | None = None
    ) -> np.ndarray:
        """Encode any number of vectors (n, d_in) through EncodeStream, in order."""
        X = check_matrix(X, allow_empty=True)
        if X.shape[0] == 0:
            return np.empty((0, self._info(codec_id).code_size), dtype=np.uint8)
        if X.dtype == np.float64:  # an error from inside the stream reaches us as UNKNOWN
            check_float32_range(X, name="vectors")
        step = rows_per_message or self._rows_per_message(4 * X.shape[1], X.shape[1])

        def messages() -> Iterator[pb.EncodeStreamRequest]:
            for start in range(0, X.shape[0], step):
                request = pb.EncodeStreamRequest(codec_id=codec_id if start == 0 else "")
                array_to_matrix(X[start : start + step], out=request.vectors)
                yield request

        parts: builtins.list[tuple[int, np.ndarray]] = []
        try:
            for reply in self._stub.EncodeStream(
                messages(), metadata=self._metadata, timeout=self.timeout
            ):
                parts.append((reply.row_offset, codes_to_array(reply.codes)))
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc(exc) from None
        return _assemble(parts, X.shape[0], np.uint8)

    def decode_stream(
        self,
        codec_id: str,
        codes: Any,
        *,
        reduced: bool = False,
        rows_per_message: int | None = None,
    ) -> np.ndarray:
        """Decode any number of codes (n, code_size) through DecodeStream, in order."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise InputError(f"codes must be 2-D (n, code_size); got shape {codes.shape}")
        info = self._info(codec_id)
        width = info.d_out if reduced else info.d_in
        if codes.shape[0] == 0:
            return np.empty((0, width), dtype=np.float32)
        if rows_per_message is None:
            rows_per_message = self._rows_per_message(max(4 * width, codes.shape[1]), info.d_in)

        def messages() -> Iterator[pb.DecodeStreamRequest]:
            for start in range(0, codes.shape[0], rows_per_message):
                request = pb.DecodeStreamRequest(
                    codec_id=codec_id if start == 0 else "", reduced=reduced
                )
                array_to_codes(codes[start : start + rows_per_message], out=request.codes)
                yield request

        parts: builtins.list[tuple[int, np.ndarray]] = []
        try:
            for reply in self._stub.DecodeStream(
                messages(), metadata=self._metadata, timeout=self.timeout
            ):
                parts.append((reply.row_offset, matrix_to_array(reply.vectors)))
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc(exc) from None
        return _assemble(parts, codes.shape[0], np.float32)

    def evaluate(
        self, codec_id: str, base: Any, queries: Any, *, k: int = 10, metric: str | None = None
    ) -> Evaluation:
        """recall@k of the codec on a sample: decoded ``base`` vs exact float32 search.

        ``metric``: ``"ip"``, ``"l2"`` or ``"cos"``; by default the server picks cosine
        for a codec whose spec starts with l2norm and inner product otherwise (as
        ``embcomp eval``), and says which in the result.
        """
        if metric is not None and metric not in _EVALUATION_METRICS:
            raise InputError(f"metric must be 'ip', 'l2' or 'cos'; got {metric!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < 2**32:
            # (on the wire 0 means "the default, 10": a k=0 would quietly become 10)
            raise InputError(f"k must be an integer >= 1; got {k!r}")
        request = pb.EvaluateCodecRequest(
            codec_id=codec_id,
            k=k,
            metric=types_pb2.METRIC_UNSPECIFIED if metric is None else _EVALUATION_METRICS[metric],
        )
        array_to_matrix(base, name="base", out=request.base)
        array_to_matrix(queries, name="queries", out=request.queries)
        reply = self._call(self._stub.EvaluateCodec, request)
        return Evaluation(
            recall_at_k=reply.recall_at_k,
            k=reply.k,
            bytes_per_vector=reply.bytes_per_vector,
            compression_ratio=reply.compression_ratio,
            base_rows=reply.base_rows,
            query_rows=reply.query_rows,
            metric=_METRIC_NAMES.get(reply.metric),
        )


def _assemble(parts: list[tuple[int, np.ndarray]], rows: int, dtype: Any) -> np.ndarray:
    """Concatenate stream replies after checking they tile ``[0, rows)`` in order."""
    width = parts[0][1].shape[1] if parts else 0
    out = np.empty((rows, width), dtype=dtype)
    position = 0
    for offset, block in parts:
        if offset != position:
            raise InputError(f"stream reply at row {offset} arrived where {position} was due")
        out[position : position + block.shape[0]] = block
        position += block.shape[0]
    if position != rows:
        raise InputError(f"the stream returned {position} rows for {rows} sent")
    return out
