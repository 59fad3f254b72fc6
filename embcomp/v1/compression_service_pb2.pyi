from embcomp.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FitCodecHeader(_message.Message):
    __slots__ = ("spec", "options", "rows")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    spec: str
    options: _containers.ScalarMap[str, str]
    rows: int
    def __init__(self, spec: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., rows: _Optional[int] = ...) -> None: ...

class FitCodecRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FitCodecHeader
    chunk: _types_pb2.Matrix
    def __init__(self, header: _Optional[_Union[FitCodecHeader, _Mapping]] = ..., chunk: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class FitCodecResponse(_message.Message):
    __slots__ = ("codec",)
    CODEC_FIELD_NUMBER: _ClassVar[int]
    codec: _types_pb2.CodecInfo
    def __init__(self, codec: _Optional[_Union[_types_pb2.CodecInfo, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("codec_id", "vectors")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    vectors: _types_pb2.Matrix
    def __init__(self, codec_id: _Optional[str] = ..., vectors: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("codes",)
    CODES_FIELD_NUMBER: _ClassVar[int]
    codes: _types_pb2.Codes
    def __init__(self, codes: _Optional[_Union[_types_pb2.Codes, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("codec_id", "codes", "reduced")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    REDUCED_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    codes: _types_pb2.Codes
    reduced: bool
    def __init__(self, codec_id: _Optional[str] = ..., codes: _Optional[_Union[_types_pb2.Codes, _Mapping]] = ..., reduced: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("vectors",)
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    vectors: _types_pb2.Matrix
    def __init__(self, vectors: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class ProjectQueriesRequest(_message.Message):
    __slots__ = ("codec_id", "queries", "metric")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    queries: _types_pb2.Matrix
    metric: _types_pb2.Metric
    def __init__(self, codec_id: _Optional[str] = ..., queries: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ..., metric: _Optional[_Union[_types_pb2.Metric, str]] = ...) -> None: ...

class ProjectQueriesResponse(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _types_pb2.Matrix
    def __init__(self, queries: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class EncodeStreamRequest(_message.Message):
    __slots__ = ("codec_id", "vectors")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    vectors: _types_pb2.Matrix
    def __init__(self, codec_id: _Optional[str] = ..., vectors: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class EncodeStreamResponse(_message.Message):
    __slots__ = ("row_offset", "codes")
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    row_offset: int
    codes: _types_pb2.Codes
    def __init__(self, row_offset: _Optional[int] = ..., codes: _Optional[_Union[_types_pb2.Codes, _Mapping]] = ...) -> None: ...

class DecodeStreamRequest(_message.Message):
    __slots__ = ("codec_id", "codes", "reduced")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    REDUCED_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    codes: _types_pb2.Codes
    reduced: bool
    def __init__(self, codec_id: _Optional[str] = ..., codes: _Optional[_Union[_types_pb2.Codes, _Mapping]] = ..., reduced: _Optional[bool] = ...) -> None: ...

class DecodeStreamResponse(_message.Message):
    __slots__ = ("row_offset", "vectors")
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    row_offset: int
    vectors: _types_pb2.Matrix
    def __init__(self, row_offset: _Optional[int] = ..., vectors: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ...) -> None: ...

class GetCodecRequest(_message.Message):
    __slots__ = ("codec_id",)
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    def __init__(self, codec_id: _Optional[str] = ...) -> None: ...

class GetCodecResponse(_message.Message):
    __slots__ = ("codec",)
    CODEC_FIELD_NUMBER: _ClassVar[int]
    codec: _types_pb2.CodecInfo
    def __init__(self, codec: _Optional[_Union[_types_pb2.CodecInfo, _Mapping]] = ...) -> None: ...

class ListCodecsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCodecsResponse(_message.Message):
    __slots__ = ("codecs", "next_page_token")
    CODECS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    codecs: _containers.RepeatedCompositeFieldContainer[_types_pb2.CodecInfo]
    next_page_token: str
    def __init__(self, codecs: _Optional[_Iterable[_Union[_types_pb2.CodecInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteCodecRequest(_message.Message):
    __slots__ = ("codec_id",)
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    def __init__(self, codec_id: _Optional[str] = ...) -> None: ...

class DeleteCodecResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImportCodecRequest(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: bytes
    def __init__(self, artifact: _Optional[bytes] = ...) -> None: ...

class ImportCodecResponse(_message.Message):
    __slots__ = ("codec",)
    CODEC_FIELD_NUMBER: _ClassVar[int]
    codec: _types_pb2.CodecInfo
    def __init__(self, codec: _Optional[_Union[_types_pb2.CodecInfo, _Mapping]] = ...) -> None: ...

class ExportCodecRequest(_message.Message):
    __slots__ = ("codec_id",)
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    def __init__(self, codec_id: _Optional[str] = ...) -> None: ...

class ExportCodecResponse(_message.Message):
    __slots__ = ("artifact", "codec")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    artifact: bytes
    codec: _types_pb2.CodecInfo
    def __init__(self, artifact: _Optional[bytes] = ..., codec: _Optional[_Union[_types_pb2.CodecInfo, _Mapping]] = ...) -> None: ...

class EvaluateCodecRequest(_message.Message):
    __slots__ = ("codec_id", "base", "queries", "k", "metric")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    base: _types_pb2.Matrix
    queries: _types_pb2.Matrix
    k: int
    metric: _types_pb2.Metric
    def __init__(self, codec_id: _Optional[str] = ..., base: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ..., queries: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ..., k: _Optional[int] = ..., metric: _Optional[_Union[_types_pb2.Metric, str]] = ...) -> None: ...

class EvaluateCodecResponse(_message.Message):
    __slots__ = ("recall_at_k", "k", "bytes_per_vector", "compression_ratio", "base_rows", "query_rows", "metric")
    RECALL_AT_K_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    BASE_ROWS_FIELD_NUMBER: _ClassVar[int]
    QUERY_ROWS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    recall_at_k: float
    k: int
    bytes_per_vector: int
    compression_ratio: float
    base_rows: int
    query_rows: int
    metric: _types_pb2.Metric
    def __init__(self, recall_at_k: _Optional[float] = ..., k: _Optional[int] = ..., bytes_per_vector: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., base_rows: _Optional[int] = ..., query_rows: _Optional[int] = ..., metric: _Optional[_Union[_types_pb2.Metric, str]] = ...) -> None: ...
