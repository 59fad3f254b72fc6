"""Fixtures for the service tests: real servers on loopback ports, real store directories."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from service_helpers import running_server

from embcomp.client import CompressionClient
from embcomp.sample import load_sample
from embcomp.service.server import EmbcompServer
from embcomp.v1 import compression_service_pb2_grpc as pb_grpc


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
