"""Check the RAG-storage paper's claims (arXiv 2505.00105) on any dataset.

    python -m bench claims --data ../shared/data/wordnet-minilm --out /tmp/bench

The paper claims, for MTEB retrieval (nDCG@10):

1. float8 gives 4x smaller storage and loses < 0.3% nDCG@10;
2. float8 beats int8 at the same size;
3. PCA keeping 50% of the dimensions + float8 (8x) loses less than int8 alone (4x);
4. PCA is the best reducer (here: against MPAD, arXiv 2504.16335, which claims to keep
   nearest neighbours better).

Each claim is checked twice where it matters: with the paper's own procedures
(``paper:fp8`` plain cast, ``paper:int8`` truncating uint8 scored on raw codes) and
with embcomp's (scaled fp8, rounded and clipped int8 decoded before scoring). The
metric is nDCG@10 on the dataset's qrels when it has them, and always recall@10 against
the exact float32 neighbours (a tighter measure of how much a codec changes the
ranking). Differences come with a 95% paired bootstrap interval over queries; a
verdict is only "holds" or "fails" when the interval is on one side of the claim's
threshold, otherwise the result is "within noise".

The runs are ordinary sweep runs (records under ``<out>/records``), so a default sweep
already contains them and the report is computed from records.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embcomp._atomic import atomic_output

from .datasets import Dataset, qrels_for
from .methods import make_method, numbered_reducers
from .run import PlannedRun, Settings, execute, make_truth, record_path, run_params

__all__ = ["claim_methods", "evaluate_claims", "write_claims"]

_BOOTSTRAP = 2000
_LOSS_LIMIT = 0.003  # claim 1: < 0.3% of float32's nDCG@10
_PERCENTS = (25, 50, 75)


def _dims(d: int, percent: int) -> int:
    return max(1, round(d * percent / 100))


def claim_methods(d: int) -> list[str]:
    """Every method the claims need, for width ``d``."""
    half = _dims(d, 50)
    names = [
        "embcomp:fp8",
        "embcomp:int8",
        f"embcomp:pca{half},fp8",
        "paper:fp8",
        "paper:int8",
        f"paper:pca{half},fp8",
    ]
    if "mpad" in numbered_reducers():
        for percent in _PERCENTS:
            k = _dims(d, percent)
            for suffix in (",fp32", ",fp8"):
                names += [f"embcomp:pca{k}{suffix}", f"embcomp:mpad{k}{suffix}"]
    return names


@dataclass
class Series:
    """Per-query scores of one method under one metric, aligned across methods."""

    name: str
    values: np.ndarray  # (q,) float64

    @property
    def mean(self) -> float:
        return float(self.values.mean())


def _bootstrap(fn: Callable[[np.ndarray], float], n: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = [fn(rng.integers(0, n, size=n)) for _ in range(_BOOTSTRAP)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def _difference(a: Series, b: Series) -> dict[str, Any]:
    """mean(a) - mean(b) with a paired bootstrap 95% interval."""
    diff = a.values - b.values
    low, high = _bootstrap(lambda idx: float(diff[idx].mean()), diff.size)
    return {
        "a": a.name,
        "b": b.name,
        "a_value": a.mean,
        "b_value": b.mean,
        "difference": float(diff.mean()),
        "ci95": [low, high],
    }


def _loss(method: Series, reference: Series) -> dict[str, Any]:
    """1 - mean(method)/mean(reference) with a paired bootstrap 95% interval."""

    def loss(idx: np.ndarray) -> float:
        ref = reference.values[idx].mean()
        return float(1 - method.values[idx].mean() / ref) if ref > 0 else float("nan")

    low, high = _bootstrap(loss, method.values.size)
    return {
        "a": method.name,
        "b": reference.name,
        "a_value": method.mean,
        "b_value": reference.mean,
        "loss": loss(np.arange(method.values.size)),
        "ci95": [low, high],
    }


def _verdict_above(low: float, high: float, threshold: float) -> str:
    """'holds' if the whole interval is above ``threshold``, 'fails' if below."""
    if low > threshold:
        return "holds"
    if high < threshold:
        return "fails"
    return "within noise"


def _series_from_records(
    records: list[dict[str, Any]], dataset: Dataset, truth_ndcg: np.ndarray | None
) -> dict[str, dict[str, Series]]:
    """metric -> method name -> Series, plus the float32 reference as ``float32``."""
    by_metric: dict[str, dict[str, Series]] = {"recall_at_10": {}, "ndcg_at_10": {}}
    by_metric["recall_at_10"]["float32"] = Series("float32", np.ones(dataset.n_queries))
    if truth_ndcg is not None:
        by_metric["ndcg_at_10"]["float32"] = Series("float32", truth_ndcg)
    for rec in records:
        if rec.get("status") != "ok" or rec.get("kind") != "run":
            continue
        name = rec["method"]["name"]
        for metric, series in by_metric.items():
            values = rec.get("per_query", {}).get(metric)
            if values is not None:
                series[name] = Series(name, np.asarray(values, dtype=np.float64))
    return by_metric


def evaluate_claims(
    records: list[dict[str, Any]], dataset: Dataset, truth_ndcg: np.ndarray | None
) -> dict[str, Any]:
    """The four claims, from run records of ``claim_methods(dataset.d)``."""
    d, half = dataset.d, _dims(dataset.d, 50)
    series = _series_from_records(records, dataset, truth_ndcg)
    metrics = ["ndcg_at_10", "recall_at_10"] if truth_ndcg is not None else ["recall_at_10"]
    report: dict[str, Any] = {"dataset": dataset.describe(), "metrics": metrics, "claims": []}

    def get(metric: str, name: str) -> Series | None:
        return series[metric].get(name)

    # 1. float8 at 4x loses < 0.3% (judged on nDCG@10 when there are qrels)
    rows = []
    for metric in metrics:
        for name in ("paper:fp8", "embcomp:fp8"):
            s, ref = get(metric, name), get(metric, "float32")
            if s is None or ref is None:
                continue
            row = _loss(s, ref)
            low, high = row["ci95"]
            if metric == metrics[0]:
                # the claim holds when the loss is below the limit: negate for _verdict_above
                row["verdict"] = _verdict_above(-high, -low, -_LOSS_LIMIT)
            else:
                row["verdict"] = "context: the claim is about nDCG@10"
            rows.append({"metric": metric, **row})
    report["claims"].append(
        {"id": 1, "claim": "float8 (4x) loses < 0.3% nDCG@10 vs float32", "rows": rows}
    )

    # 2. float8 beats int8 at equal size; 3. PCA-50% + float8 (8x) beats int8 alone (4x)
    for cid, claim, pairs in (
        (
            2,
            "float8 beats int8 at the same size",
            [
                ("paper:fp8", "paper:int8"),
                ("embcomp:fp8", "embcomp:int8"),
                ("paper:fp8", "embcomp:int8"),
            ],
        ),
        (
            3,
            f"PCA to 50% ({half} dims) + float8 (8x) loses less than int8 alone (4x)",
            [(f"paper:pca{half},fp8", "paper:int8"), (f"embcomp:pca{half},fp8", "embcomp:int8")],
        ),
    ):
        rows = []
        for metric in metrics:
            for a, b in pairs:
                sa, sb = get(metric, a), get(metric, b)
                if sa is None or sb is None:
                    continue
                row = _difference(sa, sb)
                row["verdict"] = _verdict_above(row["ci95"][0], row["ci95"][1], 0.0)
                rows.append({"metric": metric, **row})
        report["claims"].append({"id": cid, "claim": claim, "rows": rows})

    # 4. PCA vs MPAD
    rows = []
    if "mpad" in numbered_reducers():
        for metric in metrics:
            for percent in _PERCENTS:
                k = _dims(d, percent)
                for suffix in (",fp32", ",fp8"):
                    sa, sb = (
                        get(metric, f"embcomp:pca{k}{suffix}"),
                        get(metric, f"embcomp:mpad{k}{suffix}"),
                    )
                    if sa is None or sb is None:
                        continue
                    row = _difference(sa, sb)
                    verdict = _verdict_above(row["ci95"][0], row["ci95"][1], 0.0)
                    row["verdict"] = {"holds": "PCA better", "fails": "MPAD better"}.get(
                        verdict, "within noise"
                    )
                    rows.append({"metric": metric, **row})
    report["claims"].append(
        {
            "id": 4,
            "claim": "PCA is the better reducer (vs MPAD)",
            "rows": rows,
            "note": None if rows else "MPAD (mpad{d}) is not registered in embcomp.spec.STAGES",
        }
    )
    return report


def claims_markdown(report: Mapping[str, Any]) -> str:
    """The claims report as Markdown."""
    info = report["dataset"]
    lines = [
        f"# Claims of the RAG-storage paper, checked on {info['name']}",
        "",
        f"{info['n_base']} base vectors x {info['d']} dims, {info['n_queries']} queries. "
        "`paper:*` = the paper's procedures (plain float8 cast; uint8 with truncating cast, "
        "scored on raw codes; queries quantized the same way; cosine); `embcomp:*` = "
        "embcomp codecs (scaled float8; rounded, clipped int8, decoded). nDCG@10 uses the "
        "qrels; recall@10 is against exact float32 neighbours. Intervals: 95% paired "
        "bootstrap over queries.",
        "",
    ]
    for claim in report["claims"]:
        lines += [f"## {claim['id']}. {claim['claim']}", ""]
        if claim.get("note"):
            lines += [claim["note"], ""]
        if not claim["rows"]:
            lines += ["(no runs to compare)", ""]
            continue
        if claim["id"] == 1:
            lines += [
                "| metric | method | value | float32 | loss | 95% CI | verdict |",
                "|---|---|---:|---:|---:|---|---|",
            ]
            for r in claim["rows"]:
                lines.append(
                    f"| {r['metric']} | `{r['a']}` | {r['a_value']:.4f} | {r['b_value']:.4f} | "
                    f"{100 * r['loss']:.2f}% | [{100 * r['ci95'][0]:.2f}%, "
                    f"{100 * r['ci95'][1]:.2f}%] | {r['verdict']} |"
                )
        else:
            lines += [
                "| metric | A | B | A | B | A - B | 95% CI | verdict |",
                "|---|---|---|---:|---:|---:|---|---|",
            ]
            for r in claim["rows"]:
                lines.append(
                    f"| {r['metric']} | `{r['a']}` | `{r['b']}` | {r['a_value']:.4f} | "
                    f"{r['b_value']:.4f} | {r['difference']:+.4f} | "
                    f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['verdict']} |"
                )
        lines.append("")
    return "\n".join(lines)


def write_claims(
    dataset: Dataset,
    out: str | os.PathLike[str],
    settings: Settings,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[Path]:
    """Run (or reuse) the claims' runs on ``dataset`` and write ``claims.md`` and
    ``claims.json`` (``claims-<dataset>.*`` under ``out``); returns the paths."""
    out = Path(out)
    options = options or {}
    planned = []
    for name in claim_methods(dataset.d):
        method = make_method(name, options.get(name.split(":", 1)[0]))
        params = run_params(dataset, method, settings)
        planned.append(PlannedRun(dataset, method, params, record_path(out, params)))
    records = execute(planned, dataset, out, settings, None, force, progress, log)
    qrels = qrels_for(dataset)
    truth_ndcg = None
    if qrels:
        truth_ndcg = make_truth(dataset, settings.k, out / "gt").ndcg_per_query_float32
    report = evaluate_claims(records, dataset, truth_ndcg)
    written = []
    for suffix, text in (
        ("md", claims_markdown(report)),
        ("json", json.dumps(report, indent=1, sort_keys=True) + "\n"),
    ):
        path = out / f"claims-{dataset.name}.{suffix}"
        with atomic_output(path) as handle:
            handle.write(text.encode("utf-8"))
        written.append(path)
    return written
