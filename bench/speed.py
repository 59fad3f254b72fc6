"""Encode/decode throughput of every embcomp quantizer, side by side with FAISS.

    python -m bench speed                      # 200,000 x 384 and 100,000 x 768, 5 runs
    python -m bench speed --shapes 20000x384 --repeats 3 --no-jit-cost

For each input shape it times, in the same process and interleaved run by run, in a
seeded random order each round (so a busy machine slows both sides alike, and no
method always runs right after the same neighbour):

* ``encode`` / ``decode`` of every registered embcomp quantizer and of
  ``pca{d/2},int8`` and ``pca{d/2},fp8``;
* FAISS ``sa_encode`` / ``sa_decode`` of the equivalent codec (int8 <-> SQ8,
  int4 <-> SQ4, fp16 <-> SQfp16, bf16 <-> SQbf16, pca{d/2},int8 <-> PCA{d/2},SQ8;
  pca{d/2},fp8 is compared with PCA{d/2},SQ8 too);
* the naive ml_dtypes cast (``X.astype(float8_e4m3fn)`` and back) for the float8 and
  float4 formats;
* encode and decode into reused output buffers, embcomp ``encode(X, out=codes)`` and
  ``decode(codes, out=buf)`` against FAISS ``sa_encode(x, codes)`` and
  ``sa_decode(codes, x)`` (fresh output memory costs page faults on both sides, which
  can hide or invent a difference between the codecs themselves).

Throughput is MB/s of float32 vectors (``n * d * 4`` bytes) per wall-clock second, the
median of ``--repeats`` runs; the CPU seconds of each run are recorded too. For inputs
smaller than ``--run-mb`` (256 MB) a run repeats each call back to back until it has
handled that much, the same number of calls for every method of the shape, and counts
the time per call (a 1,000-row call timed alone depends on what ran before it; see
:func:`calls_per_run`); the default shapes are timed one call per run. Every
method uses all the cores this process may use (embcomp's pool, FAISS's OpenMP). The
data are seeded synthetic unit-norm vectors with a decaying spectrum, like sentence
embeddings; ``--data`` uses a real ``.npy`` matrix instead (rows tiled to ``n``).

Writes one JSON record (all timings, medians, ratios, the targets of issue 7 and
whether each is met, machine and library versions) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from embcomp import _jit

DEFAULT_SHAPES = ("200000x384", "100000x768")
ORDER_SEED = 7  # the order methods run in, each round
FAISS_EQUIVALENT = {"int8": "SQ8", "int4": "SQ4", "fp16": "SQfp16", "bf16": "SQbf16"}
NAIVE_CAST = {"fp8": "float8_e4m3fn", "fp8e5m2": "float8_e5m2", "fp4": "float4_e2m1fn"}
TRAIN_ROWS = 20_000
RUN_MB = 256  # smaller inputs are timed in runs of back-to-back calls: calls_per_run


@dataclass
class Timing:
    """Wall and CPU seconds per call of repeated runs of one operation; each run makes
    ``calls`` calls back to back (see :func:`calls_per_run`)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls: int = 1

    def add(self, fn: Callable[[], Any]) -> None:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(self.calls):
            fn()
        self.wall.append((time.perf_counter() - wall0) / self.calls)
        self.cpu.append((time.process_time() - cpu0) / self.calls)

    def mb_per_s(self, nbytes: int) -> float:
        return nbytes / 1e6 / statistics.median(self.wall)

    def mb_per_cpu_s(self, nbytes: int) -> float:
        return nbytes / 1e6 / max(statistics.median(self.cpu), 1e-9)

    def record(self, nbytes: int) -> dict[str, Any]:
        return {
            "mb_per_s": round(self.mb_per_s(nbytes), 1),
            "wall_s": [round(t, 7) for t in self.wall],
            "cpu_s": [round(t, 7) for t in self.cpu],
            "mb_per_cpu_s": round(self.mb_per_cpu_s(nbytes), 1),
            "calls_per_run": self.calls,
        }


def settle(limit_s: float) -> None:
    """Wait, at most ``limit_s``, until this process's threads have used no CPU for a
    millisecond: FAISS's OpenMP threads keep spinning for a few ms after each call and
    take a core from whatever runs next (``--settle-ms``)."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        cpu = time.process_time()
        time.sleep(0.001)
        if time.process_time() - cpu < 0.0002:
            return


def calls_per_run(nbytes: int, run_mb: float) -> int:
    """Calls one timed run makes back to back for ``nbytes`` of float32 input: enough to
    handle ``run_mb`` MB (at most 1,000), 1 for inputs that large or when ``run_mb`` is 0.
    Every method of a shape makes the same number, so neither side gets more calls to
    spread a slow first one over.

    A short call timed alone depends on what ran just before it: FAISS's OpenMP threads
    keep spinning on the cores for a while after each call (libgomp's default wait
    policy), so a two-thread call that follows one finds its second core taken (1,000 x
    384 `pca192,int8` in bench/results: 0.69-0.72x FAISS timed one call at a time,
    0.81-0.96x in runs of back-to-back calls), while FAISS's next call finds its threads
    awake or asleep depending on the neighbour. A run of back-to-back calls measures
    what a stream of calls gets, which is how both are used; the first call of a run
    still pays for its neighbour.
    """
    if run_mb <= 0:
        return 1
    return max(1, min(1000, int(np.ceil(run_mb * 1e6 / max(nbytes, 1)))))


@dataclass
class Method:
    """Something with an encode and a decode to time: an embcomp codec, FAISS, a cast."""

    name: str
    family: str  # "embcomp", "faiss" or "naive"
    encode: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray], np.ndarray]
    # encode and decode into a caller's buffer (no fresh memory, so no page faults), if
    # it can: (input, out) -> out
    encode_into: Callable[[np.ndarray, np.ndarray], Any] | None = None
    decode_into: Callable[[np.ndarray, np.ndarray], Any] | None = None
    enc: Timing = field(default_factory=Timing)
    dec: Timing = field(default_factory=Timing)
    enci: Timing = field(default_factory=Timing)
    deci: Timing = field(default_factory=Timing)


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Seeded unit-norm float32 (n, d) rows with a power-law spectrum, made in blocks."""
    rng = np.random.default_rng(seed)
    scales = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    X = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 50_000):
        block = rng.standard_normal((min(50_000, n - start), d), dtype=np.float32)
        block = (block * scales) @ rotation + np.float32(0.05)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        X[start : start + block.shape[0]] = block
    return X


def from_file(path: str, n: int, d: int) -> np.ndarray:
    try:
        base = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SystemExit(f"--data {path}: not a readable .npy matrix ({exc})") from None
    if base.ndim != 2 or base.shape[1] != d:
        raise SystemExit(f"--data {path}: shape {base.shape} has not {d} columns")
    reps = -(-n // base.shape[0])
    return np.ascontiguousarray(np.tile(np.asarray(base, dtype=np.float32), (reps, 1))[:n])


def quantizer_names() -> list[str]:
    """Every registered quantizer stage that takes no argument."""
    from embcomp.codec import STAGE_FACTORIES
    from embcomp.spec import STAGES

    return [
        name
        for name, info in STAGES.items()
        if info.kind == "quantizer" and info.arg == "none" and name in STAGE_FACTORIES
    ]


def _casts(
    dtype: Any,
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """The naive float8/float4 round trip: ``X.astype(dtype)`` and back to float32."""

    def encode(X: np.ndarray) -> np.ndarray:
        return X.astype(dtype)

    def decode(C: np.ndarray) -> np.ndarray:
        return C.astype(np.float32)

    return encode, decode


def _numpy_path(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` run with embcomp's compiled kernels switched off (the numpy path)."""

    def call(X: np.ndarray) -> np.ndarray:
        old = _jit.set_enabled(False)
        try:
            return fn(X)
        finally:
            _jit.set_enabled(old)

    return call


def jit_cost() -> dict[str, Any]:
    """What the compiled kernels cost: install size, import time, first-call compile time.

    Measured in fresh processes: one with an empty numba cache (every kernel compiled),
    one reusing that cache (what every later process pays).
    """
    import importlib.util
    import shutil
    import tempfile

    if not _jit.AVAILABLE:
        return {"available": False}
    sizes = {}
    for name in ("numba", "llvmlite"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
            sizes[name] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    script = (
        "import time; t0 = time.perf_counter(); import numba; t1 = time.perf_counter()\n"
        "import numpy as np, embcomp\n"
        "X = np.random.default_rng(0).standard_normal((500, 33)).astype(np.float32)\n"
        "t2 = time.perf_counter()\n"
        "for s in ('fp16', 'bf16', 'fp8', 'fp8e5m2', 'fp4', 'int8', 'int4'):\n"
        "    c = embcomp.make_codec(s).fit(X); c.decode(c.encode(X))\n"
        "print(t1 - t0, time.perf_counter() - t2)\n"
    )
    cache = tempfile.mkdtemp(prefix="embcomp-numba-cache-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    times = []
    try:
        for _ in range(2):  # cold, then cached
            done = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
            )
            times.append([float(v) for v in done.stdout.split()])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    import numba

    return {
        "available": True,
        "numba": numba.__version__,
        "installed_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "import_numba_s": round(times[1][0], 3),
        "first_use_all_quantizers_cold_s": round(times[0][1], 2),
        "first_use_all_quantizers_cached_s": round(times[1][1], 2),
    }


def _encode_into(codec: Any, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    return codec.encode(X, out=out)  # type: ignore[no-any-return]


def _decode_into(codec: Any, codes: np.ndarray, out: np.ndarray) -> np.ndarray:
    return codec.decode(codes, out=out)  # type: ignore[no-any-return]


FLOOR = "fresh output: page faults only"


def _fault_pages(d: int) -> Callable[[np.ndarray], np.ndarray]:
    """The floor under any decode into fresh memory: allocate its (n, d) float32 output
    and write one float per 4 KiB page, on every thread (embcomp's pool, contiguous
    ranges), so the kernel faults in (and zeroes) every page and nothing else is done."""
    from embcomp._blocks import map_blocks

    def fault(codes: np.ndarray) -> np.ndarray:
        n = codes.shape[0]
        out = np.empty((n, d), dtype=np.float32)
        flat = out.reshape(-1)

        def work(start: int, stop: int, _scratch: Any) -> None:
            flat[start * d : stop * d : 1024] = 0.0

        map_blocks(n, max(1, (8 << 20) // (4 * d)), work, divisible=True)
        return out

    return fault


def build_methods(X: np.ndarray, train: np.ndarray, specs: Sequence[str]) -> list[Method]:
    import faiss
    import ml_dtypes

    from embcomp import make_codec

    d = X.shape[1]
    methods: list[Method] = []
    faiss_built: dict[str, Method] = {}
    for spec in specs:
        codec = make_codec(spec).fit(train)
        methods.append(
            Method(
                spec,
                "embcomp",
                codec.encode,
                codec.decode,
                partial(_encode_into, codec),
                partial(_decode_into, codec),
            )
        )
        if _jit.AVAILABLE and _jit.ENABLED:  # the same codec without the compiled kernels
            methods.append(
                Method(
                    f"{spec} (numpy)",
                    "embcomp-numpy",
                    _numpy_path(codec.encode),
                    _numpy_path(codec.decode),
                )
            )
        key = spec.split(",")[-1]
        factory = FAISS_EQUIVALENT.get(key) if "," not in spec else None
        if spec.startswith("pca") and spec.endswith((",int8", ",fp8")):
            factory = f"PCA{codec.d_out},SQ8"
        if factory and factory not in faiss_built:
            index = faiss.index_factory(d, factory)
            index.train(train)
            faiss_built[factory] = Method(
                factory, "faiss", index.sa_encode, index.sa_decode, index.sa_encode, index.sa_decode
            )
            methods.append(faiss_built[factory])
        if spec in NAIVE_CAST:
            dtype = getattr(ml_dtypes, NAIVE_CAST[spec])
            encode, decode = _casts(dtype)
            methods.append(Method(f"astype({NAIVE_CAST[spec]})", "naive", encode, decode))
    if "SQ8" not in faiss_built:  # the yardstick of the float8/float4 targets
        index = faiss.index_factory(d, "SQ8")
        index.train(train)
        methods.append(Method("SQ8", "faiss", index.sa_encode, index.sa_decode))
    # timed among the others, decode only (its encode just passes the rows on)
    methods.append(Method(FLOOR, "floor", lambda X: X, _fault_pages(d)))
    return methods


def counterpart(spec: str, d_half: int) -> str | None:
    if spec.startswith("pca") and spec.endswith((",int8", ",fp8")):
        return f"PCA{d_half},SQ8"
    return FAISS_EQUIVALENT.get(spec)


def run_shape(
    n: int,
    d: int,
    repeats: int,
    data: str | None,
    specs_filter: Sequence[str] | None,
    run_mb: float = 0.0,
    settle_ms: float = 0.0,
):
    X = from_file(data, n, d) if data else synthetic(n, d)
    train = np.ascontiguousarray(X[:TRAIN_ROWS])
    half = d // 2
    specs = quantizer_names() + [f"pca{half},int8", f"pca{half},fp8"]
    if specs_filter:
        unknown = [f for f in specs_filter if not any(f in (s, s.split(",")[-1]) for s in specs)]
        if unknown:
            raise SystemExit(f"--specs: {unknown} are not among the measured specs {specs}")
        specs = [s for s in specs if s in specs_filter or s.split(",")[-1] in specs_filter]
    methods = build_methods(X, train, specs)
    codes = {m.name: m.encode(X) for m in methods}  # warm-up; decode input
    # the buffers of encode_into and decode_into: one each per method, already written
    # once (no page faults left)
    code_buffers = {m.name: m.encode(X) for m in methods if m.encode_into}
    buffers = {m.name: m.decode(codes[m.name]) for m in methods if m.decode_into}
    calls = calls_per_run(X.nbytes, run_mb)
    for m in methods:
        m.enc.calls = m.dec.calls = m.enci.calls = m.deci.calls = calls
    # Interleaved: each run of every method sees the same load. Shuffled each round
    # (seeded): what runs just before a method matters (a big array freed just before
    # makes the next fresh output's page faults cheaper), so no method always follows
    # the same neighbour.
    rng = np.random.default_rng(ORDER_SEED)
    for _ in range(repeats):
        for index in rng.permutation(len(methods)):
            m = methods[index]
            runs = [(m.enc, partial(m.encode, X)), (m.dec, partial(m.decode, codes[m.name]))]
            if m.encode_into is not None:
                runs.append((m.enci, partial(m.encode_into, X, code_buffers[m.name])))
            if m.decode_into is not None:
                runs.append((m.deci, partial(m.decode_into, codes[m.name], buffers[m.name])))
            for timing, call in runs:
                if settle_ms:
                    settle(settle_ms / 1e3)
                timing.add(call)
    nbytes = X.nbytes
    by_name = {m.name: m for m in methods}
    rows = []
    for spec in specs:
        ours = by_name[spec]
        row: dict[str, Any] = {
            "spec": spec,
            "encode": ours.enc.record(nbytes),
            "decode": ours.dec.record(nbytes),
        }
        other = counterpart(spec, half)
        if other in by_name:
            theirs = by_name[other]
            row["faiss"] = {
                "factory": other,
                "encode": theirs.enc.record(nbytes),
                "decode": theirs.dec.record(nbytes),
            }
            row["encode_ratio"] = round(ours.enc.mb_per_s(nbytes) / theirs.enc.mb_per_s(nbytes), 3)
            row["decode_ratio"] = round(ours.dec.mb_per_s(nbytes) / theirs.dec.mb_per_s(nbytes), 3)
            # per CPU-second: robust to a busy machine, but FAISS's spinning OpenMP
            # threads bill it for waiting too
            row["encode_cpu_ratio"] = round(
                ours.enc.mb_per_cpu_s(nbytes) / theirs.enc.mb_per_cpu_s(nbytes), 3
            )
            row["decode_cpu_ratio"] = round(
                ours.dec.mb_per_cpu_s(nbytes) / theirs.dec.mb_per_cpu_s(nbytes), 3
            )
            for op, mine, their, can in (
                ("encode_into", ours.enci, theirs.enci, ours.encode_into and theirs.encode_into),
                ("decode_into", ours.deci, theirs.deci, ours.decode_into and theirs.decode_into),
            ):
                if can:
                    row[op] = mine.record(nbytes)
                    row["faiss"][op] = their.record(nbytes)
                    row[f"{op}_ratio"] = round(mine.mb_per_s(nbytes) / their.mb_per_s(nbytes), 3)
        plain = by_name.get(f"{spec} (numpy)")
        if plain is not None:
            row["numpy_path"] = {
                "encode": plain.enc.record(nbytes),
                "decode": plain.dec.record(nbytes),
            }
            if other in by_name:
                theirs = by_name[other]
                for op, mine, their in (
                    ("encode", plain.enc, theirs.enc),
                    ("decode", plain.dec, theirs.dec),
                ):
                    row["numpy_path"][f"{op}_ratio"] = round(
                        mine.mb_per_s(nbytes) / their.mb_per_s(nbytes), 3
                    )
        if spec in NAIVE_CAST:
            naive = by_name[f"astype({NAIVE_CAST[spec]})"]
            row["naive"] = {
                "cast": NAIVE_CAST[spec],
                "encode": naive.enc.record(nbytes),
                "decode": naive.dec.record(nbytes),
            }
            row["encode_vs_naive"] = round(
                ours.enc.mb_per_s(nbytes) / naive.enc.mb_per_s(nbytes), 3
            )
            row["decode_vs_naive"] = round(
                ours.dec.mb_per_s(nbytes) / naive.dec.mb_per_s(nbytes), 3
            )
        rows.append(row)
    sq8 = by_name["SQ8"].enc.record(nbytes)
    floor = by_name[FLOOR].dec
    return {
        "n": n,
        "d": d,
        "rows": rows,
        "faiss_sq8_encode_mb_per_s": sq8["mb_per_s"],
        "faiss_sq8_encode_mb_per_cpu_s": sq8["mb_per_cpu_s"],
        # allocating a fresh output and faulting in its pages, nothing else
        "fresh_output_floor": floor.record(nbytes),
        # that floor's share of FAISS SQ8's decode time (which writes a fresh output too)
        "fresh_output_floor_share_of_faiss_sq8_decode": round(
            statistics.median(floor.wall) / statistics.median(by_name["SQ8"].dec.wall), 3
        ),
        "targets": targets(rows, sq8, half),
    }


def per_round(ours: Sequence[float], theirs: Sequence[float], goal: float) -> dict[str, Any]:
    """The ratio of each round (their seconds over ours; both ran in that round, so a
    busy moment slows both): its quartiles and in how many rounds it reached ``goal``.
    The target itself is judged on the medians; this says how firmly."""
    ratios = sorted(t / o for o, t in zip(ours, theirs, strict=True) if o > 0)
    if not ratios:
        return {"met": 0, "of": 0}
    low, _, high = (
        statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    )
    return {
        "q1": round(low, 3),
        "q3": round(high, 3),
        "met": sum(r >= goal for r in ratios),
        "of": len(ratios),
    }


def targets(rows: list[dict[str, Any]], sq8: dict[str, Any], half: int) -> list[dict[str, Any]]:
    """The targets of issue 7: wall-clock value, whether it is met, per CPU-second, and the
    value on the numpy path (compiled kernels off) where that was measured."""
    out = []

    def add(
        target: str, row: dict[str, Any], op: str, yardstick: dict[str, Any] | None, goal: float
    ) -> None:
        """``row``'s ``op`` speed over the yardstick's (its FAISS counterpart when None)."""
        theirs = yardstick or row["faiss"][op]
        entry = {
            "target": target,
            "value": round(row[op]["mb_per_s"] / theirs["mb_per_s"], 3),
            "per_cpu_second": round(row[op]["mb_per_cpu_s"] / theirs["mb_per_cpu_s"], 3),
        }
        entry["met"] = entry["value"] >= goal
        entry["rounds"] = per_round(row[op]["wall_s"], theirs["wall_s"], goal)
        if "numpy_path" in row and op in row["numpy_path"]:
            entry["numpy_path_value"] = round(
                row["numpy_path"][op]["mb_per_s"] / theirs["mb_per_s"], 3
            )
        out.append(entry)

    for row in rows:
        spec = row["spec"]
        for op in ("encode", "decode"):
            if "faiss" in row and not spec.endswith(",fp8"):
                add(f"{spec} {op} >= 1.0x FAISS {row['faiss']['factory']}", row, op, None, 1.0)
        for op in ("encode", "decode"):
            if f"{op}_into" in row and not spec.endswith(",fp8"):
                add(
                    f"{spec} {op} into a buffer >= 1.0x FAISS {row['faiss']['factory']}",
                    row,
                    f"{op}_into",
                    None,
                    1.0,
                )
        if spec in ("fp8", "fp4"):
            for op in ("encode", "decode"):
                add(f"{spec} {op} >= FAISS SQ8 encode", row, op, sq8, 1.0)
        if spec == f"pca{half},fp8" and "faiss" in row:
            add(f"pca{half},fp8 encode >= 1.5x FAISS PCA{half},SQ8", row, "encode", None, 1.5)
    return out


def environment() -> dict[str, Any]:
    import faiss
    import ml_dtypes

    import embcomp
    from embcomp._blocks import can_limit_blas, default_threads

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        **cpu_description(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "embcomp_threads": default_threads(),
        "embcomp_blas_one_thread_per_worker": can_limit_blas(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "faiss": faiss.__version__,
        "embcomp": embcomp.__version__,
        "git_commit": commit,
        **blas_environment(),
    }


def cpu_description() -> dict[str, Any]:
    """``cpu`` (the model name) and ``cpu_detail``: family/model, widest vector
    instructions and L2 per core, which tell apart machines that share a model name
    (two "AMD EPYC" VMs here: a Zen 5 with AVX-512 and a Zen 3 without)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu": platform.processor(), "cpu_detail": {}}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in _VECTOR_ISA if flag in flags), "")
    detail: dict[str, Any] = {"vector_isa": isa}
    for key in ("cpu family", "model"):
        if fields.get(key, "").isdigit():
            detail[key.replace(" ", "_")] = int(fields[key])
    for cache in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (cache / "level").read_text().strip() == "2":
                detail["l2_per_core"] = (cache / "size").read_text().strip()
                break
        except OSError:
            continue
    return {"cpu": fields.get("model name", platform.processor()), "cpu_detail": detail}


_VECTOR_ISA = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def cpu_words(environment: dict[str, Any]) -> str:
    """'AMD EPYC (family 25 model 1, AVX2, L2 512K per core)'; records written before
    ``cpu_detail`` existed give the model name alone."""
    detail = environment.get("cpu_detail") or {}
    words = []
    if "cpu_family" in detail and "model" in detail:
        words.append(f"family {detail['cpu_family']} model {detail['model']}")
    if detail.get("vector_isa"):
        words.append(detail["vector_isa"])
    if detail.get("l2_per_core"):
        words.append(f"L2 {detail['l2_per_core']} per core")
    return environment["cpu"] + (f" ({', '.join(words)})" if words else "")


BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def blas_environment() -> dict[str, Any]:
    """``blas`` (:func:`blas_libraries`) and ``blas_env`` (the OPENBLAS_* variables set)
    for a benchmark record; FAISS must be imported first, to be listed."""
    return {
        "blas": blas_libraries(),
        "blas_env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ},
    }


def blas_libraries() -> list[dict[str, Any]]:
    """Every BLAS loaded in this process: whose it is, version, and the kernels it runs.

    The PCA rows time one matrix product on each side, each through its own library's
    BLAS (numpy's for embcomp, the one bundled in the FAISS wheel for FAISS). An
    OpenBLAS that does not know the CPU falls back to older kernels (FAISS 1.15's
    OpenBLAS 0.3.15 picks SSE-era "Barcelona" kernels on a Zen 5, numpy's 0.3.31
    AVX-512 "SkylakeX" ones), and ``OPENBLAS_CORETYPE`` overrides the choice; either
    way the comparison is only like for like when both sides run the same kernels.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # the bench extra brings it; without it the record says so
        return [{"error": "threadpoolctl is not installed: BLAS kernels unknown"}]
    found = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        path = str(info.get("filepath", ""))
        owner = next((name for name in ("faiss", "numpy", "scipy") if name in path.lower()), "")
        found.append(
            {
                "owner": owner or os.path.basename(path),
                "library": info.get("internal_api"),
                "version": info.get("version"),
                "architecture": info.get("architecture"),
                "threads": info.get("num_threads"),
            }
        )
    return found


def blas_sentence(environment: dict[str, Any]) -> str:
    """One line for the report: each side's BLAS kernels, and a warning if they differ."""
    libraries = [lib for lib in environment.get("blas", []) if "owner" in lib]
    if not libraries:
        return "BLAS kernels were not recorded (needs threadpoolctl). "
    text = "BLAS: " + "; ".join(
        f"{lib['owner']}'s {lib['library']} {lib['version']} runs {lib['architecture']} kernels"
        for lib in libraries
    )
    env = environment.get("blas_env") or {}
    text += " (" + (", ".join(f"{k}={v}" for k, v in env.items()) or "no OPENBLAS_* set") + "). "
    sides = {lib["owner"]: lib["architecture"] for lib in libraries}
    if "numpy" in sides and "faiss" in sides and sides["numpy"] != sides["faiss"]:
        text += (
            f"**Not like for like:** embcomp's matrix products run numpy's {sides['numpy']} "
            f"kernels and FAISS's run {sides['faiss']} kernels, so the PCA rows measure the "
            "two BLAS builds as much as the codecs (set OPENBLAS_CORETYPE to give both the "
            "same kernels). "
        )
    return text


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# embcomp encode/decode speed vs FAISS",
        "",
        f"`{record['command']}` on {cpu_words(record['environment'])}, "
        f"{record['environment']['cpus_usable']} CPUs (load average at start "
        f"{record['environment']['load_average']}); MB/s of float32 input/output, median of "
        f"{record['repeats']} interleaved runs, shuffled each round. "
        + _runs_sentence(record)
        + _settle_sentence(record)
        + "Ratio = embcomp / counterpart.",
        "",
        blas_sentence(record["environment"]).rstrip(),
    ]
    jit = record.get("jit", {})
    if jit.get("available") and "import_numba_s" in jit:
        lines += [
            "",
            f"Compiled kernels: numba {jit['numba']} (installed size "
            + ", ".join(f"{k} {v} MB" for k, v in jit["installed_mb"].items())
            + f"); `import numba` {jit['import_numba_s']} s; first use of every quantizer "
            f"{jit['first_use_all_quantizers_cold_s']} s with an empty numba cache (compiling), "
            f"{jit['first_use_all_quantizers_cached_s']} s from the cache. The numpy path "
            "(no numba, `EMBCOMP_JIT=0`) is timed in the same runs.",
        ]
    elif not jit.get("available"):
        lines += ["", "numba is not installed: every embcomp number is the numpy path."]
    for shape in record["shapes"]:
        lines += [
            "",
            f"## {shape['n']:,} x {shape['d']}",
            "",
            "| codec | encode MB/s | decode MB/s | counterpart | its encode | its decode "
            "| encode ratio | decode ratio | per-CPU-s enc ratio | per-CPU-s dec ratio "
            "| numpy path enc / dec MB/s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in shape["rows"]:
            cells = [row["spec"], row["encode"]["mb_per_s"], row["decode"]["mb_per_s"]]
            if "faiss" in row:
                other = row["faiss"]
                cells += [
                    f"FAISS {other['factory']}",
                    other["encode"]["mb_per_s"],
                    other["decode"]["mb_per_s"],
                    f"{row['encode_ratio']:.2f}",
                    f"{row['decode_ratio']:.2f}",
                    f"{row['encode_cpu_ratio']:.2f}",
                    f"{row['decode_cpu_ratio']:.2f}",
                ]
            elif "naive" in row:
                other = row["naive"]
                cells += [
                    f"astype({other['cast']})",
                    other["encode"]["mb_per_s"],
                    other["decode"]["mb_per_s"],
                    f"{row['encode_vs_naive']:.2f}",
                    f"{row['decode_vs_naive']:.2f}",
                    "",
                    "",
                ]
            else:
                cells += ["", "", "", "", "", "", ""]
            plain = row.get("numpy_path")
            cells.append(
                f"{plain['encode']['mb_per_s']} / {plain['decode']['mb_per_s']}" if plain else ""
            )
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += [
            "",
            f"FAISS SQ8 encode: {shape['faiss_sq8_encode_mb_per_s']} MB/s "
            f"({shape['faiss_sq8_encode_mb_per_cpu_s']} MB per CPU-second). "
            + _floor_sentence(shape)
            + "'Encode/decode into a buffer' reuses one output buffer on both sides "
            "(embcomp `encode(X, out=codes)` and `decode(codes, out=buf)`, FAISS "
            "`sa_encode(x, codes)` and `sa_decode(codes, x)`).",
            "",
        ]
        lines += [
            "Per round: each round's own ratio (the two sides ran in the same round), its "
            "middle half and the rounds that reached the target. Per CPU-second: the "
            "process's CPU time per call, which Linux brings up to date for threads other "
            "than the caller only at scheduler ticks and context switches; for calls of a "
            "few milliseconds or less it shows little more than the calling thread's time "
            "(FAISS's OpenMP runs 1,000-row calls on both cores, yet shows ~1 CPU-second per "
            "second there): read wall-clock.",
            "",
            "| target | wall-clock | met | per round | per CPU-second | numpy path (no numba) |",
            "|---|---:|---|---|---:|---:|",
        ]
        for t in shape["targets"]:
            plain = t.get("numpy_path_value")
            lines.append(
                f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else '**NO**'} "
                f"| {_rounds_text(t)} | {t['per_cpu_second']:.2f} "
                f"| {'' if plain is None else f'{plain:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def _runs_sentence(record: dict[str, Any]) -> str:
    """How many calls a run made (records before ``--run-mb`` timed one call)."""
    calls = sorted(
        {shape["rows"][0]["encode"].get("calls_per_run", 1) for shape in record["shapes"]}
    )
    if calls == [1]:
        return "Each run is one call. "
    return (
        f"A run repeats each call back to back until it has handled {record['run_mb']:g} MB "
        f"of input ({', '.join(map(str, calls))} calls per run here, the same for every "
        "method) and counts the time per call: a stream of calls, not one call timed "
        "between other methods' calls. "
    )


def _settle_sentence(record: dict[str, Any]) -> str:
    """Whether runs waited for the process to go idle (records before it did not)."""
    limit = record.get("settle_ms", 0)
    if not limit:
        return "Runs follow each other at once. "
    return (
        f"Before each run the benchmark waited (at most {limit:g} ms) until no thread of "
        "the process had used CPU for 1 ms: FAISS's OpenMP threads spin for a few ms "
        "after its calls and otherwise take a core from the next run. "
    )


def _rounds_text(target: dict[str, Any]) -> str:
    """``0.95-1.06, 7/15 met``: a target's per-round quartiles and hits (older records
    have none)."""
    rounds = target.get("rounds")
    if not rounds or "q1" not in rounds:
        return ""
    return f"{rounds['q1']:.2f}-{rounds['q3']:.2f}, {rounds['met']}/{rounds['of']} met"


def _floor_sentence(shape: dict[str, Any]) -> str:
    floor = shape.get("fresh_output_floor")
    if floor is None:  # a record written before the floor was measured
        return "Decode writes fresh memory, whose page faults both sides pay. "
    share = shape["fresh_output_floor_share_of_faiss_sq8_decode"]
    if share > 1:  # small outputs come from the allocator's free lists: no faults to time
        return (
            "Decode writes fresh memory; at this size both sides get it from the allocator "
            "without page faults, so there is no page-fault floor to report. "
        )
    return (
        "Decode writes fresh memory: allocating the output and faulting in its pages "
        f"alone, on every thread, runs at {floor['mb_per_s']} MB/s: {100 * share:.0f}% of "
        "FAISS SQ8's decode time, and both sides pay it. "
    )


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, d = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like 200000x384") from None
    if n < 1 or d < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: need n >= 1 and d >= 2")
    return n, d


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m bench speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        help="input shapes n x d (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument(
        "--run-mb",
        type=float,
        default=RUN_MB,
        help="a timed run repeats each call back to back until it has handled this many "
        "MB of input (0: one call per run; inputs this large are always timed alone)",
    )
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=0.0,
        help="before each timed run, wait (at most this long) until no thread of this "
        "process has used CPU for 1 ms, so FAISS's still-spinning OpenMP threads do not "
        "take a core from the next run (default 0: runs follow each other at once)",
    )
    parser.add_argument("--specs", nargs="+", help="only these specs or quantizer names")
    parser.add_argument("--data", help="a .npy float matrix to use instead of synthetic data")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON record path (default: bench-results/speed[-SHAPES].json here)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--no-jit-cost",
        dest="jit_cost",
        action="store_false",
        help="skip measuring numba's import and compile time (two fresh processes)",
    )
    return parser


def default_output(args: argparse.Namespace) -> Path:
    """``bench-results/speed[-SHAPES].json`` under the working directory (the committed
    records in bench/results are written only when named with ``--output``)."""
    default = [parse_shape(s) for s in DEFAULT_SHAPES]
    if args.shapes == default and not args.specs and not args.data:
        return Path("bench-results") / "speed.json"
    tag = "-".join(f"{n}x{d}" for n, d in args.shapes)
    return Path("bench-results") / f"speed-{tag}.json"


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run the benchmark described by ``args`` (see :func:`build_parser`)."""
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not 0 <= args.run_mb < float("inf"):  # also NaN
        raise SystemExit(f"--run-mb must be a finite number >= 0; got {args.run_mb}")
    if not 0 <= args.settle_ms < float("inf"):
        raise SystemExit(f"--settle-ms must be a finite number >= 0; got {args.settle_ms}")
    if args.output is not None and args.output.suffix.lower() != ".json":  # before measuring
        raise SystemExit(f"--output {args.output}: give a .json path (the .md goes beside it)")
    record: dict[str, Any] = {
        "benchmark": "speed",
        "command": " ".join(["python -m bench speed", *argv]),
        "repeats": args.repeats,
        "run_mb": args.run_mb,
        "settle_ms": args.settle_ms,
        "order_seed": ORDER_SEED,
        "environment": environment(),
        "jit": jit_cost() if args.jit_cost else {"available": _jit.AVAILABLE, "measured": False},
        "data": args.data or "synthetic unit-norm, power-law spectrum, seed 0",
        "shapes": [],
    }
    for n, d in args.shapes:
        print(f"== {n:,} x {d} ({n * d * 4 / 1e6:.0f} MB float32) ==", flush=True)
        shape = run_shape(n, d, args.repeats, args.data, args.specs, args.run_mb, args.settle_ms)
        record["shapes"].append(shape)
        print_shape(shape)
    if not args.no_write:
        path = args.output or default_output(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        from embcomp._atomic import atomic_output

        with atomic_output(path) as handle:
            handle.write((json.dumps(record, indent=1) + "\n").encode())
        with atomic_output(path.with_suffix(".md")) as handle:
            handle.write(markdown(record).encode())
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def print_shape(shape: dict[str, Any]) -> None:
    header = f"{'codec':<15}{'enc MB/s':>10}{'dec MB/s':>10}  {'vs':<22}{'enc':>8}{'dec':>8}"
    print(header + f"{'enc x':>8}{'dec x':>8}")
    for row in shape["rows"]:
        line = (
            f"{row['spec']:<15}{row['encode']['mb_per_s']:>10.0f}{row['decode']['mb_per_s']:>10.0f}"
        )
        other = row.get("faiss") or row.get("naive")
        if other:
            label = f"FAISS {other['factory']}" if "faiss" in row else f"astype({other['cast']})"
            er = row.get("encode_ratio", row.get("encode_vs_naive"))
            dr = row.get("decode_ratio", row.get("decode_vs_naive"))
            enc, dec = other["encode"]["mb_per_s"], other["decode"]["mb_per_s"]
            line += f"  {label:<22}{enc:>8.0f}{dec:>8.0f}"
            line += f"{er:>8.2f}{dr:>8.2f}"
        print(line)
    print(f"FAISS SQ8 encode {shape['faiss_sq8_encode_mb_per_s']:.0f} MB/s")
    share = shape["fresh_output_floor_share_of_faiss_sq8_decode"]
    print(
        f"fresh output, page faults only: {shape['fresh_output_floor']['mb_per_s']:.0f} MB/s "
        f"({100 * share:.0f}% of FAISS SQ8 decode time)"
    )
    for t in shape["targets"]:
        mark = "ok" if t["met"] else "MISSED"
        plain = t.get("numpy_path_value")
        extra = "" if plain is None else f", numpy path {plain:.2f}"
        print(
            f"  [{mark}] {t['target']}: {t['value']:.2f} "
            f"(rounds {_rounds_text(t)}; per CPU-s {t['per_cpu_second']:.2f}{extra})"
        )


def register(sub: Any) -> None:
    """Add ``embcomp bench-speed`` (same options as ``python -m bench speed``)."""
    parser = sub.add_parser(
        "bench-speed",
        help="encode/decode throughput of every codec vs FAISS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_parser(parser)
    parser.set_defaults(func=_cmd_bench_speed)


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    argv = sys.argv[sys.argv.index("bench-speed") + 1 :] if "bench-speed" in sys.argv else []
    return run(args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench speed``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
