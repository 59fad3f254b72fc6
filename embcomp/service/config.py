"""Service settings: defaults embedded, then ``EMBCOMP_*`` environment variables, then flags.

Every field can be set as an environment variable named ``EMBCOMP_<FIELD>`` (for
example ``EMBCOMP_PORT=6000``, ``EMBCOMP_AUTH_TOKEN=...``) or as the matching
``embcomp serve --<field>`` flag; flags win. No file or other service is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..exceptions import InputError

__all__ = ["ENVELOPE_BYTES", "SPARE_THREADS", "ServiceConfig", "load_config"]

MiB = 1 << 20
# Room for the message framing around a response's payload bytes.
ENVELOPE_BYTES = 1024
# Server threads beyond max_workers: for health checks only (reflection takes a call slot).
SPARE_THREADS = 2
# The longest stream_idle_seconds and grace_seconds: a week. Waits far longer overflow
# the platform's timeouts (1e12 s made every FitCodec fail with INTERNAL, and gRPC's stop
# crash a thread); inf is refused like them.
MAX_WAIT_SECONDS = 7 * 86400.0


class ServiceConfig(BaseSettings):
    """Settings of one server process.

    Attributes
    ----------
    host, port : address to listen on; port 0 picks a free port (tests).
    store : directory holding the codec store; created if missing.
    max_message_bytes : largest gRPC message accepted or sent (gRPC's own default is 4 MiB).
    max_rows_per_request : most vectors or codes in one request or stream message.
    max_fit_bytes : most training data one FitCodec may send, counted as float32 bytes;
        also the largest (d, d) float64 matrix a fit may build (pca, rot, mpad init=pca)
        and the largest artifact it may make. An artifact over the message limit is
        stored and used, but ExportCodec cannot return it.
    max_concurrent_fits : fits running at once; one more gets RESOURCE_EXHAUSTED. A fit
        takes its slot once its training data has arrived (a stalled upload holds none);
        uploads in progress hold at most ``max_concurrent_fits * max_fit_bytes`` in all.
    max_eval_pairs : most work one EvaluateCodec may do, counted in scored pairs:
        queries x (base rows + 32 x k), as each neighbour kept costs about 32 pairs.
    max_eval_k : largest k (neighbours per query) EvaluateCodec accepts.
    max_dims : widest vectors a codec may take (FitCodec training data, ImportCodec d_in).
    max_workers : calls of the compression service served at once; one more gets
        RESOURCE_EXHAUSTED at once rather than waiting. Server reflection counts as such
        a call, and so does a unary call whose request is still arriving. Health checks
        have ``SPARE_THREADS`` threads of their own, so calls of the service, however
        many, do not keep them from answering.
    stream_idle_seconds : a streaming call (FitCodec, EncodeStream, DecodeStream) whose
        client sends no message for this long is ended with DEADLINE_EXCEEDED, freeing
        its slot; a response stream whose client reads no response for this long is
        cancelled (CANCELLED), freeing its slot and threads; a unary call whose request
        has not arrived this long after the call started is cancelled (CANCELLED). At
        most a week (``MAX_WAIT_SECONDS``).
    cache_size : fitted codecs kept loaded in memory (least recently used evicted).
    cache_bytes : memory those codecs may hold in all (their arrays, derived ones included);
        a codec larger than this is loaded for each call instead of kept.
    tls_cert, tls_key : PEM files; when both are set the server speaks TLS only.
    auth_token, auth_token_file : when set, every call except health checks must send
        metadata ``authorization: Bearer <token>``. The file form keeps the token out of
        the environment and process list; surrounding whitespace is stripped.
    metrics_port : serve Prometheus metrics over HTTP on this port (off when unset).
    grace_seconds : on SIGTERM, in-flight calls get this long to finish (at most a week).
    log_level, log_format : logging threshold and ``json`` (one object per line) or ``text``.
    access_log : one INFO line per finished RPC (method, status, duration, request id).
    """

    model_config = SettingsConfigDict(env_prefix="EMBCOMP_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    store: Path = Path("store")
    max_message_bytes: int = Field(default=64 * MiB, ge=MiB, le=2**31 - 1)
    max_rows_per_request: int = Field(default=262_144, ge=1)
    max_fit_bytes: int = Field(default=1024 * MiB, ge=1)
    max_concurrent_fits: int = Field(default=2, ge=1)
    max_eval_pairs: int = Field(default=1 << 27, ge=1)
    max_eval_k: int = Field(default=1024, ge=1)
    max_dims: int = Field(default=16384, ge=1)
    max_workers: int = Field(default=16, ge=1)
    stream_idle_seconds: float = Field(default=60.0, gt=0, le=MAX_WAIT_SECONDS)
    cache_size: int = Field(default=32, ge=1)
    cache_bytes: int = Field(default=1 << 30, ge=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    grace_seconds: float = Field(default=10.0, ge=0, le=MAX_WAIT_SECONDS)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True

    @model_validator(mode="after")
    def _check_pairs(self) -> ServiceConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files), or neither")
        for name in ("tls_cert", "tls_key", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("set auth_token or auth_token_file, not both")
        return self

    def token(self) -> str | None:
        """The bearer token clients must send, or ``None`` when auth is off."""
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text(encoding="utf-8").strip()
        elif self.auth_token is not None:
            token = self.auth_token.get_secret_value().strip()
        else:
            return None
        if not token:
            raise InputError("the configured auth token is empty; set a non-empty token")
        return token

    @property
    def max_artifact_bytes(self) -> int:
        """Largest codec artifact a message carries: what ExportCodec can return (and
        ImportCodec receive)."""
        return self.max_message_bytes - ENVELOPE_BYTES

    @property
    def max_stored_artifact_bytes(self) -> int:
        """Largest codec artifact the store keeps: what a fit may build, or an import send.

        A fit's artifact may be over the message limit (``rot`` or full ``pca`` on
        4096-dim vectors: 64 MiB and a few KiB): the codec encodes and decodes; only
        ExportCodec refuses it, saying to raise the limit or copy the store's file.
        """
        return max(self.max_fit_bytes, self.max_artifact_bytes)

    @property
    def address(self) -> str:
        """``host:port`` for binding, with IPv6 hosts bracketed."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


def load_config(**overrides: object) -> ServiceConfig:
    """Build the config from the environment plus ``overrides`` (``None`` values ignored).

    Raises ``InputError`` with one line per bad setting instead of pydantic's report.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return ServiceConfig(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InputError(f"invalid service settings: {problems}") from None
