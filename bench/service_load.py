"""Bounded loopback load on the gRPC service, measured against in-process encoding.

    python bench/service_load.py [--spec int8 --spec fp8 --spec pca192,fp8] [--json out.json]

Starts ``embcomp serve`` as a separate process (default settings: JSON access log at
INFO, no auth, plaintext) on a free loopback port, warms it up for a few seconds, then
for each spec:

* Encode throughput, MB/s of float32 input, with ~4 MiB batches through
  ``CompressionClient.encode`` (one unary Encode per batch) at 1 and 2 requests in flight,
  against ``Codec.encode`` of the same batches in this process. Service and in-process
  runs are interleaved repeat by repeat (the machine is shared, so timings are noisy);
  the table reports medians and the median of the per-repeat ratios.
* Single-vector Encode latency p50/p99 over sequential calls (and in-process for scale).
* Errors (failed calls) and mismatches (service codes not byte-identical to in-process
  codes): both must be zero.

If FAISS is installed, ``sa_encode`` of the same batches with SQ8 is timed as a reference
row (in-process, same run). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import embcomp
from embcomp.client import CompressionClient, ServiceError

SHARED_BASE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet-minilm" / "base.npy"
)
MiB = 1 << 20


def load_vectors(path: str | None) -> tuple[np.ndarray, str]:
    """float32 (n, d) vectors: ``path``, else the shared wordnet-minilm base, else the sample."""
    if path:
        return np.ascontiguousarray(np.load(path), dtype=np.float32), path
    if SHARED_BASE.exists():
        return np.load(SHARED_BASE).astype(np.float32), "wordnet-minilm base (50000 x 384)"
    from embcomp.sample import load_sample

    base, _ = load_sample()
    return base, "bundled sample (3000 x 384)"


class ServerProcess:
    """``embcomp serve --port 0`` in a child process; its port read from the first log line."""

    def __init__(self, store: str, extra_args: list[str]) -> None:
        command = [sys.executable, "-m", "embcomp", "serve", "--port", "0", "--store", store]
        self.proc = subprocess.Popen(
            [*command, *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        first = json.loads(self.proc.stderr.readline())
        if first.get("message") != "serving":
            raise RuntimeError(f"server did not start: {first}")
        self.port = int(first["address"].rsplit(":", 1)[1])
        # Keep draining the access log so the pipe never blocks the server.
        self._drain = threading.Thread(target=self._discard, daemon=True)
        self._drain.start()

    def _discard(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_spec(
    client: CompressionClient,
    base: np.ndarray,
    spec: str,
    *,
    repeats: int,
    batches: int,
    batch_bytes: int,
    latency_calls: int,
    concurrency: tuple[int, ...],
) -> dict[str, Any]:
    d = base.shape[1]
    rows = max(1, batch_bytes // (4 * d))
    starts = [(i * rows) % max(1, base.shape[0] - rows) for i in range(batches)]
    work = [np.ascontiguousarray(base[s : s + rows]) for s in starts]
    megabytes = sum(w.nbytes for w in work) / 1e6

    codec = embcomp.make_codec(spec).fit(base[: min(base.shape[0], 20_000)])
    info = client.import_codec(codec)
    errors = mismatches = 0
    expected = [codec.encode(w) for w in work]

    def service_run(in_flight: int) -> float:
        nonlocal errors, mismatches

        def one(i: int) -> None:
            nonlocal errors, mismatches
            try:
                codes = client.encode(info.id, work[i])
            except ServiceError:
                errors += 1
                return
            mismatches += int(not np.array_equal(codes, expected[i]))

        with ThreadPoolExecutor(in_flight) as pool:
            return _timed(lambda: list(pool.map(one, range(len(work)))))

    service_run(max(concurrency))  # warm-up: connections, caches
    lib_rates: list[float] = []
    svc_rates: dict[int, list[float]] = {c: [] for c in concurrency}
    ratios: dict[int, list[float]] = {c: [] for c in concurrency}
    for _ in range(repeats):
        lib = megabytes / _timed(lambda: [codec.encode(w) for w in work])
        lib_rates.append(lib)
        for c in concurrency:
            svc = megabytes / service_run(c)
            svc_rates[c].append(svc)
            ratios[c].append(svc / lib)

    one_row = base[:1]
    for _ in range(100):
        client.encode(info.id, one_row)
    latencies = []
    for i in range(latency_calls):
        row = base[i % base.shape[0] : i % base.shape[0] + 1]
        start = time.perf_counter()
        try:
            codes = client.encode(info.id, row)
        except ServiceError:
            errors += 1
            continue
        latencies.append(time.perf_counter() - start)
        mismatches += int(not np.array_equal(codes, codec.encode(row)))
    local = [_timed(lambda: codec.encode(one_row)) for _ in range(latency_calls)]
    client.delete(info.id)
    return {
        "spec": spec,
        "code_size": codec.code_size,
        "batch_rows": rows,
        "batch_mib": rows * 4 * d / MiB,
        "inprocess_mb_s": float(np.median(lib_rates)),
        "service_mb_s": {c: float(np.median(v)) for c, v in svc_rates.items()},
        "ratio": {c: float(np.median(v)) for c, v in ratios.items()},
        "latency_ms_p50": float(np.percentile(latencies, 50) * 1e3),
        "latency_ms_p99": float(np.percentile(latencies, 99) * 1e3),
        "inprocess_latency_ms_p50": float(np.percentile(local, 50) * 1e3),
        "errors": errors,
        "mismatches": mismatches,
    }


def warm_up(client: CompressionClient, base: np.ndarray, batch_bytes: int, seconds: float) -> None:
    """Send batches for ``seconds`` first: the first seconds of a fresh server and channel
    (thread pools, HTTP/2 flow-control windows, the allocator) are slower than steady state."""
    codec = embcomp.make_codec("fp16").fit(base[:1000])
    info = client.import_codec(codec)
    batch = np.ascontiguousarray(base[: max(1, batch_bytes // (4 * base.shape[1]))])
    deadline = time.perf_counter() + seconds
    with ThreadPoolExecutor(2) as pool:
        while time.perf_counter() < deadline:
            list(pool.map(lambda _: client.encode(info.id, batch), range(4)))
    client.delete(info.id)


def faiss_reference(base: np.ndarray, batch_bytes: int, batches: int, repeats: int) -> float | None:
    """In-process FAISS SQ8 sa_encode MB/s on the same batch shape (None without FAISS)."""
    try:
        import faiss
    except ImportError:
        return None
    d = base.shape[1]
    rows = max(1, batch_bytes // (4 * d))
    index = faiss.index_factory(d, "SQ8")
    index.train(base[: min(base.shape[0], 20_000)])
    work = [np.ascontiguousarray(base[(i * rows) % max(1, base.shape[0] - rows) :][:rows])
            for i in range(batches)]  # fmt: skip
    megabytes = sum(w.nbytes for w in work) / 1e6
    rates = [megabytes / _timed(lambda: [index.sa_encode(w) for w in work]) for _ in range(repeats)]
    return float(np.median(rates))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", help="codec spec (repeatable)")
    parser.add_argument("--data", help=".npy float vectors (default: wordnet-minilm or sample)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=12, help="4 MiB batches per repeat")
    parser.add_argument("--batch-mib", type=float, default=4.0)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `embcomp serve` argument, e.g. --server-arg=--no-access-log (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    base, source = load_vectors(args.data)
    batch_bytes = int(args.batch_mib * MiB)
    concurrency = (1, 2)
    results = []
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(store, args.server_arg)
        try:
            with CompressionClient(f"127.0.0.1:{server.port}") as client:
                warm_up(client, base, batch_bytes, args.warmup_seconds)
                for spec in args.spec or ["int8", "fp8", "pca192,fp8"]:
                    results.append(
                        measure_spec(
                            client,
                            base,
                            spec,
                            repeats=args.repeats,
                            batches=args.batches,
                            batch_bytes=batch_bytes,
                            latency_calls=args.latency_calls,
                            concurrency=concurrency,
                        )
                    )
        finally:
            server.stop()
    faiss_rate = faiss_reference(base, batch_bytes, args.batches, args.repeats)

    print(
        f"data: {source}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
        f"python {platform.python_version()}; server args {args.server_arg or 'default'}"
    )
    print(
        f"{'spec':<12}{'batch':>9}{'in-proc MB/s':>14}{'svc x1 MB/s':>13}{'ratio':>7}"
        f"{'svc x2 MB/s':>13}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}{'mismatch':>9}"
    )
    for r in results:
        print(
            f"{r['spec']:<12}{r['batch_mib']:>7.2f}Mi{r['inprocess_mb_s']:>14.0f}"
            f"{r['service_mb_s'][1]:>13.0f}{r['ratio'][1]:>7.2f}"
            f"{r['service_mb_s'][2]:>13.0f}{r['ratio'][2]:>7.2f}"
            f"{r['latency_ms_p50']:>8.3f}{r['latency_ms_p99']:>8.3f}{r['errors']:>8d}"
            f"{r['mismatches']:>9d}"
        )
    if faiss_rate is not None:
        print(f"reference: FAISS SQ8 sa_encode in-process, same batches: {faiss_rate:.0f} MB/s")
    if args.json:
        record = {
            "data": source,
            "server_args": args.server_arg,
            "load_average": os.getloadavg()[0],
            "results": results,
            "faiss_sq8_mb_s": faiss_rate,
        }
        args.json.write_text(json.dumps(record, indent=2))
    failed = sum(r["errors"] + r["mismatches"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
