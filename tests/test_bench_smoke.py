"""The benchmark harness end to end: sweep YAML -> records -> summary -> plots -> claims.

Tiny seeded synthetic data (a folder in the shared layout, without ground truth so it
is computed and cached), a handful of methods from every family, real FAISS, real
files. Runs in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bench import run as bench_run
from bench.__main__ import main as bench_main
from bench.datasets import load_dataset
from bench.results import COLUMNS, load_records
from embcomp.exceptions import InputError

N_BASE, N_QUERIES, DIM = 1500, 40, 32

SMOKE_YAML = """
name: test-smoke
datasets: [{data}]
settings:
  k: 20
  train_size: 1000
  rescore: 2
  timing_repeats: 1
methods:
  embcomp: [fp16, int8, "pca{{d50}},fp8", bin]
  faiss: [Flat, SQ8, "PQ{{d/8}}", LSH, RaBitQ]
  paper: [fp8, int8, binary]
options:
  faiss: {{kmeans_niter: 3}}
ann:
  factory: IVF8,Flat
  params: {{nprobe: 2}}
claims: true
"""


def make_folder(root: Path, seed: int = 7) -> Path:
    """A shared-layout folder of unit-norm anisotropic vectors with qrels."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 0.1, DIM)
    base = rng.standard_normal((N_BASE, DIM)) * scales
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = (
        base[rng.choice(N_BASE, N_QUERIES, replace=False)]
        + 0.3 * rng.standard_normal((N_QUERIES, DIM)) * scales
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    folder = root / "toy"
    folder.mkdir()
    np.save(folder / "base.npy", base.astype(np.float32))
    np.save(folder / "queries.npy", queries.astype(np.float32))
    top = np.argsort(-(queries @ base.T), axis=1)[:, :2]
    lines = [f"{q}\t{top[q, q % 2]}" for q in range(N_QUERIES)]
    (folder / "qrels.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    folder = make_folder(root)
    sweep = root / "smoke.yaml"
    sweep.write_text(SMOKE_YAML.format(data=folder))
    out = root / "out"
    code = bench_main(["run", str(sweep), "--out", str(out), "--no-progress"])
    assert code == 0
    return folder, sweep, out


def test_every_run_has_an_ok_record(smoke):
    _, _, out = smoke
    records = load_records(out)
    runs = [r for r in records if r["kind"] == "run"]
    names = {r["method"]["name"] for r in runs}
    assert {
        "embcomp:fp16",
        "embcomp:int8",
        "embcomp:pca16,fp8",
        "embcomp:bin",
        "faiss:Flat",
        "faiss:SQ8",
        "faiss:PQ4",
        "faiss:LSH",
        "faiss:RaBitQ",
        "paper:fp8",
        "paper:int8",
        "paper:binary",
    } <= names
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    by_name = {r["method"]["name"]: r["results"] for r in runs}
    # storage comes from code_size
    assert by_name["embcomp:int8"]["bytes_per_vector"] == DIM
    assert by_name["embcomp:pca16,fp8"]["bytes_per_vector"] == 16
    assert by_name["embcomp:bin"]["bytes_per_vector"] == DIM // 8
    assert by_name["faiss:SQ8"]["bytes_per_vector"] == DIM
    assert by_name["faiss:Flat"]["compression_ratio"] == 1.0
    # exact float32 search finds exactly the exact neighbours
    assert by_name["faiss:Flat"]["recall_at_10"] == 1.0
    assert by_name["faiss:Flat"]["ndcg_retention"] == 1.0  # same search path as the reference
    for res in by_name.values():
        assert 0.0 <= res["recall_at_10"] <= 1.0
        assert res["encode_vectors_per_s"] > 0 and res["search_s"] > 0
        assert res["rescore"]["extra_bytes_per_vector"] == 4 * DIM
    # rescoring the top 20 with float32 can only help a lossy 1-bit code
    assert (
        by_name["embcomp:bin"]["rescore"]["recall_at_10"] >= by_name["embcomp:bin"]["recall_at_10"]
    )
    # the exact ground truth was computed once and cached under the output folder
    assert len(list((out / "gt").glob("gt-dir-toy-32-*-ip-k20.npy"))) == 1


def test_records_live_at_a_path_that_is_a_function_of_the_parameters(smoke):
    folder, _, out = smoke
    dataset = load_dataset(folder)
    from bench.methods import make_method

    settings = bench_run.Settings(k=20, train_size=1000, rescore=2, timing_repeats=1)
    method = make_method("embcomp:int8")
    params = bench_run.run_params(dataset, method, settings)
    path = bench_run.record_path(out, params)
    assert path.is_file()
    assert json.loads(path.read_text())["params"] == params
    other = bench_run.run_params(dataset, make_method("embcomp:int8", {"seed": 1}), settings)
    assert bench_run.record_path(out, other) != path


def test_rerun_skips_recorded_runs(smoke, capsys):
    _, sweep, out = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    assert bench_main(["run", str(sweep), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "0 to run" in err
    after = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    assert before == after


def test_summary_csv_markdown_and_plots(smoke):
    _, _, out = smoke
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert {"method", "bytes_per_vector", "compression_ratio", "recall_at_10"} <= set(rows[0])
    assert {"ndcg_at_10", "encode_vectors_per_s"} <= set(rows[0])
    flat = next(r for r in rows if r["method"] == "faiss:Flat")
    assert float(flat["recall_at_10"]) == 1.0
    # every family has a frontier, and the frontier codecs got an ANN record
    assert {r["family"] for r in rows if r["pareto"] == "True"} == {"embcomp", "faiss", "paper"}
    # ANN runs on each family's frontier of the sweep's methods (before the claims'
    # MPAD/PCA runs, which may then push one off the summary's frontier)
    ann_rows = [r for r in rows if r["ann_recall_at_10"]]
    ours = {"embcomp:fp16", "embcomp:int8", "embcomp:pca16,fp8", "embcomp:bin"}  # the YAML's
    sweep = [r for r in rows if r["family"] != "embcomp" or r["method"] in ours]
    for r in ann_rows:
        rivals = [o for o in sweep if o["family"] == r["family"] and o is not r]
        assert not any(
            int(o["bytes_per_vector"]) <= int(r["bytes_per_vector"])
            and float(o["recall_at_10"]) > float(r["recall_at_10"])
            for o in rivals
        ), r["method"]
    assert ann_rows
    assert all(0 < float(r["ann_float32_recall_at_10"]) <= 1 for r in ann_rows)
    md = (out / "summary.md").read_text()
    assert "Best recall@10 within each byte budget" in md
    assert "| 4x |" in md and "| 32x |" in md
    assert "encode and decode into reused buffers" in md
    for stem in ("recall_vs_bytes", "ndcg_retention_vs_ratio", "encode_throughput"):
        png = out / "plots" / "dir-toy-32" / f"{stem}.png"
        svg = png.with_suffix(".svg")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:500]


def test_plot_and_summary_commands_only_read_records(smoke, tmp_path):
    _, _, out = smoke
    copy = tmp_path / "copy"
    for path in (out / "records").rglob("*.json"):
        target = copy / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert bench_main(["summary", str(copy)]) == 0
    assert bench_main(["plot", str(copy)]) == 0
    assert (copy / "summary.csv").read_text() == (out / "summary.csv").read_text()
    assert (copy / "plots" / "dir-toy-32" / "recall_vs_bytes.svg").is_file()


def test_plots_are_remade_from_summary_csv_alone(smoke, tmp_path):
    """Committed results keep summary.csv but no records: plot falls back to it, and
    reading it back gives the rows summary_rows made (to the CSV's 6 digits)."""
    from bench.results import load_records, read_summary_csv, summary_rows

    _, _, out = smoke
    made = summary_rows(load_records(out))
    read = read_summary_csv(out / "summary.csv")
    assert [(r["method"], r["family"], r["pareto"]) for r in read] == [
        (r["method"], r["family"], r["pareto"]) for r in made
    ]
    for got, want in zip(read, made, strict=True):
        for column in ("bytes_per_vector", "recall_at_10", "ndcg_retention", "fit_s"):
            assert (got[column] is None) == (want[column] is None)
            if want[column] is not None:
                assert got[column] == pytest.approx(want[column], rel=1e-5)
    copy = tmp_path / "committed"
    copy.mkdir()
    (copy / "summary.csv").write_bytes((out / "summary.csv").read_bytes())
    assert bench_main(["plot", str(copy)]) == 0
    assert (copy / "plots" / "dir-toy-32" / "recall_vs_bytes.png").is_file()
    (copy / "summary.csv").write_text("dataset,method\nx,y\n")
    with pytest.raises(InputError, match="lacks the columns"):
        read_summary_csv(copy / "summary.csv")
    assert bench_main(["plot", str(tmp_path / "empty")]) == 2  # neither records nor a CSV


def test_frontier_labels_do_not_overlap():
    from bench.plot import _declutter, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 1)
    labels = [
        ax.annotate(name, (5.0, 0.5), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
        for name in ("OPQ192,PQ192", "RaBitQ4", "PQ192", "SQ6")
    ]
    _declutter(ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert labels[0].xyann == (4, 4)  # the first stays where it was put
    plt.close(fig)


def test_claims_report(smoke):
    _, _, out = smoke
    md = (out / "claims-dir-toy-32.md").read_text()
    report = json.loads((out / "claims-dir-toy-32.json").read_text())
    assert [c["id"] for c in report["claims"]] == [1, 2, 3, 4]
    first = report["claims"][0]["rows"]
    assert {r["a"] for r in first} == {"paper:fp8", "embcomp:fp8"}
    assert {r["metric"] for r in first} == {"ndcg_at_10", "recall_at_10"}
    for claim in report["claims"][:3]:
        for row in claim["rows"]:
            low, high = row["ci95"]
            assert low <= high
            assert row["verdict"] in ("holds", "fails", "within noise") or (
                claim["id"] == 1
                and row["metric"] == "recall_at_10"
                and row["verdict"].startswith("context")
            )
    assert "float8 beats int8" in md and "paper:int8" in md


def test_bad_sweep_file_is_one_clear_error(tmp_path, capsys):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("name: x\ndatasets: []\nmethods: {embcomp: [int8]}\nbogus: 1\n")
    assert bench_main(["run", str(sweep), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "datasets" in err and "bogus" in err
    assert not (tmp_path / "o").exists()


# -- found by a red-team pass ------------------------------------------------------------
TINY_YAML = """
name: tiny
datasets: [{data}]
settings: {{k: 10, train_size: 150, rescore: 0, timing_repeats: 1}}
methods: {{embcomp: [int8, "pca4,fp32"]}}
ann: {{factory: "{factory}"}}
claims: {claims}
"""


def _tiny(root: Path, n: int = 200, seed: int = 1) -> Path:
    X = np.random.default_rng(seed).standard_normal((n, 8))
    np.save(root / f"x{seed}.npy", (X / np.linalg.norm(X, axis=1, keepdims=True)).astype("f4"))
    return root / f"x{seed}.npy"


def test_an_ann_index_this_data_cannot_train_is_skipped_not_fatal(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(TINY_YAML.format(data=_tiny(tmp_path), factory="IVF256,Flat", claims="false"))
    assert bench_main(["run", str(sweep), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ANN pass (IVF256,Flat" in err and "skipped" in err and "256" in err
    assert (tmp_path / "o" / "summary.md").exists()
    sweep.write_text(TINY_YAML.format(data=_tiny(tmp_path), factory="Garbage", claims="false"))
    assert bench_main(["run", str(sweep), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "FAISS cannot use 'Garbage'" in capsys.readouterr().err


def test_force_reruns_the_claims_runs_too(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(TINY_YAML.format(data=_tiny(tmp_path), factory="IVF4,Flat", claims="true"))
    argv = ["run", str(sweep), "--out", str(tmp_path / "o"), "--no-progress"]
    assert bench_main(argv) == 0
    capsys.readouterr()
    assert bench_main([*argv, "--force"]) == 0
    err = capsys.readouterr().err
    assert " 0 already recorded" in err and "already recorded, 0 to run" not in err


def test_summary_holds_only_this_sweeps_data_and_settings(tmp_path):
    out = tmp_path / "o"
    first, second = _tiny(tmp_path, seed=1), _tiny(tmp_path, seed=2)
    second.replace(first.with_name("swap.npy"))
    first_copy = first.read_bytes()
    sweep = tmp_path / "s.yaml"
    data = tmp_path / "data.npy"
    for content in (first_copy, first.with_name("swap.npy").read_bytes()):
        data.write_bytes(content)  # same name, other vectors
        sweep.write_text(TINY_YAML.format(data=data, factory="IVF4,Flat", claims="false"))
        assert bench_main(["run", str(sweep), "--out", str(out), "--no-progress"]) == 0
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2  # this data's int8 and pca4,fp32, not the earlier data's too


@pytest.mark.parametrize(
    "change,message",
    [
        ("settings: {k: 5}", "settings.k"),
        ("ratios: [0]", "ratios"),
        ("methods: {faiss: ['PQ{m/0}']}", "divides by zero"),
        ("methods: {embcomp: []}", "plans no runs"),
    ],
)
def test_sweep_config_mistakes_are_one_clear_error(tmp_path, capsys, change, message):
    data = _tiny(tmp_path)
    text = f"name: x\ndatasets: [{data}]\nmethods: {{embcomp: [int8]}}\n"
    key = change.split(":")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key)) + "\n"
    (tmp_path / "s.yaml").write_text(text + change + "\n")
    assert bench_main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and sum("error" in line for line in err.splitlines()) == 1, err


def test_bad_benchmark_data_is_refused(tmp_path):
    folder = make_folder(tmp_path)
    base = np.load(folder / "base.npy")
    queries = np.load(folder / "queries.npy")
    wrong = np.argsort(queries @ base.T, axis=1)[:, :10]  # the farthest, not the nearest
    np.save(folder / "gt_ip_100.npy", wrong)
    with pytest.raises(InputError, match="ground truth row 0 names base row"):
        load_dataset(str(folder))
    np.save(folder / "gt_ip_100.npy", wrong + N_BASE)
    with pytest.raises(InputError, match="ground truth ids must be"):
        load_dataset(str(folder))
    (folder / "gt_ip_100.npy").unlink()
    base[7, 3] = np.nan
    np.save(folder / "base.npy", base)
    with pytest.raises(InputError, match="row 7 holds NaN or inf"):
        load_dataset(str(folder))


def _record(method, settings, finished, options=None, kind="run", recall=0.5, ann=None):
    family = method.partition(":")[0]
    params = {
        "schema": 1,
        "kind": kind,
        "dataset": "d",
        "dataset_fingerprint": "f",
        "method": method,
        "method_options": options or {},
        "settings": settings,
    }
    results = {"bytes_per_vector": 8, "compression_ratio": 4.0, "recall_at_10": recall}
    if kind == "ann":
        params["ann"] = ann
        results = {"ann_recall_at_10": recall, "ann_float32_recall_at_10": 0.9}
    return {
        "kind": kind,
        "status": "ok",
        "params": params,
        "dataset": {"n_base": 10, "d": 8, "n_queries": 2, "metric": "ip"},
        "method": {"name": method, "family": family, "decodes": True},
        "env": {"finished": f"2026-12-03T10:00:{finished:02d}+00:00"},
        "results": results,
    }


def test_summary_never_mixes_settings_or_options_and_joins_ann_on_all_parameters():
    from bench.results import comparable_runs, markdown, summary_rows

    old, new = {"train_size": 150, "k": 10}, {"train_size": 100, "k": 10}
    ivf = {"factory": "IVF4,Flat"}
    records = [
        _record("embcomp:int8", old, 1, recall=0.7),
        _record("embcomp:fp16", old, 2),
        _record("faiss:PQ4", old, 3, {"kmeans_niter": 3}),
        _record("embcomp:int8", old, 4, kind="ann", recall=0.6, ann=ivf),
        _record("embcomp:int8", new, 5, recall=0.8),
    ]
    rows = summary_rows(records)
    # only the newest settings' run, and no ANN number borrowed from the older run
    assert [(r["method"], r["recall_at_10"], r["ann_recall_at_10"]) for r in rows] == [
        ("embcomp:int8", 0.8, None)
    ]
    _, notes = comparable_runs(records)
    assert notes == [
        (
            "d",
            "left out 3 older run(s) with other data or settings (embcomp:fp16, "
            "embcomp:int8, faiss:PQ4); summarize them from a folder of their own",
        )
    ]
    assert "Not in these tables: left out 3 older run(s)" in markdown(rows, records)
    # same settings: FAISS runs trained otherwise are left out, embcomp runs whose
    # options agree on the names they share stay, and the ANN record of the same
    # parameters joins
    records = [
        _record("faiss:PQ4", old, 1, {"kmeans_niter": 3, "rabitq_qb": 0}),
        _record("faiss:SQ8", old, 2, {"kmeans_niter": 3, "rabitq_qb": 0}),
        _record("embcomp:mpad4,int8", old, 3, {"max_iter": 5}),
        _record("embcomp:mpad2,int8", old, 4, {"max_iter": 9}),
        _record("faiss:PQ4", old, 5, {"rabitq_qb": 0}),
        _record("faiss:PQ4", old, 6, {"rabitq_qb": 0}, kind="ann", recall=0.4, ann=ivf),
        _record("embcomp:pca4,int8", old, 7),
        _record("embcomp:mpad4,fp16", old, 8, {"max_iter": 9}),
    ]
    rows = summary_rows(records)
    assert {r["method"]: r["ann_recall_at_10"] for r in rows} == {
        "embcomp:mpad4,fp16": None,
        "embcomp:pca4,int8": None,
        "embcomp:mpad2,int8": None,
        "faiss:PQ4": 0.4,
    }
    notes = [note for _, note in comparable_runs(records)[1]]
    assert any("2 older run(s) with other faiss options" in n for n in notes)
    assert any("1 older run(s) with other embcomp options (embcomp:mpad4,int8)" in n for n in notes)


def test_summary_command_reports_what_it_leaves_out(tmp_path, capsys):
    out = tmp_path / "o"
    sweep = tmp_path / "s.yaml"
    data = _tiny(tmp_path)
    sweep.write_text(TINY_YAML.format(data=data, factory="IVF4,Flat", claims="false"))
    assert bench_main(["run", str(sweep), "--out", str(out), "--no-progress"]) == 0
    for path in (out / "records").rglob("*.json"):  # the first sweep finished earlier
        record = json.loads(path.read_text())
        record["env"]["finished"] = "2000-01-01T00:00:00+00:00"
        path.write_text(json.dumps(record))
    sweep.write_text(
        TINY_YAML.format(data=data, factory="IVF4,Flat", claims="false")
        .replace("train_size: 150", "train_size: 100")
        .replace('[int8, "pca4,fp32"]', "[int8]")
    )
    assert bench_main(["run", str(sweep), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert bench_main(["summary", str(out)]) == 0
    assert "note: file-x1-8-holdout20: left out 2 older run(s)" in capsys.readouterr().err
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["embcomp:int8"]
    ann = [r for r in load_records(out) if r["kind"] == "ann" and r["status"] == "ok"]
    newest = [r for r in ann if r["params"]["settings"]["train_size"] == 100]
    assert (
        len(ann) >= 2
        and rows[0]["ann_recall_at_10"] == f"{newest[0]['results']['ann_recall_at_10']:.6g}"
    )
