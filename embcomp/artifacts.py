"""Codec artifacts: one self-checking file, data only, never a pickle.

Layout (all integers little-endian)::

    0   8 bytes   magic b"EMBCODEC"
    8   uint32    format version (FORMAT_VERSION)
    12  uint32    manifest length L
    16  32 bytes  sha256 of the manifest
    48  L bytes   manifest, UTF-8 JSON: spec, d_in, d_out, code_size, options,
                  library versions, and per array: name, dtype, shape, offset,
                  nbytes, sha256
    48+L ...      array data, each array 64-byte aligned from the data start
                  (zero padding; the manifest also holds the sha256 of the whole section)

The same fit always produces the same bytes (no timestamps inside), so the sha256
of the file is a content address. Loading checks magic, version, lengths and every
checksum, and raises ``ArtifactError`` naming the file and the problem.

Format versions (every one still loads; ``tests/data`` keeps a golden file of each):

1. Every stage array is stored.
2. A reducer's ``inverse_components_`` that equals its ``components_`` (``rot``, and
   ``pca`` without whitening) is not stored a second time: absent, it is
   ``components_``. A ``rot`` codec for 3072-dim vectors shrinks from 75 MB to 38 MB.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ._atomic import atomic_write_bytes
from ._version import __version__
from .codec import Codec
from .exceptions import ArtifactError, EmbcompError

__all__ = [
    "FORMAT_VERSION",
    "codec_from_bytes",
    "codec_id",
    "codec_to_bytes",
    "load_codec",
    "read_manifest",
    "save_codec",
]

MAGIC = b"EMBCODEC"
FORMAT_VERSION = 2
# From format 2 on, a reducer array that may be left out when it equals another.
_SHARED = {"reducer/inverse_components_": "reducer/components_"}
_HEADER = struct.Struct("<8sII32s")
_ALIGN = 64
# Only plain numeric dtypes may be stored: nothing that could carry objects.
_ALLOWED_DTYPES = {"<f4", "<f8", "<i8", "<i4", "<u1", "<u2", "<f2"}
# Options added to a stage after artifacts were first saved, each with the value that
# computes what those artifacts computed: a manifest without the option loads with it.
LEGACY_OPTIONS: dict[str, Any] = {"center": False}  # the float formats' centring


def _with_legacy_options(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    accepted = Codec(spec).options  # every option the spec's stages take, with defaults
    missing = {k: v for k, v in LEGACY_OPTIONS.items() if k in accepted and k not in options}
    return {**options, **missing}


def _stage_arrays(codec: Codec) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if codec.reducer is not None:
        for name, value in codec.reducer.state_arrays().items():
            arrays[f"reducer/{name}"] = value
    for name, value in codec.quantizer.state_arrays().items():
        arrays[f"quantizer/{name}"] = value
    for name, same_as in _SHARED.items():
        if name in arrays and _identical(arrays[name], arrays[same_as]):
            del arrays[name]  # format 2: loading gives it back as the very same array
    return arrays


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same bits (same dtype and shape; -0.0 is not 0.0)."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes, b_bytes = (np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b))
    return bool(np.array_equal(a_bytes, b_bytes))


def codec_to_bytes(codec: Codec) -> bytes:
    """Serialize a fitted codec to artifact bytes (deterministic for a given fit)."""
    d_in = codec._check_fitted()
    entries, chunks, offset = [], [], 0
    for name, value in _stage_arrays(codec).items():
        array = np.array(value, order="C")  # keeps 0-d arrays 0-d
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        dtype = array.dtype.str.replace("|", "<")
        if dtype not in _ALLOWED_DTYPES:
            raise ArtifactError(f"array {name!r} has dtype {dtype}, which artifacts cannot store")
        data = array.tobytes()
        padding = (-offset) % _ALIGN
        chunks.append(b"\0" * padding + data)
        offset += padding
        entries.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        offset += len(data)
    manifest = {
        "format": "embcomp-codec",
        "format_version": FORMAT_VERSION,
        "spec": str(codec.spec),
        "d_in": d_in,
        "d_out": codec.d_out,
        "code_size": codec.code_size,
        "options": codec.options,
        "versions": {
            "embcomp": __version__,
            "numpy": np.__version__,
            "ml_dtypes": ml_dtypes.__version__,
            "python": platform.python_version(),
        },
        "arrays": entries,
        "data_length": offset,
        "data_sha256": hashlib.sha256(b"".join(chunks)).hexdigest(),
    }
    try:
        manifest_bytes = json.dumps(manifest, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"codec options must be plain JSON values: {exc}") from exc
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, len(manifest_bytes), hashlib.sha256(manifest_bytes).digest()
    )
    return header + manifest_bytes + b"".join(chunks)


def codec_id(codec: Codec) -> str:
    """Content address of a fitted codec: the first 24 hex digits of the artifact's sha256.

    Artifact bytes are deterministic for a fit, so equal ids mean equal codecs; the
    batch compressor records it in its outputs and the service names codecs by it.
    """
    return hashlib.sha256(codec_to_bytes(codec)).hexdigest()[:24]


def _parse_manifest(blob: bytes, source: str) -> tuple[dict[str, Any], int, int]:
    """The manifest, where the array data starts, and the header's format version."""
    if len(blob) < _HEADER.size:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes is shorter than the header")
    magic, version, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ArtifactError(f"{source}: not an embcomp codec file (bad magic {magic!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format version {version} is newer than this embcomp ({__version__}) "
            f"reads (up to {FORMAT_VERSION}); upgrade embcomp"
        )
    if version < 1:
        raise ArtifactError(f"{source}: invalid format version {version}")
    start = _HEADER.size
    manifest_bytes = blob[start : start + length]
    if len(manifest_bytes) != length:
        raise ArtifactError(f"{source}: truncated inside the manifest")
    if hashlib.sha256(manifest_bytes).digest() != digest:
        raise ArtifactError(f"{source}: manifest checksum mismatch (file corrupted)")
    try:
        manifest = json.loads(manifest_bytes)
    except RecursionError:  # nested deeper than any manifest: a crafted file
        raise ArtifactError(f"{source}: manifest is nested too deeply to be a codec") from None
    except ValueError as exc:
        raise ArtifactError(f"{source}: manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "embcomp-codec":
        raise ArtifactError(f"{source}: manifest does not describe an embcomp codec")
    _check_fields(manifest, _MANIFEST_FIELDS, "manifest", source)
    for index, entry in enumerate(manifest["arrays"]):
        _check_fields(entry, _ARRAY_FIELDS, f"manifest entry arrays[{index}]", source)
    return manifest, start + length, version


# The fields a loader reads, with their JSON types; a crafted manifest may omit any of
# them or give another type, which must be an ArtifactError, not a KeyError or TypeError.
_MANIFEST_FIELDS: dict[str, type] = {
    "spec": str,
    "d_in": int,
    "d_out": int,
    "code_size": int,
    "options": dict,
    "arrays": list,
    "data_length": int,
    "data_sha256": str,
}
_ARRAY_FIELDS: dict[str, type] = {
    "name": str,
    "dtype": str,
    "shape": list,
    "offset": int,
    "nbytes": int,
    "sha256": str,
}
_JSON_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def _check_fields(record: Any, fields: dict[str, type], what: str, source: str) -> None:
    if not isinstance(record, dict):
        raise ArtifactError(f"{source}: {what} must be an object; got {type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise ArtifactError(f"{source}: {what} has no {name!r} field (file damaged or forged)")
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ArtifactError(
                f"{source}: {what} field {name!r} must be {_JSON_TYPE_NAMES[kind]}; got "
                f"{json.dumps(value)[:40]}"
            )


def _count(value: Any) -> bool:
    """Whether a manifest value is a non-negative integer (JSON booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_arrays(blob: bytes, manifest: dict[str, Any], data_start: int, source: str) -> dict:
    data = memoryview(blob)[data_start:]
    if len(data) != manifest["data_length"]:
        raise ArtifactError(
            f"{source}: truncated or padded: {len(data)} data bytes, manifest says "
            f"{manifest['data_length']}"
        )
    if hashlib.sha256(data).hexdigest() != manifest["data_sha256"]:
        raise ArtifactError(f"{source}: data checksum mismatch (file corrupted)")
    arrays: dict[str, np.ndarray] = {}
    for entry in manifest["arrays"]:
        name, dtype = entry["name"], entry["dtype"]
        if dtype not in _ALLOWED_DTYPES:
            raise ArtifactError(f"{source}: array {name!r} has disallowed dtype {dtype!r}")
        start, nbytes, shape = entry["offset"], entry["nbytes"], entry["shape"]
        if not all(_count(n) for n in (start, nbytes, *shape)):
            raise ArtifactError(
                f"{source}: array {name!r} needs non-negative integer offset, nbytes and "
                f"shape; got offset {start!r}, nbytes {nbytes!r}, shape {shape!r}"
            )
        chunk = data[start : start + nbytes]
        if len(chunk) != nbytes or hashlib.sha256(chunk).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{source}: checksum mismatch in array {name!r} (file corrupted)")
        array = np.frombuffer(chunk, dtype=np.dtype(dtype))
        if array.size != math.prod(shape):
            raise ArtifactError(f"{source}: array {name!r} size does not match shape {shape}")
        arrays[name] = array.reshape(tuple(shape)).astype(array.dtype.newbyteorder("="))
    return arrays


def codec_from_bytes(blob: bytes, *, source: str = "<bytes>") -> Codec:
    """Rebuild a fitted codec from artifact bytes, verifying every checksum."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ArtifactError(f"{source}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    manifest, data_start, version = _parse_manifest(blob, source)
    try:
        arrays = _read_arrays(blob, manifest, data_start, source)
        for name, same_as in _SHARED.items():
            if same_as not in arrays:
                continue
            if name not in arrays and version >= 2:
                arrays[name] = arrays[same_as]
            elif name in arrays and _identical(arrays[name], arrays[same_as]):
                arrays[name] = arrays[same_as]  # (format 1) held once, as after a fit
        options = _with_legacy_options(manifest["spec"], manifest["options"])
        codec = Codec(manifest["spec"], **options)
        groups: dict[str, dict[str, np.ndarray]] = {"reducer": {}, "quantizer": {}}
        for name, array in arrays.items():
            group, _, attribute = name.partition("/")
            if group not in groups:
                raise ArtifactError(f"{source}: unexpected array {name!r}")
            groups[group][attribute] = array
        if codec.reducer is not None:
            codec.reducer.set_state(groups["reducer"])
        elif groups["reducer"]:
            raise ArtifactError(f"{source}: reducer arrays present but the spec has no reducer")
        codec.quantizer.set_state(groups["quantizer"])
        d_in = manifest["d_in"]
        if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in < 1:
            raise ArtifactError(f"{source}: d_in must be a positive integer; got {d_in!r}")
        reducer = codec.reducer
        width = d_in if reducer is None else reducer.n_components_
        if reducer is not None and reducer.n_features_in_ != d_in:
            raise ArtifactError(
                f"{source}: d_in is {d_in} but the reducer's arrays take "
                f"{reducer.n_features_in_}-dim vectors"
            )
        if codec.quantizer.d_ != width:
            raise ArtifactError(
                f"{source}: the quantizer's arrays are for {codec.quantizer.d_}-dim vectors; "
                f"it receives {width}"
            )
        codec.d_in = d_in
    except ArtifactError as exc:
        if str(exc).startswith(f"{source}: "):
            raise
        raise ArtifactError(f"{source}: {exc}") from None
    except (EmbcompError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: inconsistent codec manifest: {exc}") from exc
    for name, actual in (("code_size", codec.code_size), ("d_out", codec.d_out)):
        if manifest[name] != actual:  # present and an integer: _parse_manifest checked
            raise ArtifactError(
                f"{source}: manifest says {name} {manifest[name]} but the arrays give {actual}"
            )
    return codec


def save_codec(codec: Codec, path: str | os.PathLike[str]) -> Path:
    """Write a fitted codec to ``path`` atomically (temp file + rename)."""
    atomic_write_bytes(path, codec_to_bytes(codec), clean_stale=True)
    return Path(path)


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"codec file {str(path)!r} does not exist") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ArtifactError(f"cannot read codec file {str(path)!r}: {exc.strerror}") from exc


def load_codec(path: str | os.PathLike[str]) -> Codec:
    """Load a codec saved by :func:`save_codec`; raises ``ArtifactError`` if it is bad."""
    return codec_from_bytes(_read_file(path), source=str(path))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a codec file, after checking the header and manifest checksum."""
    manifest, _, _ = _parse_manifest(_read_file(path), str(path))
    return manifest
