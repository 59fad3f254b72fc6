"""``embcomp serve`` and ``embcomp health``: registered into the core CLI.

Imports nothing heavy at module level (grpc loads only when a command runs), so
``embcomp --help`` works without the ``service`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]

# flag -> (type, help); each is also the EMBCOMP_<FLAG> environment variable.
_SERVE_FLAGS: dict[str, tuple[Any, str]] = {
    "host": (str, "address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)"),
    "port": (int, "gRPC port (default 50051; 0 picks a free one)"),
    "store": (Path, "codec store directory, created if missing (default ./store)"),
    "metrics-port": (int, "serve Prometheus /metrics on this HTTP port (default off)"),
    "tls-cert": (Path, "PEM certificate; with --tls-key the server speaks TLS only"),
    "tls-key": (Path, "PEM private key for --tls-cert"),
    "auth-token-file": (Path, "file holding the bearer token every call must send"),
    "max-message-bytes": (int, "largest gRPC message in or out (default 64 MiB)"),
    "max-rows-per-request": (int, "most vectors or codes per request message (default 262144)"),
    "max-fit-bytes": (
        int,
        "most float32 training bytes per fit, and the largest d x d float64 matrix a fit "
        "builds (default 1 GiB)",
    ),
    "max-concurrent-fits": (int, "fits allowed at once (default 2)"),
    "max-eval-pairs": (
        int,
        "most work one EvaluateCodec does: queries x (base rows + 32 x k) (default 2**27)",
    ),
    "max-eval-k": (int, "largest k EvaluateCodec accepts (default 1024)"),
    "max-dims": (int, "widest vectors a codec may take, fitted or imported (default 16384)"),
    "max-workers": (
        int,
        "service and reflection calls served at once, those whose request is still "
        "arriving included; more get RESOURCE_EXHAUSTED (default 16; health checks "
        "have 2 threads of their own)",
    ),
    "stream-idle-seconds": (
        float,
        "end a streaming call whose client sends nothing, or reads no response, for "
        "this long, and a call whose request has not arrived by then (default 60, at "
        "most 604800: a week)",
    ),
    "cache-size": (int, "loaded codecs kept in memory (default 32)"),
    "cache-bytes": (int, "memory the loaded codecs kept may hold in all (default 1 GiB)"),
    "grace-seconds": (
        float,
        "on SIGTERM, time in-flight calls get to finish (default 10, at most 604800)",
    ),
    "log-level": (str.upper, "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    "log-format": (str, "json or text (default json)"),
}
# on/off flags: --access-log / --no-access-log
_SERVE_SWITCHES: dict[str, str] = {
    "access-log": "one log line per finished RPC (default on)",
}


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the gRPC compression service",
        description=(
            "Run the embcomp gRPC service. Every flag can also be set as an EMBCOMP_* "
            "environment variable (e.g. EMBCOMP_PORT, EMBCOMP_AUTH_TOKEN); flags win."
        ),
    )
    for flag, (kind, text) in _SERVE_FLAGS.items():
        serve.add_argument(f"--{flag}", type=kind, default=None, help=text)
    for flag, text in _SERVE_SWITCHES.items():
        serve.add_argument(
            f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=text
        )
    serve.set_defaults(func=_cmd_serve)

    check = subparsers.add_parser(
        "health", help="ask a running service's gRPC health service; exit 0 if SERVING"
    )
    check.add_argument(
        "--target",
        default=None,
        help="host:port (default: where `embcomp serve` listens with the same EMBCOMP_* settings)",
    )
    check.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM root to verify a TLS server with"
    )
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    check.set_defaults(func=_cmd_health)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .server import serve

    names = [flag.replace("-", "_") for flag in (*_SERVE_FLAGS, *_SERVE_SWITCHES)]
    overrides = {name: getattr(args, name) for name in names}
    return serve(load_config(**overrides))


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .config import load_config

    config = load_config()
    # Reach the server `embcomp serve` would start with the same environment.
    host = config.host if config.host not in ("0.0.0.0", "::", "[::]", "") else "127.0.0.1"
    target = args.target or load_config(host=host).address
    ca = args.tls_ca or config.tls_cert
    if ca is not None:
        channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        )
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
