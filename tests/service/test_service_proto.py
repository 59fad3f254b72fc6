"""The proto contract: generated code matches the sources, buf-style rules hold."""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_matches_a_fresh_generation(tmp_path):
    written = _gen_proto().generate(tmp_path)
    fresh = {p.name: (tmp_path / p).read_bytes() for p in written}
    committed_dir = REPO / "embcomp" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"embcomp/v1 is out of date or hand-edited: {stale}; run `make proto`"


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("desc") / "set.pb"
    sources = [str(p) for p in _gen_proto().proto_files()]
    with resources.as_file(resources.files("grpc_tools") / "_proto") as include:
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ]
        )
    assert status == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _elements(file: descriptor_pb2.FileDescriptorProto):
    """(path, name) of every message, field, enum, enum value, service and method."""

    def messages(items, path):
        for i, message in enumerate(items):
            here = (*path, i)
            yield here, message.name
            for j, field in enumerate(message.field):
                yield (*here, 2, j), f"{message.name}.{field.name}"
            yield from messages(
                [m for m in message.nested_type if not m.options.map_entry], (*here, 3)
            )
            yield from enums(message.enum_type, (*here, 4))

    def enums(items, path):
        for i, enum in enumerate(items):
            yield (*path, i), enum.name
            for j, value in enumerate(enum.value):
                yield (*path, i, 2, j), value.name

    yield from messages(file.message_type, (4,))
    yield from enums(file.enum_type, (5,))
    for i, service in enumerate(file.service):
        yield (6, i), service.name
        for j, method in enumerate(service.method):
            yield (6, i, 2, j), method.name


def test_every_element_has_a_comment(descriptors):
    missing = []
    for file in descriptors:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        missing += [
            f"{file.name}: {name}" for path, name in _elements(file) if not comments.get(path)
        ]
    assert missing == []


def test_buf_style(descriptors):
    for file in descriptors:
        assert file.package == "embcomp.v1" and file.name.startswith("embcomp/v1/")
        enums = list(file.enum_type)
        for message in file.message_type:
            enums += list(message.enum_type)
        for enum in enums:
            zero = enum.value[0]
            assert zero.number == 0 and zero.name.endswith("_UNSPECIFIED"), enum.name
        for service in file.service:
            assert service.name == "CompressionService"
            inputs = [m.input_type for m in service.method]
            assert len(set(inputs)) == len(inputs), "a request message is shared between RPCs"
            for method in service.method:
                assert method.input_type == f".embcomp.v1.{method.name}Request"
                assert method.output_type == f".embcomp.v1.{method.name}Response"


def test_matrix_carries_bytes_not_repeated_floats(descriptors):
    types = next(f for f in descriptors if f.name == "embcomp/v1/types.proto")
    matrix = next(m for m in types.message_type if m.name == "Matrix")
    kinds = {f.name: f.type for f in matrix.field}
    assert kinds["data"] == descriptor_pb2.FieldDescriptorProto.TYPE_BYTES


def test_generated_package_imports_as_embcomp_v1():
    from embcomp.v1 import compression_service_pb2_grpc

    assert hasattr(compression_service_pb2_grpc, "CompressionServiceStub")
    assert "embcomp.v1.types_pb2" in sys.modules
