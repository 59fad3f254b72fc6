"""The codec store: content-addressed artifact files in one directory.

Layout: ``<root>/<id>.codec`` holds the artifact bytes exactly as
:func:`embcomp.codec_to_bytes` wrote them; ``<root>/<id>.json`` is a sidecar with the
metadata that is not part of the artifact (creation time, full sha256). The id is the
first 24 hex digits (96 bits) of the artifact's sha256: a content address, so the same
fit stored twice is one entry, and ids stay valid across restarts and machines. With
96 bits, the chance of any collision among a million codecs is about 1e-17; the full
sha256 is kept in the sidecar and checked anyway.

A codec exists exactly when its ``.codec`` file exists. Writes go to a temporary file
and are renamed into place (sidecar first, artifact last), so readers never see a
partial file and a crash leaves at most an ignored sidecar. Every load verifies the
file's sha256 against its id and every checksum inside the artifact. Mutations are
serialized by a lock; loaded codecs are kept in an LRU cache bounded by count and bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_bytes, remove_stale_temporaries_in
from ..artifacts import codec_from_bytes, codec_to_bytes
from ..codec import Codec
from ..exceptions import ArtifactError, InputError
from .errors import CodecNotFoundError, LimitExceededError
from .logs import logger

__all__ = ["ID_HEX_DIGITS", "CodecStore", "StoredCodec", "check_codec_id", "loaded_bytes"]

ID_HEX_DIGITS = 24
_ID = re.compile(rf"^[0-9a-f]{{{ID_HEX_DIGITS}}}$")
_SIDECAR_FORMAT = "embcomp-store-entry"


def _stored_name(name: str) -> bool:
    """Whether a file name is one the store writes (a codec, its sidecar, the probe)."""
    stem, _, suffix = name.rpartition(".")
    return name == ".write-probe" or (suffix in ("codec", "json") and bool(_ID.match(stem)))


def loaded_bytes(codec: Codec) -> int:
    """Memory the arrays of a loaded codec hold, in bytes: its fitted state and what its
    stages derive from it at load (projections, kernel tables), each array counted once.

    Found by walking the stages' attributes (and the lists, tuples, dicts and objects
    they hold, a few levels deep) rather than by listing them, so arrays a stage adds
    later are counted too; a view counts as the array it views.
    """
    arrays: dict[int, int] = {}
    seen: set[int] = set()

    def visit(value: object, depth: int) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            arrays[id(value)] = value.nbytes
        elif depth > 0:
            if isinstance(value, dict):
                children: Iterable[object] = value.values()
            elif isinstance(value, (list, tuple)):
                children = value
            else:
                children = getattr(value, "__dict__", {}).values()
            for child in children:
                visit(child, depth - 1)

    for stage in (codec.reducer, codec.quantizer):
        if stage is not None:
            visit(stage, 4)
    return sum(arrays.values())


def check_codec_id(codec_id: str) -> str:
    """Return ``codec_id`` if it is well formed; raise ``InputError`` otherwise.

    Only ids of this exact form reach the file system, so no request can name a path.
    """
    if not isinstance(codec_id, str) or not _ID.match(codec_id):
        shown = codec_id if isinstance(codec_id, str) and len(codec_id) <= 80 else "..."
        raise InputError(
            f"codec_id must be {ID_HEX_DIGITS} lowercase hex digits as returned by FitCodec "
            f"or ImportCodec; got {shown!r}"
        )
    return codec_id


@dataclass(frozen=True)
class StoredCodec:
    """Metadata of one stored codec.

    Attributes
    ----------
    id : content address (first 24 hex digits of ``sha256``).
    spec : canonical spec string.
    d_in, d_out, code_size : widths and bytes per vector.
    options : training options stored in the artifact.
    created : when the codec first entered this store (UTC).
    artifact_size : artifact length in bytes.
    sha256 : full hex sha256 of the artifact.
    """

    id: str
    spec: str
    d_in: int
    d_out: int
    code_size: int
    options: dict[str, Any] = field(hash=False)
    created: datetime
    artifact_size: int
    sha256: str

    @property
    def compression_ratio(self) -> float:
        return 4 * self.d_in / self.code_size

    def to_json(self) -> bytes:
        record = {
            "format": _SIDECAR_FORMAT,
            "id": self.id,
            "sha256": self.sha256,
            "spec": self.spec,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "code_size": self.code_size,
            "options": self.options,
            "created": self.created.isoformat(),
            "artifact_size": self.artifact_size,
        }
        return json.dumps(record, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> StoredCodec:
        record = json.loads(blob)
        if not isinstance(record, dict) or record.get("format") != _SIDECAR_FORMAT:
            raise ValueError("not an embcomp store sidecar")
        created = datetime.fromisoformat(record["created"])
        return cls(
            id=str(record["id"]),
            spec=str(record["spec"]),
            d_in=int(record["d_in"]),
            d_out=int(record["d_out"]),
            code_size=int(record["code_size"]),
            options=dict(record["options"]),
            created=created if created.tzinfo else created.replace(tzinfo=timezone.utc),
            artifact_size=int(record["artifact_size"]),
            sha256=str(record["sha256"]),
        )

    @classmethod
    def describe(cls, codec: Codec, blob: bytes, created: datetime) -> StoredCodec:
        digest = hashlib.sha256(blob).hexdigest()
        return cls(
            id=digest[:ID_HEX_DIGITS],
            spec=str(codec.spec),
            d_in=codec._check_fitted(),
            d_out=codec.d_out,
            code_size=codec.code_size,
            options=dict(codec.options),
            created=created,
            artifact_size=len(blob),
            sha256=digest,
        )


class CodecStore:
    """Content-addressed codec files under ``root`` with an LRU cache of loaded codecs.

    Parameters
    ----------
    root : directory; created (with parents) if missing. Must be writable.
    cache_size : loaded codecs kept in memory.
    cache_bytes : memory the kept codecs may hold in all (see :func:`loaded_bytes`); the
        least recently used go first, and a codec larger than this is not kept.
    max_artifact_bytes : largest artifact stored (``None``: any); a larger one raises
        ``LimitExceededError`` and nothing is written.

    Safe to use from many threads. Several processes may share one directory: every
    file appears atomically, and identical content always gets the same name.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        cache_size: int = 32,
        cache_bytes: int = 1 << 30,
        max_artifact_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            atomic_write_bytes(probe, b"")
            probe.unlink()
        except (OSError, InputError) as exc:
            raise InputError(f"cannot use {str(self.root)!r} as the codec store: {exc}") from exc
        remove_stale_temporaries_in(self.root, _stored_name)  # a killed server's half writes
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self._cache: OrderedDict[str, tuple[Codec, int]] = OrderedDict()  # id -> (codec, bytes)
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._write_lock = threading.Lock()

    # -- paths ------------------------------------------------------------------------
    def _artifact_path(self, codec_id: str) -> Path:
        return self.root / f"{check_codec_id(codec_id)}.codec"

    def _sidecar_path(self, codec_id: str) -> Path:
        return self.root / f"{check_codec_id(codec_id)}.json"

    # -- writing ----------------------------------------------------------------------
    def put(self, codec: Codec) -> StoredCodec:
        """Store a fitted codec; storing identical content again returns the first entry."""
        return self.put_loaded(codec_to_bytes(codec), codec)

    def put_bytes(self, blob: bytes, *, source: str = "uploaded artifact") -> StoredCodec:
        """Validate artifact bytes (every check :func:`embcomp.load_codec` does) and store them.

        Raises ``ArtifactError`` if the bytes are not a loadable codec; nothing is written.
        """
        return self.put_loaded(bytes(blob), codec_from_bytes(blob, source=source))

    def put_loaded(self, blob: bytes, codec: Codec) -> StoredCodec:
        """Store artifact bytes as they are, given the codec ``codec_from_bytes`` made of them
        (for a caller that checks the loaded codec before storing it)."""
        if self.max_artifact_bytes is not None and len(blob) > self.max_artifact_bytes:
            raise LimitExceededError(
                f"the {codec.spec} codec's artifact is {len(blob)} bytes, over the "
                f"{self.max_artifact_bytes} this store keeps per codec (a server sets it to "
                "EMBCOMP_MAX_FIT_BYTES, or to what a message can carry if that is more); "
                "nothing stored"
            )
        fresh = StoredCodec.describe(codec, blob, datetime.now(timezone.utc))
        with self._write_lock:
            try:
                stored = self._artifact_path(fresh.id).read_bytes()
            except FileNotFoundError:
                stored = None
            if stored is not None:
                digest = hashlib.sha256(stored).hexdigest()
                if digest == fresh.sha256:  # already stored, intact
                    return self._info_locked(fresh.id)
                if digest.startswith(fresh.id):  # a valid file for this id, other content
                    raise ArtifactError(
                        f"codec id {fresh.id} is taken by an artifact with a different sha256 "
                        "(a 96-bit prefix collision); refusing to overwrite"
                    )
                # The stored file is damaged: the verified bytes replace it (atomically),
                # keeping the entry's creation time when its sidecar still describes it.
                logger.warning("replacing corrupted stored codec", extra={"codec_id": fresh.id})
                recorded = self._read_sidecar(fresh.id)
                if recorded is not None and recorded.sha256 == fresh.sha256:
                    fresh = recorded
            atomic_write_bytes(self._sidecar_path(fresh.id), fresh.to_json())
            atomic_write_bytes(self._artifact_path(fresh.id), blob)
            self._remember(fresh.id, codec)
        return fresh

    def delete(self, codec_id: str) -> None:
        """Remove a codec; raises ``CodecNotFoundError`` if it is not stored."""
        with self._write_lock:
            self._forget(codec_id)  # even if another process removed the file already
            try:
                self._artifact_path(codec_id).unlink()
            except FileNotFoundError:
                raise self._not_found(codec_id) from None
            with contextlib.suppress(FileNotFoundError):
                self._sidecar_path(codec_id).unlink()

    # -- reading ----------------------------------------------------------------------
    def _not_found(self, codec_id: str) -> CodecNotFoundError:
        return CodecNotFoundError(
            f"no codec with id {codec_id!r} in the store; ListCodecs shows the stored ids"
        )

    def read_bytes(self, codec_id: str) -> bytes:
        """The verified artifact bytes of a stored codec.

        Raises ``CodecNotFoundError`` if absent, ``ArtifactError`` if the file's sha256
        does not match its id (the file was damaged or replaced).
        """
        path = self._artifact_path(codec_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise self._not_found(codec_id) from None
        digest = hashlib.sha256(blob).hexdigest()
        if not digest.startswith(codec_id):
            raise ArtifactError(
                f"stored codec {codec_id} is corrupted: its file's sha256 is {digest[:24]}..., "
                "not its id; delete it and fit or import it again"
            )
        return blob

    def get(self, codec_id: str) -> Codec:
        """The loaded codec for ``codec_id`` (from the cache when possible)."""
        check_codec_id(codec_id)
        with self._cache_lock:
            entry = self._cache.get(codec_id)
            if entry is not None:
                self._cache.move_to_end(codec_id)
        codec = entry[0] if entry is not None else None
        if codec is not None:
            # another process sharing the directory may have deleted it: the file decides
            if self._artifact_path(codec_id).exists():
                return codec
            self._forget(codec_id)
        blob = self.read_bytes(codec_id)
        codec = codec_from_bytes(blob, source=f"stored codec {codec_id}")
        with self._write_lock:  # a delete that ran since the read must win
            if not self._artifact_path(codec_id).exists():
                raise self._not_found(codec_id)
            self._remember(codec_id, codec)
        return codec

    def _forget(self, codec_id: str) -> None:
        with self._cache_lock:
            self._pop_cached(codec_id)

    def _pop_cached(self, codec_id: str) -> None:
        """Drop a cache entry (the caller holds the cache lock)."""
        entry = self._cache.pop(codec_id, None)
        if entry is not None:
            self._cached_bytes -= entry[1]

    def _remember(self, codec_id: str, codec: Codec) -> None:
        size = loaded_bytes(codec)
        with self._cache_lock:
            self._pop_cached(codec_id)
            if size > self.cache_bytes:
                return  # alone over the budget: not kept, reloaded when asked for
            self._cache[codec_id] = (codec, size)
            self._cached_bytes += size
            while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
                self._pop_cached(next(iter(self._cache)))  # the least recently used

    def info(self, codec_id: str) -> StoredCodec:
        """Metadata of a stored codec; raises ``CodecNotFoundError`` if absent."""
        check_codec_id(codec_id)
        if not self._artifact_path(codec_id).exists():
            raise self._not_found(codec_id)
        meta = self._read_sidecar(codec_id)
        if meta is not None:
            return meta
        with self._write_lock:
            return self._info_locked(codec_id)

    def _read_sidecar(self, codec_id: str) -> StoredCodec | None:
        """The sidecar's record, or ``None`` if it is missing or unreadable."""
        try:
            return StoredCodec.from_json(self._sidecar_path(codec_id).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _info_locked(self, codec_id: str) -> StoredCodec:
        """Read the sidecar, rebuilding it from the verified artifact if missing or bad."""
        meta = self._read_sidecar(codec_id)
        if meta is not None:
            return meta
        sidecar = self._sidecar_path(codec_id)
        blob = self.read_bytes(codec_id)
        codec = codec_from_bytes(blob, source=f"stored codec {codec_id}")
        mtime = self._artifact_path(codec_id).stat().st_mtime
        meta = StoredCodec.describe(codec, blob, datetime.fromtimestamp(mtime, timezone.utc))
        atomic_write_bytes(sidecar, meta.to_json())
        return meta

    def ids(self) -> list[str]:
        """Ids of every stored codec, sorted."""
        names = (p.name[: -len(".codec")] for p in self.root.glob("*.codec"))
        return sorted(name for name in names if _ID.match(name))

    def __contains__(self, codec_id: object) -> bool:
        return (
            isinstance(codec_id, str)
            and _ID.match(codec_id) is not None
            and self._artifact_path(codec_id).exists()
        )

    def __len__(self) -> int:
        return len(self.ids())
