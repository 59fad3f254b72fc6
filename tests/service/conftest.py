"""Fixtures for the service tests: real servers on loopback ports, real store directories."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from embcomp.client import CompressionClient
from embcomp.sample import load_sample
from embcomp.service.config import ServiceConfig
from embcomp.service.server import EmbcompServer, create_server
from embcomp.v1 import compression_service_pb2_grpc as pb_grpc


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


@pytest.fixture(scope="session")
def sample() -> tuple[np.ndarray, np.ndarray]:
    """The bundled real sample: base float32 (3000, 384), queries float32 (200, 384)."""
    return load_sample()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbcompServer]:
    with running_server(tmp_path_factory.mktemp("store")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: EmbcompServer) -> Iterator[CompressionClient]:
    with CompressionClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: EmbcompServer) -> Iterator[pb_grpc.CompressionServiceStub]:
    """The raw generated stub, for hand-built (and deliberately bad) messages."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.CompressionServiceStub(channel)
