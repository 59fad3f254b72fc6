"""`embcomp serve` as a real process: env config, health, metrics, JSON logs, SIGTERM drain."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from service_helpers import running_server

from embcomp import InputError
from embcomp.cli import main as cli_main
from embcomp.client import CompressionClient, ServiceError
from embcomp.service.config import load_config
from embcomp.service.convert import array_to_matrix
from embcomp.service.server import create_server
from embcomp.v1 import compression_service_pb2 as pb


class ServerProcess:
    """`python -m embcomp serve` with its stderr (JSON log lines) read on a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embcomp", "serve", *args],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(json.loads(line))  # every line must be one JSON object

    def wait_for(self, message: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(entry)
            if entry["message"] == message:
                return entry

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_serve_process_health_metrics_logs_and_sigterm_drain(tmp_path, sample, capsys):
    base = sample[0]
    store = tmp_path / "store"
    env = {"EMBCOMP_STORE": str(store), "EMBCOMP_PORT": "0", "EMBCOMP_GRACE_SECONDS": "60"}
    server = ServerProcess(["--metrics-port", "0", "--log-format", "json"], env)
    try:
        ready = server.wait_for("serving")
        port = int(ready["address"].rsplit(":", 1)[1])
        assert ready["store"] == str(store.resolve()) and ready["codecs"] == 0
        target = f"127.0.0.1:{port}"

        assert cli_main(["health", "--target", target]) == 0
        assert "SERVING" in capsys.readouterr().out

        with CompressionClient(target) as client:
            assert client.list() == []
        text = _metrics(ready["metrics_port"])
        assert 'embcomp_requests_total{method="ListCodecs"} 1.0' in text
        assert "embcomp_request_duration_seconds_bucket" in text

        # A fit in flight when SIGTERM arrives must complete.
        release = threading.Event()
        outcome: dict[str, object] = {}

        def messages():
            yield pb.FitCodecRequest(header=pb.FitCodecHeader(spec="int8"))
            yield pb.FitCodecRequest(chunk=array_to_matrix(base[:500]))
            release.wait(60)
            yield pb.FitCodecRequest(chunk=array_to_matrix(base[500:1000]))

        def fit() -> None:
            with CompressionClient(target) as client:
                try:
                    outcome["reply"] = client._call(client._stub.FitCodec, messages())
                except ServiceError as exc:
                    outcome["error"] = exc

        worker = threading.Thread(target=fit)
        worker.start()
        deadline = time.monotonic() + 60
        uploading = f"embcomp_fit_upload_bytes {float(base[:500].nbytes)}"
        while uploading not in _metrics(ready["metrics_port"]):
            assert time.monotonic() < deadline, "the fit's upload never started"
            time.sleep(0.02)  # synchronization only: wait until the fit is in flight
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_for("draining")["grace_seconds"] == 60
        with CompressionClient(target, timeout=10) as late:  # new calls are refused
            with pytest.raises(ServiceError) as refused:
                late.list()
            # Refused either way: UNAVAILABLE once the listener is gone; gRPC core
            # cancels a call that raced the shutdown onto an accepted connection
            # (about 1 run in 10 here).
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert uploading in _metrics(ready["metrics_port"])  # still up while draining
        release.set()
        worker.join(60)
        assert "error" not in outcome, outcome.get("error")
        codec_id = outcome["reply"].codec.id
        server.wait_for("stopped")
        assert server.proc.wait(60) == 0
        assert (store / f"{codec_id}.codec").exists()

        rpc_lines = [e for e in server.seen if e["message"] == "rpc"]
        assert {e["method"] for e in rpc_lines} >= {"ListCodecs", "FitCodec"}
        for entry in rpc_lines:
            assert entry["code"] == "OK" and len(entry["request_id"]) == 16
            assert entry["duration_ms"] >= 0 and "time" in entry and entry["level"] == "INFO"
    finally:
        release_all = locals().get("release")
        if release_all is not None:
            release_all.set()
        server.close()


def test_health_fails_when_nothing_listens(capsys):
    with running_server_port_closed() as port:
        assert cli_main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


class running_server_port_closed:
    """A port that was just bound and released: nothing listens there."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


def test_config_from_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBCOMP_PORT", "6123")
    monkeypatch.setenv("EMBCOMP_MAX_ROWS_PER_REQUEST", "77")
    monkeypatch.setenv("EMBCOMP_STORE", str(tmp_path))
    config = load_config(port=None, max_concurrent_fits=5)
    assert (config.port, config.max_rows_per_request, config.max_concurrent_fits) == (6123, 77, 5)
    assert config.store == tmp_path and config.max_message_bytes == 64 << 20
    assert load_config(port=7000).port == 7000  # a flag beats the environment
    monkeypatch.setenv("EMBCOMP_AUTH_TOKEN", "abc")
    assert load_config().token() == "abc"


def test_every_setting_has_a_flag():
    """The config promises an ``embcomp serve --<field>`` flag for every field (the token
    itself only as a file or variable, to keep it out of the process list)."""
    from embcomp.service.cli import _SERVE_FLAGS, _SERVE_SWITCHES
    from embcomp.service.config import ServiceConfig

    flags = {name.replace("-", "_") for name in (*_SERVE_FLAGS, *_SERVE_SWITCHES)}
    assert set(ServiceConfig.model_fields) - {"auth_token"} <= flags


def test_defaults_need_nothing_else(monkeypatch):
    for name in list(os.environ):
        if name.startswith("EMBCOMP_") and name != "EMBCOMP_THREADS":
            monkeypatch.delenv(name)
    config = load_config()
    assert (config.host, config.port, str(config.store)) == ("127.0.0.1", 50051, "store")
    assert config.token() is None and config.tls_cert is None and config.metrics_port is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "tls_cert"),
        (["--tls-cert", __file__], "both tls_cert and tls_key"),
        (["--port", "70000"], "port"),
        (["--log-format", "xml"], "log_format"),
    ],
)
def test_bad_settings_exit_2_with_one_line(argv, message, capsys):
    assert cli_main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embcomp serve: error: invalid service settings") and message in err
    assert len(err.splitlines()) == 1


def test_busy_port_is_a_clear_error(tmp_path):
    with running_server(tmp_path / "a") as first:
        with pytest.raises(InputError, match="cannot listen"):
            create_server(load_config(port=first.port, store=tmp_path / "b"))
