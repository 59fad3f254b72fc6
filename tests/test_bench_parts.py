"""Benchmark parts: dataset loaders and the ground-truth cache, method templates from the
spec grammar, the FAISS adapters, the CLI entry points and ``embcomp recommend``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from memory import peak_bytes

import embcomp
from bench import datasets as ds
from bench import methods
from bench.__main__ import main as bench_main
from embcomp import load_codec
from embcomp.cli import main as embcomp_main
from embcomp.exceptions import InputError, SpecError
from embcomp.io import write_fvecs

REPO = Path(__file__).resolve().parents[1]


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * np.linspace(1.0, 0.1, d)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


# -- datasets ----------------------------------------------------------------------------
def test_registry_names_the_bundled_sample():
    assert ds.list_datasets()[ds.SAMPLE_NAME].startswith("bundled")
    sample = ds.load_dataset(ds.SAMPLE_NAME)
    assert (sample.n_base, sample.n_queries, sample.d) == (3000, 200, 384)
    assert sample.gt is None and sample.metric == "ip"


def test_shared_folders_join_the_registry(tmp_path, monkeypatch):
    folder = tmp_path / "corpus-model"
    folder.mkdir()
    np.save(folder / "base.npy", unit_rows(50, 8, 0))
    np.save(folder / "queries.npy", unit_rows(5, 8, 1))
    (folder / "qrels.tsv").write_text("0\t3\n1\t4\t2\n")
    monkeypatch.setenv("EMBCOMP_DATA_DIR", str(tmp_path))
    assert "shared-corpus-model-8" in ds.list_datasets()
    data = ds.load_dataset("shared-corpus-model-8")
    assert data.qrels == {0: {3: 1.0}, 1: {4: 2.0}}


def test_shipped_sweeps_are_valid_and_expand_without_skips():
    from bench.run import load_sweep

    for name in ("default", "smoke"):
        config = load_sweep(REPO / "bench" / "sweeps" / f"{name}.yaml")
        for family in methods.FAMILIES:
            templates = getattr(config.methods, family)
            refs, skipped = methods.expand_templates(family, templates, 384, config.ratios)
            assert refs or not templates
            assert skipped == [], skipped


def test_other_queries_drop_the_stored_truth_and_labels(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "base.npy", unit_rows(50, 8, 0))
    np.save(folder / "queries.npy", unit_rows(5, 8, 1))
    np.save(folder / "gt_ip_100.npy", np.zeros((5, 100), dtype=np.int32))
    (folder / "qrels.tsv").write_text("0\t3\n")
    np.save(tmp_path / "mine.npy", unit_rows(7, 8, 2))
    data = ds.load_dataset(folder, queries=tmp_path / "mine.npy")
    assert data.n_queries == 7 and data.gt is None and data.qrels is None
    assert data.name.startswith("dir-f-8-q")


def test_matrix_file_holds_out_queries_and_the_truth_is_cached(tmp_path, monkeypatch):
    X = unit_rows(300, 16, 2)
    path = tmp_path / "vectors.fvecs"
    write_fvecs(path, X)
    data = ds.load_dataset(path, n_queries=20, seed=5)
    assert (data.n_base, data.n_queries) == (280, 20)
    assert data.name == "file-vectors-16-holdout20"
    # the held-out queries are removed from the base, so none finds itself
    assert not (data.queries[:, None, :] == data.base[None]).all(axis=2).any()
    gt = ds.ground_truth(data, 10, tmp_path / "gt")
    cached = list((tmp_path / "gt").glob("*.npy"))
    assert len(cached) == 1 and gt.shape == (20, 10)

    def fail(*args, **kwargs):
        raise AssertionError("ground truth must come from the cache")

    monkeypatch.setattr(ds, "exact_knn", fail)
    again = ds.load_dataset(path, n_queries=20, seed=5)
    np.testing.assert_array_equal(ds.ground_truth(again, 10, tmp_path / "gt"), gt)


def test_qrels_for_a_single_matrix_need_its_query_file(tmp_path, capsys):
    # Held-out queries renumber base and queries; the labels used to be applied as is.
    np.save(tmp_path / "docs.npy", unit_rows(200, 8, 22))
    np.save(tmp_path / "queries.npy", unit_rows(5, 8, 23))
    (tmp_path / "qrels.tsv").write_text("0\t3\n")
    with pytest.raises(InputError, match="needs --queries"):
        ds.load_dataset(tmp_path / "docs.npy", qrels=tmp_path / "qrels.tsv")
    data = ds.load_dataset(
        tmp_path / "docs.npy", queries=tmp_path / "queries.npy", qrels=tmp_path / "qrels.tsv"
    )
    assert data.qrels == {0: {3: 1.0}} and data.n_base == 200
    argv = ["recommend", "--data", str(tmp_path / "docs.npy"), "--qrels"]
    assert embcomp_main([*argv, str(tmp_path / "qrels.tsv"), "--min-recall", "0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --queries" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ground_truth_spot_check_scores_the_base_in_blocks(metric):
    # It made a float64 copy of the whole base (2x its bytes; 7.7 GB for 1M x 960).

    from embcomp.evaluation import exact_knn

    base, queries = unit_rows(20_000, 64, 20), unit_rows(8, 64, 21)
    ids, _ = exact_knn(base, queries, 3, metric=metric)
    dataset = ds.Dataset("spot", base, queries, metric, gt=ids)
    _, peak = peak_bytes(lambda: ds._spot_check_ground_truth(dataset))
    assert peak < base.nbytes / 2
    wrong = ds.Dataset("spot", base, queries, metric, gt=ids[:, ::-1].copy())
    with pytest.raises(InputError, match="ground truth row 0 names base row"):
        ds._spot_check_ground_truth(wrong)


def test_ann_benchmarks_hdf5(tmp_path):
    import h5py

    base, queries = unit_rows(200, 12, 3) * 3.0, unit_rows(10, 12, 4) * 2.0
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        base / np.linalg.norm(base, axis=1, keepdims=True)
    ).T
    neighbors = np.argsort(-scores, axis=1)[:, :10].astype(np.int32)
    path = tmp_path / "toy-angular.hdf5"
    with h5py.File(path, "w") as handle:
        handle["train"], handle["test"], handle["neighbors"] = base, queries, neighbors
        handle.attrs["distance"] = "angular"
    data = ds.load_dataset(path)
    assert data.name == "hdf5-toy-angular-12" and data.metric == "ip"
    np.testing.assert_allclose(np.linalg.norm(data.base, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(ds.ground_truth(data, 10, None), neighbors)


def test_bad_dataset_references_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="neither a registered name"):
        ds.load_dataset("no-such-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="lacks base.npy"):
        ds.load_dataset(tmp_path / "empty")
    np.save(tmp_path / "a.npy", unit_rows(30, 8, 0))
    np.save(tmp_path / "q.npy", unit_rows(3, 9, 0))
    with pytest.raises(InputError, match="queries have 9 dims but the base has 8"):
        ds.load_dataset(tmp_path / "a.npy", queries=tmp_path / "q.npy")


# -- methods -----------------------------------------------------------------------------
def test_templates_expand_from_the_spec_grammar():
    refs, skipped = methods.expand_templates(
        "embcomp", ["{q}", "pca{d50},{q}", "{r}{d25},fp8", "pca{d/8},int8"], 64
    )
    quantizers = methods.fixed_rate_quantizers()
    assert refs[: len(quantizers)] == quantizers
    assert "fp32" not in quantizers and {"fp8", "int8", "bin"} <= set(quantizers)
    assert "pca32,int4" in refs and "pca8,int8" in refs
    assert {f"{r}16,fp8" for r in methods.numbered_reducers()} <= set(refs)
    assert not skipped
    faiss_refs, _ = methods.expand_templates("faiss", ["PCA{d50},SQ8", "PQ{d/8}"], 64)
    assert faiss_refs == ["PCA32,SQ8", "PQ8"]


@pytest.mark.parametrize("d,pq8,pq4", [(384, 48, 96), (100, 10, 25), (97, 1, 1), (1000, 125, 250)])
def test_pq_m_placeholder_picks_a_divisor_faiss_accepts(d, pq8, pq4):
    templates = ["PQ{m/8}", "OPQ{m/4},PQ{m/4}"]
    refs, skipped = methods.expand_templates("faiss", templates, d)
    assert refs == [f"PQ{pq8}", f"OPQ{pq4},PQ{pq4}"] and not skipped
    _, skipped = methods.expand_templates("faiss", ["PQ{d/8}"], 100)  # 12 does not divide 100
    assert skipped and "PQ12" in skipped[0]


def test_a_new_stage_joins_the_sweep_automatically(monkeypatch):
    from embcomp import codec as codec_module
    from embcomp import spec as spec_module
    from embcomp.quantizers import IntQuantizer

    info = spec_module.StageInfo("quantizer", "none", 4, "test-only quantizer")
    monkeypatch.setitem(spec_module.STAGES, "testq", info)
    monkeypatch.setitem(
        codec_module.STAGE_FACTORIES, "testq", lambda s: (IntQuantizer, {"bits": 4})
    )
    refs, _ = methods.expand_templates("embcomp", ["{q}", "pca{d50},{q}"], 32)
    assert "testq" in refs and "pca16,testq" in refs
    # a stage in the grammar without an implementation is skipped, with the reason
    monkeypatch.setitem(spec_module.STAGES, "nocode", info)
    refs, skipped = methods.expand_templates("embcomp", ["{q}"], 32)
    assert "nocode" not in refs
    assert any(s.startswith("embcomp:nocode:") and "no implementation" in s for s in skipped)


def test_invalid_expansions_are_skipped_with_reasons():
    templates = ["pca99,int8", "bogus"] + [f"{q}200" for q in methods.budget_quantizers()]
    refs, skipped = methods.expand_templates("embcomp", templates, 32)
    assert refs == []
    if methods.budget_quantizers():
        assert any("more than float32" in s for s in skipped)
    assert any("keeps 99 dims of 32" in s for s in skipped)
    assert any("unknown stage 'bogus'" in s for s in skipped)
    refs, skipped = methods.expand_templates("faiss", ["NotAnIndex"], 32)
    assert refs == [] and "FAISS cannot build" in skipped[0]
    with pytest.raises(SpecError, match="unknown method family"):
        methods.make_method("annoy:x")
    with pytest.raises(SpecError, match="unknown FAISS method option"):
        methods.make_method("faiss:SQ8", {"nlist": 3})


def test_family_options_reach_only_the_specs_that_take_them():
    method = methods.make_method("embcomp:pca8,int8", {"percentile": 99.0, "whiten": False})
    assert method.options == {"percentile": 99.0, "whiten": False}
    method = methods.make_method("embcomp:fp8", {"percentile": 99.0})
    assert method.options == {}


def test_alloc_codecs_are_fitted_for_the_metric_they_are_measured_by():
    X = unit_rows(400, 24, 6)
    for metric in ("ip", "l2"):
        method = methods.make_method("embcomp:pca,alloc6", {"kmeans_iters": 2})
        method.fit(X, metric)
        assert method.codec.options["metric"] == method.options["metric"] == metric
        assert method.describe()["options"]["metric"] == metric
    given = methods.make_method("embcomp:alloc6", {"metric": "l2", "kmeans_iters": 2})
    given.fit(X, "ip")  # the sweep's own option wins
    assert given.codec.quantizer.metric == "l2"
    plain = methods.make_method("embcomp:pca12,int8")
    plain.fit(X, "l2")
    assert "metric" not in plain.options and "metric" not in plain.codec.options


def test_shared_reducer_fit_gives_the_codec_a_fresh_fit_gives():
    X = unit_rows(400, 24, 6)
    first = methods.make_method("embcomp:pca12,int8")
    first.fit(X)
    second = methods.make_method("embcomp:pca12,fp8")
    second.fit(X)
    assert second.reducer_cached and second.fit_s >= first.reducer_fit_s
    fresh = methods.make_method("embcomp:pca12,fp8")
    fresh.codec.fit(X)
    np.testing.assert_array_equal(second.encode(X), fresh.codec.encode(X))
    np.testing.assert_array_equal(second.codec.reducer.components_, fresh.codec.reducer.components_)


def test_reused_reducer_counts_only_the_reducers_own_fit_time(monkeypatch):
    # The quantizer's fit is made slow: it must count once, in the codec that ran it,
    # never in the reducer time a later codec reuses (it was: all of the first fit).
    import time

    from embcomp.quantizers import IntQuantizer

    monkeypatch.setattr(methods.EmbcompMethod, "_reducer_cache", {})
    real_fit = IntQuantizer.fit

    def slow_fit(self, X, **kwargs):
        time.sleep(0.3)
        return real_fit(self, X, **kwargs)

    monkeypatch.setattr(IntQuantizer, "fit", slow_fit)
    X = unit_rows(400, 24, 16)
    first = methods.make_method("embcomp:pca12,int8")
    first.fit(X)
    assert not first.reducer_cached and first.fit_s >= 0.3 > first.reducer_fit_s
    second = methods.make_method("embcomp:pca12,fp8")
    second.fit(X)
    assert second.reducer_cached and second.reducer_fit_s == first.reducer_fit_s
    assert first.reducer_fit_s <= second.fit_s < 0.3


def test_codec_with_a_reused_reducer_is_an_ordinary_codec(monkeypatch):
    # It refits every stage (a patched no-op reducer.fit used to survive into the codec,
    # so refitting kept the old PCA).
    monkeypatch.setattr(methods.EmbcompMethod, "_reducer_cache", {})
    X, Y = unit_rows(400, 24, 17), 3 + 2 * unit_rows(400, 24, 18)[:, ::-1].copy()
    methods.make_method("embcomp:pca12,int8").fit(X)
    reused = methods.make_method("embcomp:pca12,fp16")
    reused.fit(X)
    assert reused.reducer_cached and "fit" not in vars(reused.codec.reducer)
    reused.codec.fit(Y)
    fresh = embcomp.make_codec("pca12,fp16").fit(Y)
    np.testing.assert_array_equal(reused.codec.reducer.mean_, fresh.reducer.mean_)
    np.testing.assert_array_equal(reused.codec.encode(Y), fresh.encode(Y))


def test_default_sweep_trains_faiss_at_its_defaults():
    from bench.run import load_sweep

    config = load_sweep(REPO / "bench" / "sweeps" / "default.yaml")
    options = config.options.get("faiss") or {}
    assert "kmeans_niter" not in options
    method = methods.make_method("faiss:OPQ48,PQ48", options)
    method.index = method.build(384)
    training = method.describe()["training"]
    assert training == {"opq_niter": 50, "pq_kmeans_niter": 25, "polysemous_training": False}


def test_faiss_search_only_codecs_search_their_own_codes():
    X = unit_rows(500, 32, 7)
    for name in ("faiss:LSH", "faiss:RaBitQ"):
        method = methods.make_method(name)
        method.fit(X[:300])
        assert not method.decodes
        codes = method.encode(X)
        ids = method.search(codes, X[:5], 3)
        assert ids.shape == (5, 3)
        assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself first
    pq = methods.make_method("faiss:PQ4", {"kmeans_niter": 2})
    pq.fit(X)
    assert pq.code_size == 4 and pq.decode(pq.encode(X)).shape == X.shape


# -- entry points ------------------------------------------------------------------------
def test_cli_modules_import_no_heavy_dependency():
    code = (
        "import sys, bench.cli, bench.__main__\n"
        "bench.cli.build_parser()\n"
        "heavy = ('faiss', 'matplotlib', 'tqdm', 'grpc', 'ray')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_embcomp_cli_has_the_bench_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        embcomp_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("sweep", "recommend", "claims"):
        assert command in out


def test_bench_main_hands_speed_its_own_arguments(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("bench.speed")
    fake.main = lambda argv: seen.setdefault("argv", list(argv)) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.speed", fake)
    assert bench_main(["speed", "--quick", "--repeats", "2"]) == 0
    assert seen["argv"] == ["--quick", "--repeats", "2"]


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    path = root / "mine.npy"
    np.save(path, unit_rows(1200, 32, 11))
    return path


def test_recommend_under_a_budget_writes_the_codec(user_file, tmp_path, capsys):
    codec_path = tmp_path / "best.codec"
    argv = ["recommend", "--data", str(user_file), "--budget-bytes", "16", "--quick"]
    assert embcomp_main([*argv, "--json", "-o", str(codec_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"spec", "code_size", "recall_at_10", "runner_up"} <= set(result)
    assert result["code_size"] <= 16 and 0 < result["recall_at_10"] <= 1
    if result["note"] is None:  # else a cheaper codec within the noise was preferred
        assert result["runner_up"]["recall_at_10"] <= result["recall_at_10"]
    assert result["data"]["n_queries"] == 120 and result["candidates_evaluated"] > 10
    codec = load_codec(codec_path)
    assert str(codec.spec) == result["spec"] and codec.code_size == result["code_size"]


def test_recommend_smallest_codec_meeting_a_recall(user_file, capsys):
    argv = ["recommend", "--data", str(user_file), "--min-recall", "0.9", "--quick"]
    assert embcomp_main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].startswith("best")
    best_line = out.splitlines()[2]
    recall = float(best_line.split("recall@10 ")[1].split()[0])
    assert recall >= 0.9
    assert "runner-up" in out


def test_recommend_for_cosine_search_keeps_to_normalizing_codecs(tmp_path, capsys):
    """--metric cos: recall over unit rows, every candidate starts with l2norm, and the
    saved codec scores the same recall by cosine on the raw (unnormalized) vectors."""
    from embcomp.evaluation import exact_knn, recall_at_k

    rng = np.random.default_rng(12)
    raw = unit_rows(1300, 32, 11) * rng.uniform(0.2, 5.0, size=(1300, 1)).astype(np.float32)
    base, queries = raw[:1200], raw[1200:]
    np.save(tmp_path / "raw.npy", base)
    np.save(tmp_path / "q.npy", queries)
    codec_path = tmp_path / "best.codec"
    argv = ["recommend", "--data", str(tmp_path / "raw.npy"), "--queries", str(tmp_path / "q.npy")]
    argv += ["--budget-bytes", "16", "--quick", "--metric", "cos", "--json", "-o", str(codec_path)]
    assert embcomp_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "cos" and result["spec"].startswith("l2norm,")
    assert result["runner_up"]["spec"].startswith("l2norm,")
    codec = load_codec(codec_path)
    true, _ = exact_knn(base, queries, 10, metric="cos")
    found, _ = exact_knn(codec.decode(codec.encode(base)), queries, 10, metric="cos")
    by_cosine = recall_at_k(found, true, 10, base=base, queries=queries, metric="cos")
    assert by_cosine == pytest.approx(result["recall_at_10"], abs=0.02)
    argv[argv.index("cos")] = "l2"
    assert embcomp_main(argv) == 0
    captured = capsys.readouterr()
    by_l2 = json.loads(captured.out)
    assert by_l2["metric"] == "l2" and by_l2["data"]["metric"] == "l2"
    assert not by_l2["spec"].startswith("l2norm")  # only cosine search may drop the norms


def test_recommend_points_out_unequal_norms_when_no_metric_is_given(tmp_path, capsys):
    from bench.recommend import norm_spread

    unit = unit_rows(600, 16, 3)
    assert norm_spread(unit) < 1.0001
    scaled = unit * np.linspace(1.0, 3.0, 600, dtype=np.float32)[:, None]
    assert norm_spread(scaled) == pytest.approx(3.0, rel=1e-6)
    for data, hinted in ((unit, False), (scaled, True)):
        np.save(tmp_path / "x.npy", data)
        argv = ["recommend", "--data", str(tmp_path / "x.npy"), "--budget-bytes", "8"]
        assert embcomp_main([*argv, "--quick", "--no-progress"]) == 0
        assert ("pass --metric cos" in capsys.readouterr().err) == hinted


def test_recommend_errors(user_file, capsys):
    assert embcomp_main(["recommend", "--data", str(user_file), "--min-recall", "1.5"]) == 2
    assert "--min-recall must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        embcomp_main(["recommend", "--data", str(user_file)])
    assert exc.value.code == 2


def test_narrower_rotation_names_the_coded_components():
    from bench.methods import narrower_rotation

    assert narrower_rotation("pca,alloc96", 384, 120) == "pca264,alloc96"
    assert narrower_rotation("pca,alloc96", 384, 0) is None  # every component coded
    assert narrower_rotation("pca,alloc96", 384, 384) is None  # nothing coded
    assert narrower_rotation("pca200,alloc96", 384, 50) is None  # already narrowed
    assert narrower_rotation("rot,alloc96", 384, 50) is None


def test_recommend_also_tries_the_narrower_rotation_of_full_pca_alloc():
    """A full-PCA alloc candidate that codes k < d components adds pca{k},alloc{B}."""
    from bench.methods import EmbcompMethod
    from bench.recommend import Candidate, narrower_specs

    rng = np.random.default_rng(5)
    X = (rng.standard_normal((3000, 32)) / np.arange(1, 33)).astype(np.float32)
    full = EmbcompMethod("pca,alloc4")
    full.fit(X, "ip")
    uncoded = full.codec.quantizer.describe()["uncoded_components"]
    assert 0 < uncoded < 32
    plain = EmbcompMethod("int8")
    plain.fit(X, "ip")
    candidates = [Candidate(full, {}), Candidate(plain, {})]
    want = f"pca{32 - uncoded},alloc4"
    assert narrower_specs(candidates, 32, ["pca,alloc4", "int8"]) == [want]
    assert narrower_specs(candidates, 32, [want]) == []  # measured already


def _candidate(spec, per_query, size, fit_s):
    from types import SimpleNamespace

    from bench.recommend import Candidate

    results = {
        "recall_at_10": float(np.mean(per_query)),
        "bytes_per_vector": size,
        "fit_s": fit_s,
    }
    return Candidate(SimpleNamespace(ref=spec), results, {"recall_at_10": list(per_query)})


def test_recommend_prefers_a_cheaper_codec_only_within_the_noise():
    from bench.recommend import paired_gap, prefer_cheaper

    rng = np.random.default_rng(3)
    base = rng.uniform(0.6, 0.9, 300)
    lead = rng.permutation(np.repeat([0.1, -0.1, 0.0], [105, 90, 105]))  # mean +0.005
    slow = _candidate("mpad16,int8", base + lead, 16, 100.0)
    fast_tied = _candidate("pca16,int8", base, 16, 1.0)
    gap, error = paired_gap(slow, fast_tied)
    assert 0 < gap <= 1.96 * error  # a lead the 300 queries cannot show
    ranked, note = prefer_cheaper([slow, fast_tied])
    assert [c.spec for c in ranked] == ["pca16,int8", "mpad16,int8"]
    assert note.startswith("pca16,int8 over mpad16,int8: a 100x faster fit")
    assert "300 queries" in note

    # a fit less than twice as fast is not told apart: the top recall stays
    near = _candidate("pca16,int8", fast_tied.per_query["recall_at_10"], 16, 60.0)
    assert prefer_cheaper([slow, near]) == ([slow, near], None)
    # a real lead stays, however cheap the other codec
    worse = _candidate("int4", base - 0.05, 16, 0.01)
    assert prefer_cheaper([slow, worse]) == ([slow, worse], None)
    # fewer bytes within the noise win; among several tied, the highest recall
    small = _candidate("pca8,int8", fast_tied.per_query["recall_at_10"], 8, 50.0)
    smaller = _candidate("pca4,int8", np.asarray(small.per_query["recall_at_10"]) - 0.001, 4, 1.0)
    ranked, note = prefer_cheaper([slow, small, smaller])
    assert ranked[0] is small and "8 fewer bytes per vector" in note


def test_recommend_stops_trying_a_reducer_whose_cheapest_swap_lost_to_pca():
    """On 19,000 x 1,536 vectors the swaps took minutes (mpad1283,alloc192 alone ~5 min)
    after mpad192,int8 had already trailed pca192,int8."""
    from types import SimpleNamespace

    from bench.recommend import _measure_swaps, second_stage_specs
    from embcomp.spec import parse_spec

    def seed(spec, recall):
        cand = _candidate(spec, [recall] * 10, 8, 1.0)
        cand.method.codec = SimpleNamespace(spec=parse_spec(spec))
        return cand

    seeds = [seed("pca24,alloc8", 0.9), seed("pca8,int8", 0.8), seed("pca8,fp8", 0.79)]
    swaps = second_stage_specs(seeds, 32, 8)
    assert [spec for spec, _ in swaps] == ["mpad8,int8", "mpad8,fp8", "mpad24,alloc8"]
    assert swaps[0][1] is seeds[1]  # each swap knows the PCA candidate it replaces

    def run(first_recall):
        asked, logged = [], []

        def measure(specs):
            asked.extend(specs)
            return [_candidate(specs[0], [first_recall if not asked[1:] else 0.5] * 10, 8, 9.0)]

        return [c.spec for c in _measure_swaps(swaps, measure, logged.append)], asked, logged

    measured, asked, logged = run(0.75)  # below pca8,int8's 0.8: MPAD is not tried again
    assert measured == asked == ["mpad8,int8"]
    assert logged == [
        f"skipped {spec}: mpad did not beat pca in its first trial here "
        "(mpad8,int8 recall@10 0.7500, pca8,int8 0.8000)"
        for spec in ("mpad8,fp8", "mpad24,alloc8")
    ]
    measured, asked, logged = run(0.85)  # ahead: every swap is measured, whatever follows
    assert measured == asked == ["mpad8,int8", "mpad8,fp8", "mpad24,alloc8"] and not logged


def test_harness_argument_mistakes_stop_before_any_work(tmp_path, capsys):
    from bench import frontier, speed

    with pytest.raises(SystemExit, match="give a .json path"):
        speed.main(
            [
                "--shapes",
                "100x8",
                "--repeats",
                "1",
                "--no-jit-cost",
                "--output",
                str(tmp_path / "x.md"),
            ]
        )
    with pytest.raises(SystemExit, match="not among the measured specs"):
        speed.main(
            ["--shapes", "100x8", "--repeats", "1", "--no-jit-cost", "--no-write", "--specs", "foo"]
        )
    with pytest.raises(SystemExit, match="not a readable .npy"):
        speed.main(
            ["--shapes", "100x8", "--no-jit-cost", "--no-write", "--data", str(tmp_path / "no.npy")]
        )
    with pytest.raises(SystemExit):
        frontier.main(["--quick"])  # would replace the committed full-run results
    assert "--quick writes a smoke report" in capsys.readouterr().err
    np.save(tmp_path / "few.npy", unit_rows(10, 8, 1))
    assert (
        embcomp_main(["recommend", "--data", str(tmp_path / "few.npy"), "--budget-bytes", "8"]) == 2
    )
    assert "at least 11 vectors" in capsys.readouterr().err


def test_frontier_measures_embcomp_at_rabitqs_real_code_sizes():
    # RaBitQ's sizes were computed 8x too small (14/20/32 B at d=384), so no embcomp
    # codec was ever measured at the sizes FAISS's RaBitQ really takes.
    from bench import frontier

    assert frontier.rabitq_code_sizes(384) == [56, 116, 212]
    assert frontier.rabitq_code_sizes(768) == [104, 212, 404]
    X = unit_rows(300, 64, 19)
    for bits, size in zip((1, 2, 4), frontier.rabitq_code_sizes(64), strict=True):
        method = methods.make_method("faiss:RaBitQ" + ("" if bits == 1 else str(bits)))
        method.fit(X)
        assert method.encode(X[:3]).shape == (3, size)
    names = frontier.headline_methods(384, quick=False)
    assert {"embcomp:pca,alloc56", "embcomp:pca,alloc116", "embcomp:pca,alloc212"} <= set(names)


def test_frontier_skip_leaves_a_method_out_and_a_typo_stops_before_any_work(capsys):
    # --skip is for a FAISS fit too slow for the machine (OPQ384,PQ384 on 768-d input:
    # over an hour on 2 cores); a name that is no method of the run would be a no-op
    # noticed an hour later, so it stops the run at once.
    from bench import frontier

    assert frontier.unknown_skips(["faiss:OPQ384,PQ384"], [384, 768], quick=False) == []
    assert frontier.unknown_skips(["faiss:OPQ384,PQ384"], [384], quick=False) == [
        "faiss:OPQ384,PQ384"
    ]
    with pytest.raises(SystemExit):
        frontier.main(["--skip-wordnet", "--skip", "faiss:OPQ348,PQ348", "--out", "/nonexistent"])
    err = capsys.readouterr().err
    assert "--skip faiss:OPQ348,PQ348: not a method of this run" in err
    assert "faiss:OPQ384,PQ384" in err  # the choices are listed
    report = {
        "environment": {"date": "2026-12-05", "machine": "m", "skipped": ["faiss:OPQ384,PQ384"]},
        "datasets": [],
        "mpad": "",
    }
    assert "Left out of this run (`--skip`): faiss:OPQ384,PQ384." in frontier.markdown(report)


def test_frontier_gives_faiss_opq_at_every_ratio_from_8x():
    # The 8x row's best FAISS codec was PQ192 while OPQ192,PQ192 (0.9424 recall@10 on
    # wordnet, fit 15 min) was never measured: it is FAISS's best at that size.
    from bench import frontier

    for d in (384, 768):
        names = set(frontier.headline_methods(d, quick=False))
        assert {f"faiss:OPQ{d // r},PQ{d // r}" for r in (2, 4, 8)} <= names


def test_alloc_metric_study_measures_both_metrics_and_faiss_pq(tmp_path):
    pytest.importorskip("faiss")
    from bench import alloc_metric

    data = alloc_metric.make_cone(d=32, n_base=1200, n_queries=40)
    assert data.train.shape == (1200, 32) and data.queries.shape == (40, 32)
    np.testing.assert_allclose(np.linalg.norm(data.base, axis=1), 1.0, rtol=1e-5)
    assert float(data.base.mean(axis=0) @ data.base.mean(axis=0)) > 0.5  # a narrow cone
    rows = alloc_metric.measure(data, [8], [0, 1], lambda row: None)
    assert [(r["method"], r["metric"], r["seed"]) for r in rows] == [
        ("pca,alloc8", "ip", 0),
        ("pca,alloc8", "ip", 1),
        ("pca,alloc8", "l2", 0),
        ("pca,alloc8", "l2", 1),
        ("FAISS PQ8", "", None),
    ]
    assert all(0.0 < r["recall_at_10"] <= 1.0 and r["fit_s"] >= 0.0 for r in rows)
    assert rows[-1]["fit_s"] > 0.0  # FAISS's fit is timed too
    report = {"embcomp": "x", "minutes": 0.1, "datasets": {data.name: {"note": "n", "rows": rows}}}
    text = alloc_metric.markdown(report)
    assert "| 8 | " in text and f"{rows[-1]['recall_at_10']:.4f} |" in text


def test_alloc_metric_study_names_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys):
    from bench import alloc_metric

    monkeypatch.setattr(alloc_metric, "WORDNET", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_info:
        alloc_metric.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "MiniLM data is not at" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        alloc_metric.main(["--skip-wordnet", "--out", str(a_file)])
    assert "is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x" and not (tmp_path / "out").exists()
