"""Quantization loss vs index loss: serve decoded vectors from a FAISS ANN index.

For every codec on its family's Pareto frontier (recall@10 vs bytes per vector, exact
search), the decoded base vectors are added to a FAISS ANN index (``IVF256,Flat`` with
``nprobe=32`` by default, or e.g. ``HNSW32`` with ``efSearch``) and searched. Next to it
the same index over the float32 originals gives the loss from the index alone. An IVF
index's coarse quantizer is trained once, on the float32 training vectors, and shared
by every codec, so only the stored vectors differ between them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .datasets import Dataset, train_rows

if TYPE_CHECKING:
    from .run import AnnConfig, PlannedRun, Settings

__all__ = ["check_ann", "pareto_front", "run_ann"]


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the (cost, value, name) points no other point beats: cheaper-or-equal
    and at least as good, one strictly. Sorted by cost."""
    best: list[str] = []
    top = -np.inf
    for _cost, value, name in sorted(points, key=lambda p: (p[0], -p[1], p[2])):
        if value > top:
            best.append(name)
            top = value
    return best


def frontier_names(records: list[dict[str, Any]], decodable_only: bool = False) -> set[str]:
    """Method names on each family's frontier of recall@10 vs bytes per vector."""
    names: set[str] = set()
    families: dict[str, list[tuple[float, float, str]]] = {}
    for rec in records:
        if rec.get("kind") != "run" or rec.get("status") != "ok":
            continue
        if decodable_only and not rec["method"]["decodes"]:
            continue
        res = rec["results"]
        if res.get("recall_at_10") is None:
            continue
        families.setdefault(rec["method"]["family"], []).append(
            (res["bytes_per_vector"], res["recall_at_10"], rec["method"]["name"])
        )
    for points in families.values():
        names.update(pareto_front(points))
    return names


def _ann_index(factory: str, params: dict[str, Any], d: int, metric: str, train: Any) -> Any:
    import faiss

    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(d, factory, metric_type)
    if not index.is_trained:
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def check_ann(factory: str, params: dict[str, Any], d: int, metric: str) -> None:
    """Raise ``InputError`` unless FAISS can build ``factory`` for width ``d`` and knows
    every search parameter: a sweep should fail on its config before it runs, not after."""
    import faiss

    from embcomp.exceptions import InputError

    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(d, factory, metric_type)
        space = faiss.ParameterSpace()
        for key, value in params.items():
            space.set_index_parameter(index, key, value)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ann: FAISS cannot use {factory!r} {params} at d={d}: {first}") from None


def _search(template: Any, params: dict[str, Any], vectors: np.ndarray, queries: np.ndarray):
    import faiss

    index = faiss.clone_index(template)
    space = faiss.ParameterSpace()
    for key, value in params.items():
        space.set_index_parameter(index, key, value)
    start = time.perf_counter()
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)
    return ids.astype(np.int64), build_s, time.perf_counter() - start


def run_ann(
    records: list[dict[str, Any]],
    planned: list[PlannedRun],
    dataset: Dataset,
    out: Path,
    settings: Settings,
    ann: AnnConfig,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """Write (or reuse) one ``kind: "ann"`` record per frontier codec of ``dataset``."""
    from .run import (
        SCHEMA_VERSION,
        _environment,
        _progress,
        make_truth,
        read_record,
        record_path,
        run_params,
        tie_aware_recall,
        write_record,
    )

    ours = [r for r in records if r.get("params", {}).get("dataset") == dataset.name]
    if ann.select == "all":
        chosen = {
            r["method"]["name"] for r in ours if r.get("status") == "ok" and r["method"]["decodes"]
        }
    else:
        chosen = frontier_names(ours, decodable_only=True)
    by_name = {run.method.name: run for run in planned}
    todo, done = [], []
    for name in sorted(chosen):
        run = by_name.get(name)
        if run is None:
            continue
        params = run_params(dataset, run.method, settings, kind="ann", ann=ann.model_dump())
        path = record_path(out, params)
        existing = None if force else read_record(path)
        if existing is not None and existing.get("status") == "ok":
            done.append(existing)
        else:
            todo.append((run, params, path))
    if not todo:
        return done
    log(f"{dataset.name}: ANN pass ({ann.factory} {ann.params}) on {len(todo)} frontier codecs")
    truth = make_truth(dataset, settings.k, out / "gt")
    train = train_rows(dataset, settings.train_size, settings.train_rows, settings.seed)
    template = _ann_index(ann.factory, ann.params, dataset.d, dataset.metric, train)
    ref_ids, _, _ = _search(template, ann.params, np.asarray(dataset.base), dataset.queries)
    float32_recall = tie_aware_recall(ref_ids, truth.ids, 10, dataset)
    for run, params, path in _progress(todo, f"{dataset.name} ANN", progress):
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "kind": "ann",
            "params": params,
            "dataset": dataset.describe(),
        }
        method = run.method
        try:
            method.fit(train, dataset.metric)
            decoded = method.decode(method.encode(dataset.base))
            ids, build_s, search_s = _search(template, ann.params, decoded, dataset.queries)
            record["status"] = "ok"
            record["results"] = {
                "ann_recall_at_10": tie_aware_recall(ids, truth.ids, 10, dataset),
                "ann_recall_at_1": tie_aware_recall(ids, truth.ids, 1, dataset),
                "ann_float32_recall_at_10": float32_recall,
                "ann_add_s": build_s,
                "ann_search_s": search_s,
                "bytes_per_vector": method.code_size,
            }
        except (RuntimeError, ValueError) as exc:
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
            log(f"FAILED ANN {method.name}: {record['error']}")
        record["method"] = method.describe()
        record["ann"] = ann.model_dump()
        record["env"] = _environment()
        write_record(path, record)
        done.append(record)
    return done
