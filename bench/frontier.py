"""Frontier codecs (issue 8): recall per byte of ``pca,alloc{bytes}`` against FAISS.

Every number is measured in this run, FAISS included, on each dataset:

- ``wordnet-minilm-384``: real all-MiniLM-L6-v2 embeddings (``../shared/data``), fit on
  the first 20,000 base vectors, 50,000 searched by 1,000 queries; exact top-10 by
  inner product is the truth (ties count as hits); nDCG@10 on the WordNet qrels.
- ``synthetic-powerlaw-768``: a seeded stand-in for a different model and width:
  768-d, principal variances falling as 1/i (MiniLM's fall far more slowly),
  clustered, unit norm; 30,000 base (fit on the first 20,000), 500 queries.

Sections: (1) every codec at 4x/8x/16x/32x (and RaBitQ's sizes) with bytes, recall@10,
nDCG@10, fit and encode time, and the best of each family at or under each size;
(2) rotations before plain quantizers (``rot``, ``pca``); (3) per-component number
formats (uniform, Lloyd-Max, float) by MSE and by recall; (4) ablations of the alloc
design (norm code, weighting, vector-quantization threshold); (5) two-stage search;
(6) encode throughput against FAISS PQ and SQ4, interleaved, medians, wall and CPU
seconds; (7) fit time on 20,000 x 768; (8) MPAD as the rotation, from the MPAD study.

Search: exact flat search over the decoded vectors for every codec that decodes;
RaBitQ and LSH search their own codes with FAISS (their decoded vectors are not meant
for search; RaBitQ with 8-bit queries, ``qb=8``, as accurate as float queries here and
far faster, rather than FAISS's default 4). FAISS codecs use FAISS's default training.
Timings are from a shared 2-core machine: read the ratios against FAISS in the same
run, not the absolute values.

    python bench/frontier.py                 # both datasets (over an hour: FAISS PQ/OPQ fits)
    python bench/frontier.py --quick --out /tmp/fq  # small synthetic data, a few codecs
    python bench/frontier.py --cache /tmp/fc # reuse measured runs across invocations

Writes ``frontier.md`` and ``frontier.json`` to ``--out`` (default bench/results;
``--quick`` needs an ``--out``, so it never replaces the full run's results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import embcomp  # noqa: E402
from bench.speed import blas_environment, blas_sentence, cpu_description, cpu_words  # noqa: E402
from embcomp._atomic import atomic_output, atomic_write_bytes  # noqa: E402
from embcomp.evaluation import exact_knn, load_qrels, ndcg_at_k, recall_at_k  # noqa: E402
from embcomp.search import search_codes, two_stage_search  # noqa: E402

WORDNET = REPO.parent / "shared" / "data" / "wordnet-minilm"
MPAD_STUDY = REPO / "bench" / "results" / "mpad_vs_pca.md"
K = 10
RATIOS = (4, 8, 16, 32)
# RaBitQ's query quantization: 8 bits measured within 0.001 recall@10 of float queries
# (qb=0) on wordnet at 1 bit, and qb=0 searches ~100x slower in FAISS 1.15.
_RABITQ_QUERY_BITS = 8
QUICK_D = 64  # the --quick run's width


# -- data ------------------------------------------------------------------------------
@dataclass
class Data:
    """Vectors (float32), exact top-k truth and optional relevance labels."""

    name: str
    train: np.ndarray
    base: np.ndarray
    queries: np.ndarray
    truth: np.ndarray  # (m, >= K) exact inner-product neighbours
    qrels: dict[int, dict[int, float]] | None
    note: str

    @property
    def d(self) -> int:
        return int(self.base.shape[1])

    def key(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.name}|{self.base.shape}|{self.queries.shape}".encode())
        digest.update(np.ascontiguousarray(self.base[::997]).tobytes())
        digest.update(np.ascontiguousarray(self.queries).tobytes())
        return digest.hexdigest()[:16]


def load_wordnet() -> Data:
    base = np.load(WORDNET / "base.npy")
    return Data(
        name="wordnet-minilm-384",
        train=base[:20000],
        base=base,
        queries=np.load(WORDNET / "queries.npy"),
        truth=np.load(WORDNET / "gt_ip_100.npy")[:, :K],
        qrels=load_qrels(WORDNET / "qrels.tsv"),
        note="all-MiniLM-L6-v2 WordNet glosses; fit on base[:20000], search 50,000",
    )


def make_powerlaw(d: int = 768, n_base: int = 30000, n_queries: int = 500) -> Data:
    """Clustered Gaussian data with principal variances ~ 1/i, rotated, unit norm."""
    rng = np.random.default_rng(7)
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    centers = rng.standard_normal((2000, d)) * scales
    offset = rng.standard_normal(d) * 0.3 * scales.mean()

    def draw(m: int, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        z = centers[r.integers(0, len(centers), m)] + 0.6 * r.standard_normal((m, d)) * scales
        x = z @ basis.T + offset
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return synthetic_data(
        f"synthetic-powerlaw-{d}",
        draw(n_base, 1),
        draw(n_queries, 2),
        20000,
        f"clustered, variances ~1/i, {d}-d, unit norm",
    )


def synthetic_data(
    name: str, base: np.ndarray, queries: np.ndarray, fit_rows: int, what: str
) -> Data:
    """Seeded synthetic vectors as a dataset: fitted on ``base[:fit_rows]``, the exact
    top-10 by inner product as the truth, no relevance labels."""
    truth, _ = exact_knn(base, queries, K)
    return Data(
        name=name,
        train=base[:fit_rows],
        base=base,
        queries=queries,
        truth=truth,
        qrels=None,
        note=f"{what}; fit on base[:{fit_rows}], search {len(base):,} with {len(queries)} queries",
    )


def make_quick() -> Data:
    data = make_powerlaw(d=QUICK_D, n_base=3000, n_queries=100)
    data.name = "synthetic-powerlaw-64 (quick)"
    data.train = data.base[:2000]
    data.note = data.note.replace("base[:20000]", "base[:2000]")
    return data


# -- measuring -------------------------------------------------------------------------
class Clock:
    """Wall and CPU (all threads of this process) seconds of a block."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _recall(ids: np.ndarray, data: Data) -> float:
    return recall_at_k(ids, data.truth, K, base=data.base, queries=data.queries)


def _quality(ids: np.ndarray, data: Data) -> dict[str, Any]:
    out: dict[str, Any] = {"recall_at_10": round(_recall(ids, data), 4)}
    if data.qrels:
        out["ndcg_at_10"] = round(ndcg_at_k(ids, data.qrels, K), 4)
    return out


def _embcomp_source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((REPO / "embcomp").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Runner:
    """Measures methods (``embcomp:`` specs, ``faiss:`` factory strings), with a cache."""

    def __init__(self, cache: Path | None, log: Callable[[str], None]) -> None:
        self.cache = cache
        self.log = log
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)

    def _path(self, data: Data, name: str, options: dict[str, Any]) -> Path | None:
        if self.cache is None:
            return None
        # embcomp results are keyed by the library's source too: edit it, re-measure.
        code = _embcomp_source_digest() if name.startswith("embcomp:") else "faiss"
        if "RaBitQ" in name:
            code += f"-qb{_RABITQ_QUERY_BITS}"
        key = json.dumps([data.key(), name, options, code], sort_keys=True)
        return self.cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def measure(self, data: Data, name: str, **options: Any) -> dict[str, Any]:
        """Fit on data.train, encode data.base, search, score: one result row."""
        path = self._path(data, name, options)
        if path is not None and path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:  # a damaged cache entry: measure again (and rewrite it)
                self.log(f"  cache entry {path.name} is damaged; measuring again")
        from bench.methods import make_method

        method = make_method(name, options)
        with Clock() as fit:
            method.fit(data.train, "ip")
        if "RaBitQ" in name:
            from bench.methods import FaissMethod, _innermost

            assert isinstance(method, FaissMethod)
            _innermost(method.index).qb = _RABITQ_QUERY_BITS
        with Clock() as enc:
            codes = method.encode(data.base)
        ids = method.search(codes, data.queries, K)
        row = {
            "method": name,
            "family": name.partition(":")[0],
            "options": options,
            "bytes": int(method.code_size),
            **_quality(ids, data),
            "fit_wall_s": round(fit.wall, 2),
            "fit_cpu_s": round(fit.cpu, 2),
            "encode_wall_s": round(enc.wall, 3),
            "encode_cpu_s": round(enc.cpu, 3),
        }
        if name.startswith("embcomp:") and "alloc" in name:
            row["allocation"] = method.codec.quantizer.describe()  # type: ignore[attr-defined]
        self.log(
            f"  {name:30s} {options or ''} {row['bytes']:5d} B  r@10 {row['recall_at_10']:.4f}"
            f"  fit {row['fit_wall_s']:.1f}s"
        )
        if path is not None:
            atomic_write_bytes(path, json.dumps(row).encode())
        return row


# -- sections --------------------------------------------------------------------------
def budgets(d: int) -> dict[int, int]:
    """Compression ratio -> bytes per vector (float32 is 4 d bytes)."""
    return {ratio: 4 * d // ratio for ratio in RATIOS}


def rabitq_code_sizes(d: int, bits: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """Bytes per vector of FAISS ``RaBitQ{bits}`` at width ``d``, as FAISS reports them
    (``sa_code_size``: the packed bits plus its per-vector factors, which grow with the
    bits), so embcomp is also measured at exactly those sizes."""
    import faiss

    return [
        int(faiss.index_factory(d, "RaBitQ" if b == 1 else f"RaBitQ{b}").sa_code_size())
        for b in bits
    ]


def headline_methods(d: int, quick: bool) -> list[str]:
    b = budgets(d)
    ours = sorted({*b.values(), *rabitq_code_sizes(d)}, reverse=True)
    embcomp_specs = [f"pca,alloc{n}" for n in ours] + [
        "int8",
        "fp8",
        "int4",
        "rot,int4",
        f"pca{d // 2},fp8",
        f"pca{d // 4},fp8",
        f"pca{d // 8},fp8",
        f"pca{d // 4},int8",
    ]
    faiss = [
        "SQ8",
        "SQ6",
        "SQ4",
        f"PCA{d // 2},SQ8",
        f"PCA{d // 4},SQ8",
        f"PCA{d // 8},SQ8",
        f"PCA{d // 2},SQ4",
        f"PQ{d // 2}",
        f"PQ{d // 4}",
        f"PQ{d // 8}",
        f"PQ{d // 2}x4",
        f"PQ{d // 4}x4",
        f"OPQ{d // 2},PQ{d // 2}",
        f"OPQ{d // 4},PQ{d // 4}",
        f"OPQ{d // 8},PQ{d // 8}",
        "RaBitQ",
        "RaBitQ2",
        "RaBitQ4",
        "LSH",
    ]
    if quick:
        faiss = ["SQ4", f"PQ{d // 8}", "RaBitQ", f"OPQ{d // 8},PQ{d // 8}"]
    return [f"embcomp:{s}" for s in embcomp_specs] + [f"faiss:{s}" for s in faiss]


def methods_of_run(widths: list[int], quick: bool) -> list[str]:
    """Every headline method of a run over datasets of ``widths`` dims, sorted."""
    return sorted({name for d in widths for name in headline_methods(d, quick)})


def unknown_skips(skip: list[str], widths: list[int], quick: bool) -> list[str]:
    """The names of ``skip`` (``--skip``) that are no headline method at any of ``widths``:
    a typo would otherwise be a no-op, noticed an hour later."""
    return sorted(set(skip) - set(methods_of_run(widths, quick)))


def truncated(runner: Runner, data: Data, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pca{k},alloc{B}`` with k = the components ``pca,alloc{B}`` gave bits to: the
    same allocation from a narrower (cheaper) rotation; k is read from the fit."""
    from bench.methods import narrower_rotation

    extra = []
    for row in rows:
        allocation = row.get("allocation")
        if not row["method"].startswith("embcomp:") or not allocation:
            continue
        spec = row["method"].partition(":")[2]
        narrower = narrower_rotation(spec, data.d, allocation["uncoded_components"])
        if narrower is not None:
            extra.append(runner.measure(data, f"embcomp:{narrower}"))
    return extra


def best_per_size(rows: list[dict[str, Any]], d: int) -> list[dict[str, Any]]:
    """Best recall@10 of each family at or under each target size."""
    table = []
    for ratio, size in budgets(d).items():
        entry: dict[str, Any] = {"ratio": ratio, "bytes": size}
        for family in ("embcomp", "faiss"):
            fits = [r for r in rows if r["family"] == family and r["bytes"] <= size]
            if fits:
                best = max(fits, key=lambda r: r["recall_at_10"])
                entry[family] = {
                    k: best.get(k) for k in ("method", "bytes", "recall_at_10", "ndcg_at_10")
                }
        table.append(entry)
    return table


def rotations(runner: Runner, data: Data) -> list[dict[str, Any]]:
    rows = []
    for quantizer in ("int8", "int4", "fp4", "bin", f"alloc{data.d // 4}"):
        for reducer in ("", "rot,", "pca,"):
            seeds = (0, 1, 2) if reducer == "rot," else (0,)
            measured = [
                runner.measure(data, f"embcomp:{reducer}{quantizer}", seed=s) for s in seeds
            ]
            recalls = [m["recall_at_10"] for m in measured]
            rows.append(
                {
                    "spec": f"{reducer}{quantizer}",
                    "bytes": measured[0]["bytes"],
                    "recall_at_10": round(statistics.mean(recalls), 4),
                    "recall_spread": round(max(recalls) - min(recalls), 4),
                    "seeds": len(seeds),
                }
            )
    return rows


def level_mse(data: Data) -> list[dict[str, Any]]:
    """Mean MSE (relative to each component's variance) of the three level families on
    the PCA components of the training data, at every width, for the top, middle and
    bottom thirds of the components by variance."""
    from embcomp.quantizers._levels import SortedColumns, fit_levels

    codec = embcomp.make_codec("pca").fit(data.train)
    Z = codec.reducer.transform(data.train)  # type: ignore[union-attr]
    variance = Z.var(axis=0)
    keep = variance > variance.max() * 1e-9
    Z, variance = Z[:, keep], variance[keep]
    thirds = np.array_split(np.arange(Z.shape[1]), 3)
    relative = {kind: np.empty((8, Z.shape[1])) for kind in ("uniform", "lloyd", "float")}
    for start in range(0, Z.shape[1], 64):  # column chunks keep the sorted copies small
        stop = min(start + 64, Z.shape[1])
        columns = SortedColumns(Z[:, start:stop])
        for bits in range(1, 9):
            for kind, values in relative.items():
                mse = columns.mse(fit_levels(columns, bits, kind))
                values[bits - 1, start:stop] = mse / variance[start:stop]
    rows = []
    for bits in range(1, 9):
        row: dict[str, Any] = {"bits": bits}
        for kind, values in relative.items():
            row[kind] = [round(float(values[bits - 1, t].mean()), 5) for t in thirds]
        rows.append(row)
    return rows


def alloc_variants(runner: Runner, data: Data, sizes: list[int]) -> list[dict[str, Any]]:
    variants: list[tuple[str, dict[str, Any]]] = [
        ("default (lloyd, weight 0.5, vq_below 3, norm_bits 4)", {}),
        ("levels=uniform", {"levels": "uniform"}),
        ("levels=float (fp4/fp6/fp8 where the width has one)", {"levels": "float"}),
        ("norm_bits=0 (no norm code)", {"norm_bits": 0}),
        ("norm_bits=8", {"norm_bits": 8}),
        ("weight=0 (plain MSE)", {"weight": 0.0}),
        ("weight=1 (queries like the data)", {"weight": 1.0}),
        ("vq_below=0 (scalar only)", {"vq_below": 0.0}),
        ("vq_below=2", {"vq_below": 2.0}),
        ("vq_below=4", {"vq_below": 4.0}),
        ("vq_below=9 (k-means groups everywhere)", {"vq_below": 9.0}),
    ]
    rows = []
    for label, options in variants:
        row: dict[str, Any] = {"variant": label}
        for size in sizes:
            row[str(size)] = runner.measure(data, f"embcomp:pca,alloc{size}", **options)[
                "recall_at_10"
            ]
        rows.append(row)
    return rows


def two_stage(data: Data, log: Callable[[str], None]) -> list[dict[str, Any]]:
    d = data.d
    small_sizes = (d // 16, d // 8)
    large_specs = (f"pca,alloc{d // 2}", "int8")
    codecs: dict[str, tuple[embcomp.Codec, np.ndarray]] = {}
    for spec in [f"pca,alloc{s}" for s in small_sizes] + list(large_specs):
        codec = embcomp.make_codec(spec).fit(data.train)
        codecs[spec] = (codec, codec.encode(data.base))
    rows = []
    for small in small_sizes:
        small_codec, small_codes = codecs[f"pca,alloc{small}"]
        alone, _ = search_codes(small_codec, small_codes, data.queries, K)
        rows.append(
            {
                "small": f"pca,alloc{small}",
                "large": "-",
                "rerank": "-",
                "scan_bytes": small,
                "total_bytes": small,
                **_quality(alone, data),
            }
        )
        for large in large_specs:
            large_codec, large_codes = codecs[large]
            for rerank in (2, 4, 10):
                ids, _ = two_stage_search(
                    small_codec,
                    small_codes,
                    large_codec,
                    large_codes,
                    data.queries,
                    K,
                    rerank=rerank,
                )
                row = {
                    "small": f"pca,alloc{small}",
                    "large": large,
                    "rerank": rerank,
                    "scan_bytes": small,
                    "total_bytes": small + large_codec.code_size,
                    **_quality(ids, data),
                }
                rows.append(row)
                log(f"  two-stage {row}")
    return rows


def speed_pairs(data: Data, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(embcomp, FAISS) method pairs of equal size for the throughput comparison: every
    ``pca{k},alloc{B}`` row at 8x/16x/32x against PQ, SQ4 and (16x, 32x) OPQ."""
    pairs = []
    for ratio in (8, 16, 32):
        size = 4 * data.d // ratio
        ours = [
            r["method"]
            for r in rows
            if r["bytes"] == size and re.fullmatch(r"embcomp:pca\d*,alloc\d+", r["method"])
        ]
        rivals = [f"faiss:PQ{size}", "faiss:SQ4"]
        # OPQ at 8x (d/2 sub-quantizers of 2 dims) is in the recall table but not timed
        # here: timing would fit it again (OPQ192,PQ192 on 384-d: 15 minutes on 2 cores)
        if ratio > 8:
            rivals.append(f"faiss:OPQ{size},PQ{size}")
        pairs += [(name, rival) for name in sorted(set(ours)) for rival in rivals]
    return pairs + [("embcomp:int4", "faiss:SQ4")]


SPEED_ORDER_SEED = 7


def encode_speed(
    data: Data, pairs: list[tuple[str, str]], repeats: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Encode all base vectors, every method interleaved with the others, ``repeats``
    rounds; vectors per second from the median wall and CPU (all threads) seconds.

    embcomp methods are timed with the compiled kernels (numba, when installed) and
    on the numpy path (``embcomp._jit`` off), both in every round.
    """
    from bench.methods import make_method
    from embcomp import _jit

    names = sorted({name for pair in pairs for name in pair})
    methods = {}
    for name in names:
        method = make_method(name)
        method.fit(data.train, "ip")
        methods[name] = method
    modes = [(name, True) for name in names if name.startswith("embcomp:") and _jit.AVAILABLE]
    modes += [(name, False) for name in names]
    timings: dict[tuple[str, bool], dict[str, list[float]]] = {
        mode: {"wall": [], "cpu": []} for mode in modes
    }
    load = os.getloadavg()[0]
    old = _jit.enabled()
    try:
        for round_ in range(repeats):
            # a seeded random order each round, so no method always runs right after the
            # same neighbour (whose threads may still spin, or whose freed memory is reused)
            order = modes[:]
            random.Random(SPEED_ORDER_SEED + round_).shuffle(order)
            for name, compiled in order:
                if name.startswith("embcomp:"):
                    _jit.set_enabled(compiled)
                with Clock() as clock:
                    methods[name].encode(data.base)
                timings[name, compiled]["wall"].append(clock.wall)
                timings[name, compiled]["cpu"].append(clock.cpu)
    finally:
        _jit.set_enabled(old)
    n = data.base.shape[0]

    def speed(name: str, kind: str, compiled: bool = True) -> float:
        key = (name, compiled and (name, True) in timings)
        return n / statistics.median(timings[key][kind])

    rows = []
    for ours, theirs in pairs:
        row = {
            "embcomp": ours.partition(":")[2],
            "faiss": theirs.partition(":")[2],
            "bytes": f"{methods[ours].code_size} / {methods[theirs].code_size}",
            "embcomp_vec_per_s": round(speed(ours, "wall")),
            "faiss_vec_per_s": round(speed(theirs, "wall")),
            "ratio_wall": round(speed(ours, "wall") / speed(theirs, "wall"), 2),
            "ratio_cpu": round(speed(ours, "cpu") / speed(theirs, "cpu"), 2),
            "numpy_path_vec_per_s": round(speed(ours, "wall", compiled=False)),
            "numpy_path_ratio_wall": round(
                speed(ours, "wall", compiled=False) / speed(theirs, "wall"), 2
            ),
            "compiled": (ours, True) in timings,
            "repeats": repeats,
            "order_seed": SPEED_ORDER_SEED,
            "load_average": round(load, 1),
        }
        rows.append(row)
        log(f"  speed {row}")
    return rows


def fit_times(data: Data, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for ratio in (8, 16, 32):
        spec = f"pca,alloc{4 * data.d // ratio}"
        with Clock() as clock:
            embcomp.make_codec(spec).fit(data.train)
        rows.append(
            {
                "spec": spec,
                "train": list(data.train.shape),
                "wall_s": round(clock.wall, 1),
                "cpu_s": round(clock.cpu, 1),
            }
        )
        log(f"  fit {rows[-1]}")
    return rows


def mpad_verdict() -> str:
    """Item 5, from the MPAD study's own table: does the best MPAD setting beat PCA?"""
    if not MPAD_STUDY.exists():
        return f"The MPAD study (bench/results/{MPAD_STUDY.name}) has not been run yet."
    wins, rows = [], 0
    dataset = ""
    for line in MPAD_STUDY.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            dataset = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # | dims | % | PCA | MPAD default | d - PCA [CI] | MPAD best | best - PCA [CI] | ...
        if len(cells) >= 7 and cells[0].isdigit() and "[" in cells[6]:
            rows += 1
            low = float(cells[6].split("[")[1].split(",")[0])
            if low > 0:
                wins.append(f"{dataset} at {cells[0]} dims ({cells[6]})")
    if not rows:
        return f"bench/results/{MPAD_STUDY.name} has no comparison table to read."
    if wins:
        return (
            "MPAD's best setting beats PCA (95% interval above 0) at: "
            + "; ".join(wins)
            + ". Try `mpad{d},alloc{bytes}` there."
        )
    return (
        f"Per bench/results/{MPAD_STUDY.name}, MPAD's best setting does not preserve "
        f"neighbours better than PCA at any of the {rows} widths measured (the 95% "
        "interval of best - PCA never lies above 0) and its fit is far slower (see its "
        "table), so PCA stays the rotation of the frontier codecs "
        "(`mpad{d},alloc{bytes}` parses and works, but is not recommended)."
    )


# -- report ----------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    out = [
        "# Frontier codecs: recall per byte, embcomp `pca,alloc{bytes}` vs FAISS (issue 8)",
        "",
        f"Generated by `bench/frontier.py` on {report['environment']['date']} "
        f"({report['environment']['machine']}); "
        + (
            "rows of the codec tables may come from the run cache (`--cache`: one JSON "
            "per dataset, method and options, embcomp rows also keyed by the library "
            "source, so they were measured with this code; FAISS rows, fit times "
            "included, by an earlier run of this script); the throughput and fit-time "
            "sections are always measured afresh. "
            if report["environment"].get("cache")
            else "every number measured in that run. "
        )
        + (
            f"The throughput sections were measured again on "
            f"{report['environment']['speed_remeasured']} (`--speed-only`), with the "
            "library as it is then; the recall rows did not change. "
            if report["environment"].get("speed_remeasured")
            else ""
        )
        + (
            f"Left out of this run (`--skip`): {', '.join(report['environment']['skipped'])}. "
            if report["environment"].get("skipped")
            else ""
        )
        + "recall@10 against exact float32 top-10 (ties count); nDCG@10 on the qrels "
        "(wordnet only). Timings come from a shared 2-core machine: compare ratios.",
        "",
        blas_sentence(report["environment"]).rstrip(),
        "",
    ]
    for ds in report["datasets"]:
        out += [f"## {ds['name']}", "", ds["note"], ""]
        out += ["### Best of each family at or under each size", ""]
        best_rows = []
        for entry in ds["best"]:
            ours, theirs = entry.get("embcomp", {}), entry.get("faiss", {})
            best_rows.append(
                {
                    "size": f"{entry['ratio']}x ({entry['bytes']} B)",
                    "ours": ours.get("method", "-").partition(":")[2],
                    "ours_b": ours.get("bytes"),
                    "ours_r": ours.get("recall_at_10"),
                    "ours_n": ours.get("ndcg_at_10"),
                    "theirs": theirs.get("method", "-").partition(":")[2],
                    "theirs_b": theirs.get("bytes"),
                    "theirs_r": theirs.get("recall_at_10"),
                    "theirs_n": theirs.get("ndcg_at_10"),
                }
            )
        out += _table(
            best_rows,
            [
                ("size", "target"),
                ("ours", "best embcomp"),
                ("ours_b", "bytes"),
                ("ours_r", "recall@10"),
                ("ours_n", "nDCG@10"),
                ("theirs", "best FAISS"),
                ("theirs_b", "bytes"),
                ("theirs_r", "recall@10"),
                ("theirs_n", "nDCG@10"),
            ],
        )
        out += ["", "### Every codec", ""]
        rows = sorted(ds["rows"], key=lambda r: (-r["bytes"], -r["recall_at_10"]))
        out += _table(
            rows,
            [
                ("method", "method"),
                ("bytes", "bytes"),
                ("recall_at_10", "recall@10"),
                ("ndcg_at_10", "nDCG@10"),
                ("fit_wall_s", "fit s"),
                ("encode_wall_s", "encode s (wall)"),
                ("encode_cpu_s", "encode s (CPU)"),
            ],
        )
        if ds.get("rotations"):
            out += ["", "### Rotations before plain quantizers (item 2)", ""]
            out += [
                "`rot` = seeded random orthogonal rotation (mean of 3 seeds; spread = max - "
                "min), `pca` = full PCA rotation, no reduction.",
                "",
            ]
            out += _table(
                ds["rotations"],
                [
                    ("spec", "spec"),
                    ("bytes", "bytes"),
                    ("recall_at_10", "recall@10"),
                    ("recall_spread", "seed spread"),
                ],
            )
        if ds.get("level_mse"):
            out += ["", "### Number formats per component (item 3): MSE / variance", ""]
            out += [
                "Mean over the PCA components of the training data, split into the top, "
                "middle and bottom thirds by variance. `float` = fp4 (E2M1), fp6 (E2M3), "
                "fp8 (E4M3) with an MSE-optimal scale; other widths have no float format.",
                "",
            ]
            lines = ["| bits | uniform (top/mid/bottom) | Lloyd-Max | float |", "|---|---|---|---|"]
            for row in ds["level_mse"]:
                cells = [" / ".join(f"{v:.4f}" for v in row[k]) for k in ("uniform", "lloyd")]
                has_float = row["bits"] in (4, 6, 8)
                flt = " / ".join(f"{v:.4f}" for v in row["float"]) if has_float else "-"
                lines.append(f"| {row['bits']} | {cells[0]} | {cells[1]} | {flt} |")
            out += lines
        if ds.get("variants"):
            sizes = [k for k in ds["variants"][0] if k != "variant"]
            out += ["", "### alloc design choices (items 1, 3): recall@10 by bytes", ""]
            out += _table(ds["variants"], [("variant", "variant")] + [(s, f"{s} B") for s in sizes])
        if ds.get("two_stage"):
            out += ["", "### Two-stage search (item 4)", ""]
            out += [
                "Scan the small code, re-rank the top rerank x 10 with the large code. "
                "Total bytes = both codes; the large code is read only for candidates.",
                "",
            ]
            out += _table(
                ds["two_stage"],
                [
                    ("small", "small"),
                    ("large", "large"),
                    ("rerank", "rerank"),
                    ("scan_bytes", "scanned B"),
                    ("total_bytes", "total B"),
                    ("recall_at_10", "recall@10"),
                    ("ndcg_at_10", "nDCG@10"),
                ],
            )
        if ds.get("speed"):
            out += ["", "### Encode throughput, same run, interleaved, median", ""]
            first = ds["speed"][0]
            out += [
                f"All {ds['name']} base vectors, {first.get('repeats', '?')} rounds, every "
                "method once per round in a seeded random order; vectors/s from the median "
                "wall time, ratio > 1 = embcomp faster. embcomp with its compiled kernels"
                + (" (numba)" if first.get("compiled") else " (numba absent: numpy path)")
                + ", and on its numpy path; FAISS with its own threads. Load average "
                f"{first.get('load_average', '?')} at the start (shared 2-core machine).",
                "",
            ]
            out += _table(
                ds["speed"],
                [
                    ("embcomp", "embcomp"),
                    ("faiss", "FAISS"),
                    ("bytes", "bytes (embcomp / FAISS)"),
                    ("embcomp_vec_per_s", "embcomp vec/s"),
                    ("faiss_vec_per_s", "FAISS vec/s"),
                    ("ratio_wall", "ratio (wall)"),
                    ("ratio_cpu", "ratio (CPU s)"),
                    ("numpy_path_vec_per_s", "embcomp numpy path vec/s"),
                    ("numpy_path_ratio_wall", "numpy path ratio (wall)"),
                ],
            )
        if ds.get("fit_times"):
            out += ["", "### Fit time", ""]
            out += _table(
                ds["fit_times"],
                [
                    ("spec", "spec"),
                    ("train", "train shape"),
                    ("wall_s", "wall s"),
                    ("cpu_s", "CPU s"),
                ],
            )
        out += [""]
    out += [
        "## MPAD as the rotation (item 5)",
        "",
        f"Read from the MPAD study (`bench/results/{MPAD_STUDY.name}`), not measured in this run.",
        "",
        report["mpad"],
        "",
    ]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    log = (lambda text: print(text, flush=True)) if not args.silent else (lambda text: None)
    runner = Runner(Path(args.cache) if args.cache else None, log)
    if args.quick:
        datasets = [make_quick()]
    else:
        datasets = []
        if (WORDNET / "base.npy").exists() and not args.skip_wordnet:
            datasets.append(load_wordnet())
        if not args.skip_synthetic:
            datasets.append(make_powerlaw())
    import faiss  # noqa: F401 - loaded now, so that blas_environment lists its BLAS

    cpu = cpu_description()
    report: dict[str, Any] = {
        "environment": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {cpu_words(cpu)}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
            **cpu,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cache": bool(args.cache),
            "skipped": list(args.skip),
            **blas_environment(),
        },
        "datasets": [],
    }
    for data in datasets:
        log(f"{data.name}: {data.note}")
        d = data.d
        names = [name for name in headline_methods(d, args.quick) if name not in args.skip]
        rows = [runner.measure(data, name) for name in names]
        rows += truncated(runner, data, rows)
        entry: dict[str, Any] = {
            "name": data.name,
            "note": data.note,
            "rows": rows,
            "best": best_per_size(rows, d),
        }
        sizes = [4 * d // r for r in (8, 16, 32)]
        if not args.quick:
            entry["variants"] = alloc_variants(runner, data, sizes)
        if not args.quick and data.qrels is not None:
            entry["rotations"] = rotations(runner, data)
            entry["level_mse"] = level_mse(data)
            entry["two_stage"] = two_stage(data, log)
        elif args.quick:
            entry["variants"] = alloc_variants(runner, data, sizes[-1:])
            entry["two_stage"] = two_stage(data, log)
        pairs = speed_pairs(data, rows)  # on both datasets: 384-d and 768-d inputs
        entry["speed"] = encode_speed(data, pairs, 1 if args.quick else args.repeats, log)
        if d >= 768 or args.quick:
            entry["fit_times"] = fit_times(data, log)
        report["datasets"].append(entry)
    report["mpad"] = mpad_verdict()
    return report


def remeasure_speed(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Replace every dataset's ``speed`` rows of ``report`` by a new measurement of the
    same pairs (after a kernel change: recall rows do not move when only speed does)."""
    log = (lambda text: print(text, flush=True)) if not args.silent else (lambda text: None)
    loaders = {"wordnet-minilm-384": load_wordnet, "synthetic-powerlaw-768": make_powerlaw}
    for entry in report["datasets"]:
        if entry["name"] not in loaders or not entry.get("speed"):
            continue
        data = loaders[entry["name"]]()
        pairs = sorted(
            {(f"embcomp:{row['embcomp']}", f"faiss:{row['faiss']}") for row in entry["speed"]},
            key=[(f"embcomp:{r['embcomp']}", f"faiss:{r['faiss']}") for r in entry["speed"]].index,
        )
        entry["speed"] = encode_speed(data, pairs, args.repeats, log)
    report["environment"]["speed_remeasured"] = (
        f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", help="where frontier.{md,json} go (default: bench/results; --quick needs one)"
    )
    parser.add_argument("--quick", action="store_true", help="small synthetic smoke run")
    parser.add_argument("--cache", help="directory of per-run JSON results to reuse")
    parser.add_argument("--repeats", type=int, default=3, help="encode timing repeats")
    parser.add_argument("--skip-wordnet", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--silent", action="store_true")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="METHOD",
        help="leave out a method, e.g. 'faiss:OPQ384,PQ384' (repeatable; said in the report)",
    )
    parser.add_argument("--replot", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="re-measure only the encode throughput of the .json's pairs, then rewrite both",
    )
    args = parser.parse_args(argv)
    if args.quick and args.out is None:  # never over the committed full-run results
        parser.error("--quick writes a smoke report: give it an --out directory")
    widths = (
        [QUICK_D]
        if args.quick
        else [384] * (not args.skip_wordnet) + [768] * (not args.skip_synthetic)
    )
    unknown = unknown_skips(args.skip, widths, args.quick)
    if unknown:
        parser.error(
            f"--skip {', '.join(unknown)}: not a method of this run; choose from "
            + ", ".join(methods_of_run(widths, args.quick))
        )
    out = Path(args.out or REPO / "bench" / "results")
    if args.replot:
        report = json.loads((out / "frontier.json").read_text(encoding="utf-8"))
        with atomic_output(out / "frontier.md") as handle:
            handle.write(markdown(report).encode())
        return 0
    if args.speed_only:
        report = json.loads((out / "frontier.json").read_text(encoding="utf-8"))
        remeasure_speed(report, args)
    else:
        report = run(args)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "frontier.json") as handle:
        handle.write(json.dumps(report, indent=1).encode())
    with atomic_output(out / "frontier.md") as handle:
        handle.write(markdown(report).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
