"""Helpers shared by the service tests (a module name no other test folder uses)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embcomp.service.config import ServiceConfig
from embcomp.service.server import EmbcompServer, create_server


@contextlib.contextmanager
def running_server(store: Path, **settings: Any) -> Iterator[EmbcompServer]:
    """A started server on a free loopback port; stopped (no grace) on exit."""
    config = ServiceConfig(host="127.0.0.1", port=0, store=store, **settings)
    server, _ = create_server(config)
    server.start()
    try:
        yield server
    finally:
        server.stop(0).wait()


def store_snapshot(store: Path) -> dict[str, str]:
    """File name -> sha256 of every file in a store directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.iterdir())}
