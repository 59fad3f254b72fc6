"""Summaries made from records alone: ``summary.csv`` and ``summary.md``.

    python -m bench summary RESULTS_DIR

The CSV has one row per run (columns :data:`COLUMNS`, ANN results joined in); the
Markdown has, per dataset, the frontier table (the best recall@10 each family reaches
within the bytes of 4x, 8x, 16x, 32x compression), every run sorted by size, and the
runs that failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from embcomp._atomic import atomic_output
from embcomp.exceptions import InputError

from .ann import pareto_front

__all__ = [
    "COLUMNS",
    "frontier_table",
    "load_records",
    "read_summary_csv",
    "summary_rows",
    "write_summary",
]

COLUMNS = (
    "dataset",
    "method",
    "family",
    "bytes_per_vector",
    "compression_ratio",
    "recall_at_1",
    "recall_at_10",
    "recall_at_100",
    "ndcg_at_10",
    "ndcg_retention",
    "qrels_recall_at_10",
    "rescore_recall_at_10",
    "rescore_ndcg_at_10",
    "rescore_extra_bytes_per_vector",
    "ann_recall_at_10",
    "ann_float32_recall_at_10",
    "fit_s",
    "encode_vectors_per_s",
    "decode_vectors_per_s",
    "search_s",
    "pareto",
)
FAMILY_ORDER = ("embcomp", "faiss", "paper")


def load_records(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record under ``<out>/records`` (any status), in path order."""
    root = Path(out) / "records"
    if not root.is_dir():
        raise InputError(f"no records under {str(root)!r}; run a sweep with --out {out} first")
    records = []
    for path in sorted(root.rglob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise InputError(f"record {str(path)!r} is not valid JSON: {exc}") from exc
    return records


def _ok(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind and r.get("status") == "ok"]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _options_agree(mine: dict[str, Any], merged: dict[str, Any] | None, family: str) -> bool:
    """Whether a run's options belong to the same sweep options as ``merged`` (those of
    its family's runs already kept). FAISS and paper methods record every family option
    they were given, so theirs must be equal; an embcomp spec keeps only the options its
    stages take, so its options must agree on the names both have. ``merged`` is None
    for the family's first (newest) run."""
    if merged is None:
        return True
    if family != "embcomp":
        return mine == merged
    return all(merged.get(k, v) == v for k, v in mine.items())


def comparable_runs(
    records: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The ok run records that may share a table, and ``(dataset, note)`` on each group
    left out.

    Per dataset, the newest record's data (fingerprint) and settings decide: runs of
    other data or settings are left out. Within a family, runs whose options differ
    from those of the family's newer runs are left out too (another sweep's FAISS
    training, say). A folder holding two sweeps so gives the newer one's runs (plus
    older runs of the same data, settings and options), never a mix.
    """
    runs = sorted(_ok(records, "run"), key=lambda r: r["env"]["finished"], reverse=True)
    kept: list[dict[str, Any]] = []
    left_out: dict[tuple[str, str], list[str]] = {}
    configs: dict[str, tuple[Any, str]] = {}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    for rec in runs:
        params = rec["params"]
        dataset, name, family = params["dataset"], rec["method"]["name"], rec["method"]["family"]
        config = (params.get("dataset_fingerprint"), _canonical(params.get("settings")))
        configs.setdefault(dataset, config)
        options = dict(params.get("method_options") or {})
        if configs[dataset] != config:
            reason = "other data or settings"
        elif not _options_agree(options, merged.get((dataset, family)), family):
            reason = f"other {family} options"
        elif (dataset, name) in seen:
            reason = "an older record of the same method"
        else:
            kept.append(rec)
            seen.add((dataset, name))
            merged.setdefault((dataset, family), {}).update(options)
            continue
        left_out.setdefault((dataset, reason), []).append(name)
    notes = [
        (
            dataset,
            f"left out {len(names)} older run(s) with {reason} "
            f"({', '.join(sorted(names)[:4])}{', ...' if len(names) > 4 else ''}); "
            "summarize them from a folder of their own",
        )
        for (dataset, reason), names in sorted(left_out.items())
    ]
    return kept, notes


def _ann_key(params: dict[str, Any]) -> str:
    """The parameters an ANN record shares with the run it serves: all but its kind and
    the ANN index's own settings."""
    return _canonical({k: v for k, v in params.items() if k not in ("kind", "ann")})


def _latest_ann(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest ok ANN record per run parameters (:func:`_ann_key`)."""
    chosen: dict[str, dict[str, Any]] = {}
    for rec in _ok(records, "ann"):
        key = _ann_key(rec["params"])
        if key not in chosen or rec["env"]["finished"] >= chosen[key]["env"]["finished"]:
            chosen[key] = rec
    return chosen


def summary_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per comparable ok run (:func:`comparable_runs`; columns
    :data:`COLUMNS`), sorted by dataset, family, bytes per vector and method, with the
    ANN record of exactly its parameters; ``pareto`` marks each family's recall@10
    frontier."""
    runs, _ = comparable_runs(records)
    anns = _latest_ann(records)
    rows = []
    for rec in runs:
        res = rec["results"]
        rescore = res.get("rescore") or {}
        ann_record = anns.get(_ann_key(rec["params"]))
        ann = ann_record["results"] if ann_record is not None else {}
        rows.append(
            {
                "dataset": rec["params"]["dataset"],
                "method": rec["method"]["name"],
                "family": rec["method"]["family"],
                "bytes_per_vector": res["bytes_per_vector"],
                "compression_ratio": res["compression_ratio"],
                "recall_at_1": res.get("recall_at_1"),
                "recall_at_10": res.get("recall_at_10"),
                "recall_at_100": res.get("recall_at_100"),
                "ndcg_at_10": res.get("ndcg_at_10"),
                "ndcg_retention": res.get("ndcg_retention"),
                "qrels_recall_at_10": res.get("qrels_recall_at_10"),
                "rescore_recall_at_10": rescore.get("recall_at_10"),
                "rescore_ndcg_at_10": rescore.get("ndcg_at_10"),
                "rescore_extra_bytes_per_vector": rescore.get("extra_bytes_per_vector"),
                "ann_recall_at_10": ann.get("ann_recall_at_10"),
                "ann_float32_recall_at_10": ann.get("ann_float32_recall_at_10"),
                "fit_s": res.get("fit_s"),
                "encode_vectors_per_s": res.get("encode_vectors_per_s"),
                "decode_vectors_per_s": res.get("decode_vectors_per_s"),
                "search_s": res.get("search_s"),
                "pareto": False,
            }
        )
    for dataset in {row["dataset"] for row in rows}:
        for family in FAMILY_ORDER:
            members = [r for r in rows if r["dataset"] == dataset and r["family"] == family]
            front = set(
                pareto_front(
                    [
                        (r["bytes_per_vector"], r["recall_at_10"], r["method"])
                        for r in members
                        if r["recall_at_10"] is not None
                    ]
                )
            )
            for row in members:
                row["pareto"] = row["method"] in front
    family_rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    rows.sort(
        key=lambda r: (
            r["dataset"],
            family_rank.get(r["family"], 9),
            r["bytes_per_vector"],
            -(r["recall_at_10"] or 0),
            r["method"],
        )
    )
    return rows


def frontier_table(
    rows: Sequence[dict[str, Any]], dataset: str, ratios: Sequence[float] = (4, 8, 16, 32)
) -> list[dict[str, Any]]:
    """Per compression ratio: the best recall@10 of each family within its byte budget.

    Returns a list of ``{"ratio", "budget_bytes", "<family>": row or None}``.
    """
    mine = [r for r in rows if r["dataset"] == dataset and r["recall_at_10"] is not None]
    if not mine:
        return []
    d = round(mine[0]["bytes_per_vector"] * mine[0]["compression_ratio"] / 4)
    table = []
    for ratio in ratios:
        budget = 4 * d / ratio
        entry: dict[str, Any] = {"ratio": ratio, "budget_bytes": budget}
        for family in FAMILY_ORDER:
            fits = [r for r in mine if r["family"] == family and r["bytes_per_vector"] <= budget]
            entry[family] = (
                max(fits, key=lambda r: (r["recall_at_10"], -r["bytes_per_vector"]))
                if fits
                else None
            )
        table.append(entry)
    return table


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not isinstance(value, bool):
        # measured numbers: 6 significant digits are plenty; no exponents for rates
        return f"{value:.0f}" if abs(value) >= 1e5 else f"{value:.6g}"
    return value


_TEXT_COLUMNS = ("dataset", "method", "family")


def read_summary_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``summary.csv`` as :func:`summary_rows` made them (numbers as
    floats, empty cells as None, ``pareto`` as a bool): the committed results keep
    no records, so plots are remade from this file."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            table = list(csv.DictReader(handle))
    except OSError as exc:
        raise InputError(f"cannot read {os.fspath(path)!r}: {exc.strerror}") from exc
    rows = []
    for line, raw in enumerate(table, 2):
        missing = [c for c in COLUMNS if c not in raw]
        if missing:
            raise InputError(f"{os.fspath(path)!r} lacks the columns {missing}")
        row: dict[str, Any] = {}
        for column in COLUMNS:
            text = raw[column]
            if column in _TEXT_COLUMNS:
                row[column] = text
            elif column == "pareto":
                row[column] = text == "True"
            elif text == "":
                row[column] = None
            else:
                try:
                    row[column] = float(text)
                except ValueError:
                    raise InputError(
                        f"{os.fspath(path)!r} line {line}: {column} is {text!r}, not a number"
                    ) from None
        rows.append(row)
    return rows


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row[k]) for k in COLUMNS})
    return buffer.getvalue()


def _best_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    label = row["method"].split(":", 1)[1]
    return f"{row['recall_at_10']:.4f} `{label}` ({row['bytes_per_vector']} B)"


def _settings_line(runs: Sequence[dict[str, Any]]) -> str:
    if not runs:
        return ""
    st = runs[0]["params"].get("settings") or {}
    rescore, size = st.get("rescore"), st.get("train_size")
    rows = (
        "all base rows"
        if size is None
        else f"the first {size} base rows"
        if st.get("train_rows", "first") == "first"
        else f"{size} random base rows"
    )
    return (
        f"Every codec fitted on {rows}, seed {st.get('seed', 0)}; exact top-{st.get('k')} "
        "truth; "
        + (f"rescoring re-ranks the top {rescore * 10}; " if rescore else "")
        + f"throughput = median of {st.get('timing_repeats')} timings"
        + (
            ", encode and decode into reused buffers (no page faults of fresh memory; the "
            "paper's procedures allocate)."
            if any(r["results"].get("encode_into") == "reused buffer" for r in runs)
            else "."
        )
    )


def _faiss_training_line(runs: Sequence[dict[str, Any]]) -> str:
    """How the FAISS codecs of ``runs`` were trained, from what the records say."""
    if not runs:
        return ""
    seen: dict[str, set[Any]] = {}
    for rec in runs:
        for key, value in (rec["method"].get("training") or {}).items():
            seen.setdefault(key, set()).add(value)
    options = sorted({_canonical(r["params"].get("method_options") or {}) for r in runs} - {"{}"})

    def values(key: str) -> str:
        return "/".join(str(v) for v in sorted(seen[key], key=str))

    parts = []
    if "pq_kmeans_niter" in seen:
        parts.append(f"PQ k-means {values('pq_kmeans_niter')} iterations")
    if "opq_niter" in seen:
        parts.append(f"OPQ {values('opq_niter')} rounds")
    if parts:
        parts[-1] += " (FAISS's defaults: 25 k-means iterations, 50 OPQ rounds)"
    if "polysemous_training" in seen:
        polysemous = "on" if True in seen["polysemous_training"] else "off"
        parts.append(f"polysemous training {polysemous}")
    trained = ", ".join(parts) if parts else "no PQ or OPQ k-means recorded"
    return f"FAISS training: {trained}; FAISS method options: {'; '.join(options) or 'none'}."


def markdown(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    ratios: Sequence[float] = (4, 8, 16, 32),
) -> str:
    """The Markdown summary of ``rows`` (and the failures among ``records``)."""
    lines = ["# Benchmark summary", ""]
    kept, notes = comparable_runs(records)
    described = {r["params"]["dataset"]: r["dataset"] for r in kept if "dataset" in r}
    for dataset in sorted({r["dataset"] for r in rows}):
        info = described.get(dataset, {})
        mine = [r for r in kept if r["params"]["dataset"] == dataset]
        lines += [
            f"## {dataset}",
            "",
            f"{info.get('n_base', '?')} base vectors x {info.get('d', '?')} dims, "
            f"{info.get('n_queries', '?')} queries, metric {info.get('metric', '?')}; "
            "recall@k against exact float32 neighbours (ties count as hits).",
            _settings_line(mine),
            _faiss_training_line([r for r in mine if r["method"]["family"] == "faiss"]),
            *(f"Not in these tables: {note}." for name, note in notes if name == dataset),
            "",
            "### Best recall@10 within each byte budget",
            "",
            "| compression | bytes/vector | embcomp | FAISS | paper procedure |",
            "|---|---:|---|---|---|",
        ]
        for entry in frontier_table(rows, dataset, ratios):
            lines.append(
                f"| {entry['ratio']:g}x | {entry['budget_bytes']:g} | "
                f"{_best_cell(entry['embcomp'])} | {_best_cell(entry['faiss'])} | "
                f"{_best_cell(entry['paper'])} |"
            )
        lines += [
            "",
            "### All runs",
            "",
            "`*` = on its family's Pareto frontier (recall@10 vs bytes). nDCG columns use the "
            "qrels when the dataset has them; `rescored` re-ranks the top candidates with the "
            "float32 originals (extra bytes: 4 x dims per vector, read for candidates only); "
            "`ANN` serves the decoded vectors from a FAISS ANN index (frontier codecs).",
            "",
            "| method | B/vec | ratio | R@1 | R@10 | R@100 | nDCG@10 | retention | "
            "rescored R@10 | ANN R@10 | fit s | encode vec/s | decode vec/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (row for row in rows if row["dataset"] == dataset):
            star = " *" if r["pareto"] else ""
            lines.append(
                f"| `{r['method']}`{star} | {r['bytes_per_vector']} | "
                f"{r['compression_ratio']:.1f}x | {_fmt(r['recall_at_1'])} | "
                f"{_fmt(r['recall_at_10'])} | {_fmt(r['recall_at_100'])} | "
                f"{_fmt(r['ndcg_at_10'])} | {_fmt(r['ndcg_retention'])} | "
                f"{_fmt(r['rescore_recall_at_10'])} | {_fmt(r['ann_recall_at_10'])} | "
                f"{_fmt(r['fit_s'], 2)} | {_fmt(r['encode_vectors_per_s'])} | "
                f"{_fmt(r['decode_vectors_per_s'])} |"
            )
        ann_ref = [r["ann_float32_recall_at_10"] for r in rows if r["dataset"] == dataset]
        ann_ref = [v for v in ann_ref if v is not None]
        if ann_ref:
            lines += ["", f"ANN index over the float32 originals: recall@10 {ann_ref[0]:.4f}."]
        lines.append("")
    failed = [r for r in records if r.get("status") == "error"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- `{r['params']['dataset']}` `{r['params']['method']}` ({r['kind']}): {r['error']}"
            for r in failed
        ]
        lines.append("")
    lines += [
        "Timings are wall-clock on a shared machine: compare methods within one run, "
        "not across machines.",
        "",
    ]
    return "\n".join(lines)


def write_summary(
    out: str | os.PathLike[str],
    records: Sequence[dict[str, Any]] | None = None,
    ratios: Sequence[float] = (4, 8, 16, 32),
) -> list[Path]:
    """Write ``summary.csv`` and ``summary.md`` under ``out`` (from ``records``, or from
    every record on disk); returns the paths written."""
    out = Path(out)
    records = load_records(out) if records is None else list(records)
    rows = summary_rows(records)
    written = []
    for name, text in (
        ("summary.csv", _csv_text(rows)),
        ("summary.md", markdown(rows, records, ratios)),
    ):
        path = out / name
        with atomic_output(path) as handle:
            handle.write(text.encode("utf-8"))
        written.append(path)
    return written
