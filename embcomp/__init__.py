"""embcomp: fit codecs that shrink embedding vectors, save them safely, encode and decode.

>>> import embcomp
>>> codec = embcomp.make_codec("pca256,fp8").fit(train)   # doctest: +SKIP
>>> codes = codec.encode(X)                                # uint8 (n, codec.code_size)

This package imports only numpy, ml_dtypes, scipy and pydantic; the service, the
benchmark and the Ray engine live behind extras.
"""

from ._version import __version__
from .artifacts import (
    codec_from_bytes,
    codec_id,
    codec_to_bytes,
    load_codec,
    read_manifest,
    save_codec,
)
from .codec import Codec, make_codec
from .exceptions import (
    ArtifactError,
    DimensionMismatchError,
    EmbcompError,
    InputError,
    NotFittedError,
    SpecError,
)
from .reducers import MPADReducer, PCAReducer, RandomRotation
from .spec import CodecSpec, parse_spec

__all__ = [
    "ArtifactError",
    "Codec",
    "CodecSpec",
    "DimensionMismatchError",
    "EmbcompError",
    "InputError",
    "MPADReducer",
    "NotFittedError",
    "PCAReducer",
    "RandomRotation",
    "SpecError",
    "__version__",
    "codec_from_bytes",
    "codec_id",
    "codec_to_bytes",
    "load_codec",
    "make_codec",
    "parse_spec",
    "read_manifest",
    "save_codec",
]
