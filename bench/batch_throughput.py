"""Throughput and memory of ``embcomp compress`` (local engine) on an input of several GB.

Generates a float32 ``.npy`` of at least ``--gb`` GB (real all-MiniLM-L6-v2 embeddings
from ``../shared/data/wordnet-minilm`` with small seeded perturbations, renormalized,
or seeded Gaussian unit vectors when that data is absent), fits each codec on a
streamed sample, then for each codec alternates, ``--repeats`` times:

- baseline: ``Codec.encode`` in-process on the memory-mapped file (page cache warm),
- engine: ``embcomp compress -c CODEC INPUT OUTPUT -q`` (the CLI's ``main``),

each in a fresh subprocess that reports its own peak RSS (``VmHWM``: the high-water
mark of resident memory, file-backed mapped pages included). Reports medians:
vectors/s of both, their ratio, and peak RSS. The input and outputs live under
``--workdir`` (default ``/tmp``) and are deleted at the end unless ``--keep``.

    python bench/batch_throughput.py --gb 4 --spec pca192,int8 --spec int8 --repeats 3

This is a benchmark, not a test: the machine it runs on is shared, so read the ratio
(both sides measured in the same run, interleaved) rather than the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_BASE = REPO.parent / "shared" / "data" / "wordnet-minilm" / "base.npy"


def generate(path: Path, n: int, d: int, seed: int) -> str:
    """Write an (n, d) float32 .npy chunk by chunk (memory: one chunk). Returns its origin."""
    rng = np.random.default_rng(seed)
    real = np.load(REAL_BASE) if REAL_BASE.exists() else None
    origin = "gaussian"
    if real is not None and real.shape[1] == d:
        origin = f"perturbed {REAL_BASE.parent.name}"
    chunk = 50_000
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
        )
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            if origin == "gaussian":
                block = rng.standard_normal((rows, d), dtype=np.float32)
            else:
                assert real is not None
                picks = rng.integers(0, real.shape[0], rows)
                block = real[picks] + rng.normal(0, 0.01, (rows, d)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            block.astype("<f4", copy=False).tofile(handle)
    return origin


def warm(path: Path) -> None:
    """Read the file once so both sides start from the page cache."""
    with open(path, "rb") as handle:
        while handle.read(64 << 20):
            pass


def run_worker(args: list[str]) -> dict:
    """Run this script in worker mode; return its JSON result."""
    # Not the parent's rusage: a child's ru_maxrss starts from the parent's at fork.
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def worker(mode: str, codec_path: str, input_path: str, output_path: str) -> None:
    import embcomp
    from embcomp.cli import main

    if mode == "baseline":
        codec = embcomp.load_codec(codec_path)
        X = np.load(input_path, mmap_mode="r")
        start = time.perf_counter()
        codes = codec.encode(X)
        seconds = time.perf_counter() - start
        rows = codes.shape[0]
    elif mode == "read":
        from embcomp.batch import iter_blocks

        start = time.perf_counter()
        blocks = iter_blocks(input_path, column="emb", check_finite=False)
        rows = sum(block.data.shape[0] for block in blocks)
        seconds = time.perf_counter() - start
    else:
        argv = ["compress", "-c", codec_path, input_path, output_path, "-q", "--overwrite"]
        if input_path.endswith(".parquet"):
            argv += ["--column", "emb", "--id-column", "id"]
        start = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - start
        if code != 0:
            sys.exit(code)
        if output_path.endswith(".npy"):
            rows = np.load(output_path, mmap_mode="r").shape[0]
        else:
            import pyarrow.parquet as pq

            rows = pq.read_metadata(output_path).num_rows
    result = {"mode": mode, "rows": rows, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(result))


def to_parquet(source: Path, path: Path, row_group_size: int) -> None:
    """The same vectors as Parquet: int64 id + fixed_size_list<float32> ``emb``, snappy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = np.load(source, mmap_mode="r")
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), X.shape[1]))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, X.shape[0], row_group_size):
            block = np.ascontiguousarray(X[start : start + row_group_size])
            emb = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), X.shape[1])
            ids = pa.array(np.arange(start, start + block.shape[0]))
            writer.write_table(pa.Table.from_arrays([ids, emb], schema=schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=4.0, help="input size in GB (>= 4 for CI)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--spec", action="append", help="codec spec (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parquet",
        action="store_true",
        help="also compress the same vectors stored as Parquet (row groups of 131072)",
    )
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import embcomp
    from embcomp.batch import sample_vectors

    specs = args.spec or ["pca192,int8", "int8", "fp8"]
    n = int(np.ceil(args.gb * 1e9 / (4 * args.dim)))
    work = Path(tempfile.mkdtemp(prefix="embcomp-batch-bench-", dir=args.workdir))
    try:
        inputs = {"npy": work / "input.npy"}
        began = time.perf_counter()
        origin = generate(inputs["npy"], n, args.dim, args.seed)
        if args.parquet:
            inputs["parquet"] = work / "input.parquet"
            to_parquet(inputs["npy"], inputs["parquet"], 131_072)
        sizes = ", ".join(f"{k} {v.stat().st_size / 1e9:.2f} GB" for k, v in inputs.items())
        print(
            f"input: {n:,} x {args.dim} float32 ({origin}): {sizes}, generated in "
            f"{time.perf_counter() - began:.0f} s; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        table = []
        readers: list[int] = []
        for spec in specs:
            train, _ = sample_vectors(inputs["npy"], 20_000, seed=args.seed)
            codec_path = work / f"{spec.replace(',', '-')}.codec"
            embcomp.save_codec(embcomp.make_codec(spec).fit(train), codec_path)
            modes = {"baseline": inputs["npy"], "engine": inputs["npy"]}
            if args.parquet:
                modes["engine-parquet"] = inputs["parquet"]
                modes["read"] = inputs["parquet"]  # the reader alone, for context
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode, source in modes.items():  # interleaved, so load drifts hit all
                    warm(source)
                    output = work / f"codes.{source.suffix[1:]}"
                    result = run_worker([mode, str(codec_path), str(source), str(output)])
                    assert result["rows"] == n, result
                    runs[mode].append(result)
                    output.unlink(missing_ok=True)
            rates = {m: [n / r["seconds"] for r in runs[m]] for m in runs}
            readers += [round(x) for x in rates.get("read", [])]
            print(f"{spec}: " + "; ".join(f"{m} {[round(x) for x in rates[m]]}" for m in rates))
            for mode in modes:
                if mode in ("baseline", "read"):
                    continue
                # Ratio of each interleaved pair, then the median: robust to load drift.
                ratios = [e / b for e, b in zip(rates[mode], rates["baseline"], strict=True)]
                table.append(
                    (
                        spec,
                        "npy" if mode == "engine" else "parquet",
                        statistics.median(rates["baseline"]),
                        statistics.median(rates[mode]),
                        statistics.median(ratios),
                        max(r["peak_rss_mb"] for r in runs["baseline"]),
                        max(r["peak_rss_mb"] for r in runs[mode]),
                    )
                )
        print()
        print(
            "| spec | input | Codec.encode vec/s | compress vec/s | ratio (median of pairs) "
            "| peak RSS encode MB | peak RSS compress MB |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for spec, fmt, base, engine, ratio, base_rss, engine_rss in table:
            print(
                f"| {spec} | {fmt} | {base:,.0f} | {engine:,.0f} | {ratio:.0%} | "
                f"{base_rss:,.0f} | {engine_rss:,.0f} |"
            )
        if readers:
            print(f"\nParquet reader alone (pyarrow decode, no encoding): {readers} vectors/s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
