"""Generate ``embcomp/v1`` (Python messages, gRPC stubs, type stubs) from ``proto/``.

The one way generated code is produced; nobody edits ``embcomp/v1`` by hand.

    python scripts/gen_proto.py              # regenerate in place (what `make proto` runs)
    python scripts/gen_proto.py --out DIR    # write DIR/embcomp/v1/... (the drift test)

The generated code is committed, so installing embcomp needs no protoc or grpcio-tools;
``tests/test_service_proto.py`` regenerates into a temporary directory and fails if
the committed files differ. Because ``proto/`` mirrors the package path
(``proto/embcomp/v1/*.proto``, package ``embcomp.v1``), protoc already writes imports
as ``from embcomp.v1 import types_pb2``: no import rewriting is needed.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PACKAGE = Path("embcomp") / "v1"

INIT = '''"""Generated gRPC code for package ``embcomp.v1``: do not edit; run scripts/gen_proto.py.

Sources: proto/embcomp/v1/*.proto.
"""
'''


def proto_files() -> list[Path]:
    """The .proto sources, relative to ``proto/``, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc on every source into ``out``; return the files written under ``out``."""
    from grpc_tools import protoc  # dev-only dependency (grpcio-tools)

    target = out / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*_pb2*.py*"):
        stale.unlink()
    well_known = resources.files("grpc_tools") / "_proto"
    with resources.as_file(well_known) as include:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(p) for p in proto_files()),
        ]
        status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    (target / "__init__.py").write_text(INIT)
    return sorted(p.relative_to(out) for p in target.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write embcomp/v1 under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
