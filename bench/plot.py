"""Trade-off plots (PNG + SVG), made from records alone.

    python -m bench plot RESULTS_DIR     # from RESULTS_DIR/records, else its summary.csv

Per dataset, under ``RESULTS_DIR/plots/<dataset>/``:

* ``recall_vs_bytes``: recall@10 against bytes per vector (log x), every run, each
  family's Pareto frontier drawn as a line and its points labelled;
* ``ndcg_retention_vs_ratio``: nDCG@10 as a fraction of float32's, against the
  compression ratio (datasets with qrels only);
* ``encode_throughput``: vectors per second encoded, every run, by family.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embcomp.exceptions import InputError

from .results import FAMILY_ORDER, load_records, read_summary_csv, summary_rows

__all__ = ["plot_results"]

_STYLE = {
    "embcomp": {"color": "#1f77b4", "marker": "o", "label": "embcomp"},
    "faiss": {"color": "#d62728", "marker": "s", "label": "FAISS"},
    "paper": {"color": "#7f7f7f", "marker": "^", "label": "paper's procedure"},
}
_FORMATS = ("png", "svg")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "embcomp-bench"  # reproducible SVG ids
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in _FORMATS:
        path = folder / f"{stem}.{fmt}"
        tmp = folder / f".{stem}.tmp.{fmt}"
        fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight", metadata=_metadata(fmt))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    if fmt == "svg":
        return {"Date": None}
    return {"Software": None}


def _label(method: str) -> str:
    return method.split(":", 1)[1]


def _scatter_with_frontier(
    ax: Any, rows: list[dict[str, Any]], x_key: str, y_key: str, frontier_low_x: bool
) -> list[Any]:
    """Every run as a faint point, each family's frontier as a line; returns the
    frontier points' labels (matplotlib annotations)."""
    labels = []
    for family in FAMILY_ORDER:
        pts = [r for r in rows if r["family"] == family and r[y_key] is not None]
        if not pts:
            continue
        style = _STYLE[family]
        ax.scatter(
            [r[x_key] for r in pts],
            [r[y_key] for r in pts],
            color=style["color"],
            marker=style["marker"],
            s=22,
            alpha=0.45,
            linewidths=0,
        )
        front = _front(pts, x_key, y_key, frontier_low_x)
        ax.plot(
            [r[x_key] for r in front],
            [r[y_key] for r in front],
            color=style["color"],
            marker=style["marker"],
            markersize=6,
            linewidth=1.6,
            drawstyle="steps-post" if frontier_low_x else "steps-pre",
            label=f"{style['label']} (frontier)",
        )
        for r in front:
            labels.append(
                ax.annotate(
                    _label(r["method"]),
                    (r[x_key], r[y_key]),
                    textcoords="offset points",
                    xytext=(4, -9 if family == "faiss" else 4),
                    fontsize=6.5,
                    color=style["color"],
                )
            )
    return labels


def _declutter(ax: Any, labels: list[Any], step: float = 7.0, tries: int = 16) -> None:
    """Move each label that overlaps one placed before it up or down (nearest first,
    ``step`` points at a time, staying inside the axes) to where it overlaps none, so
    no name hides another; one with no such place within ``tries`` stays put. Call once
    the axes' scales and limits are final."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for label in labels:
        x, y = label.xyann
        for attempt in range(tries + 1):
            shift = 0.0 if attempt == 0 else ((attempt + 1) // 2) * step * (-1) ** attempt
            label.xyann = (x, y + shift)
            box = label.get_window_extent(renderer)
            inside = frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside or attempt == 0) and not any(box.overlaps(p) for p in placed):
                break
        else:
            label.xyann = (x, y)
        placed.append(label.get_window_extent(renderer))


def _front(pts: list[dict[str, Any]], x_key: str, y_key: str, low_x: bool) -> list[dict]:
    """Pareto-optimal points: smallest x (or largest x) for any level of y."""
    sign = 1 if low_x else -1
    ordered = sorted(pts, key=lambda r: (sign * r[x_key], -r[y_key]))
    front, top = [], float("-inf")
    for r in ordered:
        if r[y_key] > top:
            front.append(r)
            top = r[y_key]
    return front


def _ratio_ticks(ax: Any, rows: list[dict[str, Any]], axis: str) -> None:
    """Ticks at the power-of-two compression ratios the points span."""
    d_bytes = rows[0]["bytes_per_vector"] * rows[0]["compression_ratio"]  # float32 size
    ratios = [r["compression_ratio"] for r in rows]
    low, high = min(ratios), max(ratios)
    ticks = [2.0**j for j in range(-2, 12) if low / 1.01 <= 2.0**j <= high * 1.01]
    if axis == "bytes":
        ax.set_xticks([d_bytes / t for t in ticks])
        ax.set_xticklabels([f"{d_bytes / t:g}\n{t:g}x" for t in ticks], fontsize=8)
    else:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}x" for t in ticks], fontsize=8)
    ax.minorticks_off()


def plot_dataset(rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """The three plots for one dataset's summary rows; returns the files written."""
    plt = _pyplot()
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    labels = _scatter_with_frontier(
        ax, rows, "bytes_per_vector", "recall_at_10", frontier_low_x=True
    )
    ax.set_xscale("log", base=2)
    _ratio_ticks(ax, rows, "bytes")
    ax.set_xlabel("bytes per vector (log scale; compression vs float32 below)")
    ax.set_ylabel("recall@10 vs exact float32 search")
    ax.set_title(f"{title}: recall@10 vs storage")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    _declutter(ax, labels)
    written += _save(fig, folder, "recall_vs_bytes")
    plt.close(fig)

    if any(r["ndcg_retention"] is not None for r in rows):
        fig, ax = plt.subplots(figsize=(8.5, 5.5))
        labels = _scatter_with_frontier(
            ax, rows, "compression_ratio", "ndcg_retention", frontier_low_x=False
        )
        ax.set_xscale("log", base=2)
        _ratio_ticks(ax, rows, "ratio")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("compression ratio vs float32 (log scale)")
        ax.set_ylabel("nDCG@10 / nDCG@10 of float32")
        ax.set_title(f"{title}: nDCG@10 retention vs compression")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower left", fontsize=8)
        _declutter(ax, labels)
        written += _save(fig, folder, "ndcg_retention_vs_ratio")
        plt.close(fig)

    timed = [r for r in rows if r["encode_vectors_per_s"]]
    timed.sort(key=lambda r: r["encode_vectors_per_s"])
    if timed:
        fig, ax = plt.subplots(figsize=(8.5, max(3.0, 0.16 * len(timed) + 1.2)))
        ax.barh(
            range(len(timed)),
            [r["encode_vectors_per_s"] for r in timed],
            color=[_STYLE[r["family"]]["color"] for r in timed],
        )
        ax.set_yticks(range(len(timed)))
        ax.set_yticklabels([r["method"] for r in timed], fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("encode throughput, vectors/s (log scale; median of repeats)")
        ax.set_title(f"{title}: encode throughput")
        from matplotlib.patches import Patch

        families = [f for f in FAMILY_ORDER if any(r["family"] == f for r in timed)]
        ax.legend(
            handles=[Patch(color=_STYLE[f]["color"], label=_STYLE[f]["label"]) for f in families],
            loc="lower right",
            fontsize=8,
        )
        ax.grid(True, axis="x", which="both", alpha=0.25)
        written += _save(fig, folder, "encode_throughput")
        plt.close(fig)
    return written


def plot_results(
    out: str | os.PathLike[str], records: Sequence[dict[str, Any]] | None = None
) -> list[Path]:
    """Plot every dataset found in the records under ``out`` (or ``records``); without
    records (they are not committed), from ``out/summary.csv``."""
    out = Path(out)
    if records is None and not (out / "records").is_dir():
        if not (out / "summary.csv").is_file():
            raise InputError(
                f"neither records nor a summary.csv under {str(out)!r}; run a sweep with "
                f"--out {out} first"
            )
        rows = read_summary_csv(out / "summary.csv")
    else:
        rows = summary_rows(load_records(out) if records is None else records)
    written: list[Path] = []
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        written += plot_dataset(mine, out / "plots" / dataset, dataset)
    return written
