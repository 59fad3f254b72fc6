"""alloc's ``metric`` option: recall@10 of ``pca,alloc{bytes}`` fitted for inner-product
search (``metric="ip"``, the default: each component weighted by what queries see, the
data's mean included) or by variance alone (``metric="l2"``, the weighting before
``metric`` existed), next to FAISS PQ of the same size, all measured in this run.

- ``wordnet-minilm-384``: real MiniLM embeddings (``../shared/data``), as in the frontier
  study: fit on the first 20,000, 50,000 searched by 1,000 queries; seeds 0-2 (the
  k-means starts and training sample), because the differences are this small.
- ``synthetic-cone-1536``: a seeded stand-in for models whose embeddings sit in a narrow
  cone: slowly falling variances (i ** -0.5) about a common axis that carries most of
  each unit vector's length; 25,000 base (fit on the first 10,000), 500 queries.

Search: exact inner product over the decoded vectors, truth the exact top 10 of the
float32 vectors (ties count as hits). FAISS PQ at its default training.

    python bench/alloc_metric.py               # ~10 min on 2 cores; needs ../shared
    python bench/alloc_metric.py --out /tmp/am  # write elsewhere
    python bench/alloc_metric.py --skip-wordnet --out /tmp/am  # without ../shared

Writes ``alloc_metric.md`` and ``alloc_metric.json`` to ``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import embcomp  # noqa: E402
from bench.frontier import WORDNET, Data, _recall, load_wordnet, synthetic_data  # noqa: E402
from bench.methods import make_method  # noqa: E402
from embcomp._atomic import atomic_write_bytes  # noqa: E402
from embcomp.evaluation import exact_knn  # noqa: E402

K = 10


def make_cone(d: int = 1536, n_base: int = 25000, n_queries: int = 500) -> Data:
    """Unit vectors in a narrow cone (see the module docstring)."""
    rng = np.random.default_rng(7)
    scales = np.arange(1, d + 1) ** -0.25
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    axis = rng.standard_normal(d)
    axis /= np.linalg.norm(axis)

    def draw(m: int) -> np.ndarray:
        x = (rng.standard_normal((m, d)) * scales) @ basis.T
        x = x / np.sqrt(np.sum(scales**2)) + 1.2 * axis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return synthetic_data(
        f"synthetic-cone-{d}",
        draw(n_base),
        draw(n_queries),
        10000,
        f"unit vectors about a common axis, variances ~i**-0.5, {d}-d",
    )


def _search_recall(decoded: np.ndarray, data: Data) -> float:
    ids, _ = exact_knn(decoded, data.queries, K)
    return round(_recall(ids, data), 4)


def measure(data: Data, budgets: list[int], seeds: list[int], log: Any) -> list[dict[str, Any]]:
    """One row per codec: ``pca,alloc{b}`` for each metric and seed, then FAISS PQ{b}."""
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        runs: list[tuple[str, str, int | None]] = [
            (f"pca,alloc{budget}", metric, seed) for metric in ("ip", "l2") for seed in seeds
        ]
        runs.append((f"FAISS PQ{budget}", "", None))
        for name, metric, seed in runs:
            if metric:
                method = make_method(name, {"metric": metric, "seed": seed})
            else:
                method = make_method(f"faiss:PQ{budget}")
            start = time.perf_counter()
            method.fit(data.train, "ip")
            # embcomp's own count when it reused a fitted PCA (its fit once, plus this step)
            fit_s = round(method.fit_s or time.perf_counter() - start, 1)
            recall = _search_recall(method.decode(method.encode(data.base)), data)
            rows.append(
                dict(method=name, metric=metric, seed=seed, bytes=budget)
                | dict(recall_at_10=recall, fit_s=fit_s)
            )
            log(rows[-1])
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# alloc's metric option: weighting by what inner-product queries see",
        "",
        f"`python bench/alloc_metric.py`, embcomp {report['embcomp']}, "
        f"{report['minutes']} min. See the script's docstring for the data and search.",
        "Recall@10 by inner product; `ip` is the default, `l2` weights by variance alone.",
    ]
    for name, section in report["datasets"].items():
        rows = section["rows"]
        seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
        lines += ["", f"## {name}", "", section["note"], ""]
        head = "| bytes | " + " | ".join(f"ip, seed {s}" for s in seeds)
        head += " | " + " | ".join(f"l2, seed {s}" for s in seeds) + " | ip mean | l2 mean |"
        lines += [head + " FAISS PQ |", "|---" * (2 * len(seeds) + 4) + "|"]
        for budget in sorted({r["bytes"] for r in rows}, reverse=True):
            cells = [str(budget)]
            means = []
            for metric in ("ip", "l2"):
                values = [
                    r["recall_at_10"]
                    for r in rows
                    if r["bytes"] == budget and r["metric"] == metric
                ]
                cells += [f"{v:.4f}" for v in values]
                means.append(f"{np.mean(values):.4f}")
            pq = [r["recall_at_10"] for r in rows if r["bytes"] == budget and not r["metric"]]
            lines.append("| " + " | ".join(cells + means + [f"{pq[0]:.4f}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--skip-wordnet", action="store_true", help="the cone data only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a directory")
    if not args.skip_wordnet and not (WORDNET / "base.npy").is_file():
        parser.error(f"the MiniLM data is not at {WORDNET}; pass --skip-wordnet to run without it")
    start = time.perf_counter()
    report: dict[str, Any] = {"embcomp": embcomp.__version__, "datasets": {}}
    studies = [] if args.skip_wordnet else [(load_wordnet, [192, 96, 48], [0, 1, 2])]
    studies.append((make_cone, [768, 384], [0]))
    for load, budgets, seeds in studies:
        data = load()
        rows = measure(data, budgets, seeds, lambda row, name=data.name: print(name, row))
        report["datasets"][data.name] = {"note": data.note, "rows": rows}
    report["minutes"] = round((time.perf_counter() - start) / 60, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "alloc_metric.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "alloc_metric.md", markdown(report).encode())
    print(f"wrote {out / 'alloc_metric.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
