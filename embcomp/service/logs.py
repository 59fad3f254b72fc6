"""Structured logging: one JSON object per line, carrying the current request id.

The request id comes from the caller's ``x-request-id`` metadata when it sends a sane
one, else it is generated; it is returned in the trailing metadata and appears on every
log line written while the RPC runs (a context variable, set per call).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["REQUEST_ID", "JsonFormatter", "access_logger", "configure_logging", "logger"]

logger = logging.getLogger("embcomp.service")
# One INFO line per finished RPC; a child of ``logger``, so it shares its handler.
access_logger = logging.getLogger("embcomp.service.access")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "embcomp_request_id", default=None
)

# Attributes every LogRecord has; anything else was passed with extra={...}.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format records as JSON: time, level, logger, message, request id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and k[0] != "_"
        )
        request_id = REQUEST_ID.get()
        prefix = f"[{request_id}] " if request_id else ""
        return f"{prefix}{base} {extras}".rstrip()


def configure_logging(level: str = "INFO", fmt: str = "json", access_log: bool = True) -> None:
    """Send the service's logs to stderr in ``fmt`` (``json`` or ``text``) at ``level``.

    ``access_log=False`` silences the per-RPC lines but keeps the rest at ``level``.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    access_logger.setLevel(logging.NOTSET if access_log else logging.WARNING)
