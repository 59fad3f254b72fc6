"""MPAD reducer: exact objective, gradient, orthogonality penalty, subspace recovery, options."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from memory import peak_bytes

import embcomp
from embcomp import DimensionMismatchError, MPADReducer, SpecError, make_codec
from embcomp.cli import main
from embcomp.evaluation import exact_knn, recall_at_k
from embcomp.reducers._mpad import GapTailObjective, axis_objective


def _brute_force(X: np.ndarray, v: np.ndarray, b: float, tail: str) -> tuple[float, np.ndarray]:
    """Tail mean and gradient from all pairs listed explicitly (O(n^2) memory)."""
    p = X @ v
    i, j = np.triu_indices(len(X), 1)
    diffs = p[i] - p[j]
    gaps = np.abs(diffs)
    k = int(min(len(gaps), max(1, round(b / 100 * len(gaps)))))
    order = np.argsort(gaps, kind="stable")
    chosen = order[:k] if tail == "lower" else order[len(gaps) - k :]
    grad = (np.sign(diffs[chosen])[:, None] * (X[i[chosen]] - X[j[chosen]])).sum(axis=0)
    return float(gaps[chosen].mean()), grad / k


def _subspace_data(seed: int = 7, d: int = 32, m: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(1100, d) float32 points on an m-dim subspace (plus 1e-3 noise), and its basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, m)))[0]
    latent = rng.standard_normal((1100, m)) * np.linspace(3.0, 1.0, m)
    X = latent @ basis.T + 1e-3 * rng.standard_normal((1100, d)) + 0.5
    return X.astype(np.float32), basis


def _max_overlap(components: np.ndarray) -> float:
    gram = components.astype(np.float64) @ components.T.astype(np.float64)
    return float(np.abs(gram - np.diag(np.diag(gram))).max())


# -- the objective ---------------------------------------------------------------------
# n = 300 lists every pair directly; n = 700 (244,650 pairs) goes through the threshold
# search, whose final bracket is capped at 65,536 pairs.
@pytest.mark.parametrize("n", [2, 3, 40, 300, 700])
@pytest.mark.parametrize("tail,b", [("lower", 60.0), ("lower", 80.0), ("lower", 100.0),
                                    ("upper", 0.5), ("upper", 8.0), ("lower", 0.1)])  # fmt: skip
def test_exact_objective_matches_all_pairs(n, tail, b):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 5)) * np.array([3.0, 1.0, 1.0, 0.5, 0.1])
    v = rng.standard_normal(5)
    v /= np.linalg.norm(v)
    value, grad = GapTailObjective(X, b=b, tail=tail)(v)
    expected_value, expected_grad = _brute_force(X, v, b, tail)
    assert value == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_tied_gaps_give_exact_value():
    """Duplicated points make many equal gaps; the tail sum stays exact."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 3))
    X[100:300] = X[0]
    v = np.array([0.6, 0.8, 0.0])
    for tail, b in (("lower", 60.0), ("lower", 30.0), ("upper", 5.0)):
        value, _ = GapTailObjective(X, b=b, tail=tail)(v)
        assert value == pytest.approx(_brute_force(X, v, b, tail)[0], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("tail,b", [("lower", 80.0), ("upper", 2.0)])
@pytest.mark.parametrize("pairs", [False, True])
def test_analytic_gradient_matches_finite_differences(tail, b, pairs):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((60, 6)) * np.array([2.0, 1.5, 1.0, 0.7, 0.4, 0.2])
    sample = None
    if pairs:
        sample = (rng.integers(0, 60, 500), (rng.integers(1, 60, 500)))
        sample = (sample[0], (sample[0] + sample[1]) % 60)
    objective = GapTailObjective(X, b=b, tail=tail, pairs=sample)
    previous = np.linalg.qr(rng.standard_normal((6, 2)))[0].T  # two frozen unit axes
    w = rng.standard_normal(6) * 1.7  # unnormalized on purpose
    value, grad = axis_objective(objective, previous, 3.0, w)
    eps = 1e-6
    numeric = np.array(
        [
            (
                axis_objective(objective, previous, 3.0, w + eps * e)[0]
                - axis_objective(objective, previous, 3.0, w - eps * e)[0]
            )
            / (2 * eps)
            for e in np.eye(6)
        ]
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    # Phi depends on the direction only: no radial component.
    assert abs(grad @ w) < 1e-10 * np.linalg.norm(grad) * np.linalg.norm(w)
    assert value == pytest.approx(axis_objective(objective, previous, 3.0, 5 * w)[0], rel=1e-12)


def test_objective_memory_does_not_grow_with_pairs():
    """40,000 points = 8e8 pairs; an evaluation allocates a few O(n) arrays only."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40_000, 4))
    objective = GapTailObjective(X, b=80.0, tail="lower")
    (value, _), peak = peak_bytes(lambda: objective(np.array([0.5, 0.5, 0.5, 0.5])))
    assert value > 0
    assert peak < 40e6, f"peak {peak / 1e6:.1f} MB"  # all pairs as float64 would be 6.4 GB


# -- the reducer ---------------------------------------------------------------------------
def test_recovers_a_low_dimensional_subspace():
    X, basis = _subspace_data()
    base, queries = X[:1000], X[1000:]
    codec = make_codec("mpad4").fit(base)
    truth, _ = exact_knn(base, queries, 10)
    found, _ = exact_knn(
        codec.decode(codec.encode(base), reduced=True), codec.project_queries(queries), 10
    )
    assert recall_at_k(found, truth, 10) >= 0.95
    # and the span of the axes is the subspace: all principal angles near zero
    axes = np.linalg.qr(codec.reducer.components_.T.astype(np.float64))[0]
    cosines = np.linalg.svd(basis.T @ axes, compute_uv=False)
    assert cosines.min() > 0.999


def test_large_alpha_makes_axes_nearly_orthogonal(rng_data):
    orthogonal = MPADReducer(6, alpha=1000.0).fit(rng_data)
    assert _max_overlap(orthogonal.components_) < 0.05
    # without the penalty every axis climbs to the same few best directions
    free = MPADReducer(6, alpha=0.0).fit(rng_data)
    assert _max_overlap(free.components_) > 0.5


def test_fitted_state_and_pseudo_inverse(rng_data):
    reducer = MPADReducer(8, alpha=1.0).fit(rng_data)
    assert reducer.components_.shape == reducer.inverse_components_.shape == (8, 48)
    assert reducer.components_.dtype == np.float32 and reducer.mean_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reducer.components_, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(reducer.mean_, rng_data.mean(axis=0), atol=1e-5)
    # pinv: reconstructing reconstructed vectors changes nothing (a projection)
    once = reducer.inverse_transform(reducer.transform(rng_data))
    twice = reducer.inverse_transform(reducer.transform(once))
    np.testing.assert_allclose(twice, once, atol=1e-4)
    assert not reducer.has_orthonormal_rows
    assert reducer.fit_info_["n_train"] == 600 and len(reducer.fit_info_["nit"]) == 8


def test_seeded_deterministic_and_nested(rng_data):
    a = MPADReducer(6, seed=3).fit(rng_data)
    b = MPADReducer(6, seed=3).fit(rng_data)
    np.testing.assert_array_equal(a.components_, b.components_)
    assert not np.array_equal(MPADReducer(6, seed=4).fit(rng_data).components_, a.components_)
    # greedy: the first axes of a wider fit are the narrower fit (the study relies on it)
    wider = MPADReducer(9, seed=3).fit(rng_data)
    np.testing.assert_array_equal(wider.components_[:6], a.components_)


def test_nested_with_two_stages_and_a_sample():
    rng = np.random.default_rng(6)
    X = (rng.standard_normal((2300, 8)) * np.linspace(2.0, 0.5, 8)).astype(np.float32)
    narrow = MPADReducer(2, max_iter=10, n_train=2200).fit(X)
    wide = MPADReducer(3, max_iter=10, n_train=2200).fit(X)
    np.testing.assert_array_equal(wide.components_[:2], narrow.components_)


def test_two_stage_fit_on_more_than_the_coarse_sample():
    """Above 2,048 training vectors each axis is refined on all of them."""
    rng = np.random.default_rng(5)
    X = (rng.standard_normal((3000, 16)) * np.linspace(3.0, 0.2, 16)).astype(np.float32)
    reducer = MPADReducer(3, max_iter=40, n_train=2500).fit(X)
    assert reducer.fit_info_["n_train"] == 2500
    assert all(nit > 0 for nit in reducer.fit_info_["nit"])
    # on anisotropic Gaussian data the best-spread axes are the top principal ones
    top = np.eye(16)[:3]
    cosines = np.linalg.svd(top @ reducer.components_.T.astype(np.float64), compute_uv=False)
    assert cosines.min() > 0.95


@pytest.mark.parametrize(
    "options", [{"tail": "upper", "b": 2.0, "alpha": 5.0}, {"n_pairs": 20_000}, {"init": "pca"}]
)
def test_variants_recover_the_subspace(options):
    X, _ = _subspace_data(seed=8)
    base, queries = X[:1000], X[1000:]
    codec = make_codec("mpad4", **options).fit(base)
    truth, _ = exact_knn(base, queries, 10)
    found, _ = exact_knn(
        codec.decode(codec.encode(base), reduced=True), codec.project_queries(queries), 10
    )
    assert recall_at_k(found, truth, 10) >= 0.95


# -- spec, options, artifacts, CLI -------------------------------------------------------------
def test_spec_stage():
    spec = embcomp.parse_spec("MPAD128,int8")
    assert str(spec) == "mpad128,int8" and spec.code_size(384) == 128
    assert embcomp.parse_spec("mpad192,fp8").code_size(384) == 192
    with pytest.raises(SpecError, match="needs a number"):
        embcomp.parse_spec("mpad,fp8")


def test_options_are_recorded_in_the_artifact(rng_data, tmp_path):
    codec = make_codec("mpad5,fp8", alpha=2.5, b=70, tail="upper", init="pca", max_iter=20, seed=9)
    codec.fit(rng_data)
    path = embcomp.save_codec(codec, tmp_path / "m.codec")
    options = embcomp.read_manifest(path)["options"]
    expected = {"alpha": 2.5, "b": 70, "tail": "upper", "init": "pca", "max_iter": 20, "seed": 9}
    assert {k: options[k] for k in expected} == expected
    assert options["n_train"] == 20000 and options["n_pairs"] is None
    loaded = embcomp.load_codec(path)
    np.testing.assert_array_equal(loaded.encode(rng_data), codec.encode(rng_data))
    np.testing.assert_array_equal(loaded.reducer.components_, codec.reducer.components_)


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"tail": "middle"}, SpecError, "tail"),
        ({"init": "svd"}, SpecError, "init"),
        ({"b": 0}, SpecError, "percentage"),
        ({"b": 120}, SpecError, "percentage"),
        ({"alpha": -1}, SpecError, "alpha"),
        ({"alpha": True}, SpecError, "alpha"),
        ({"n_train": 1}, SpecError, "n_train"),
        ({"n_pairs": 0}, SpecError, "n_pairs"),
        ({"max_iter": 0}, SpecError, "max_iter"),
    ],
)
def test_bad_options(rng_data, options, error, message):
    with pytest.raises(error, match=message):
        make_codec("mpad4,fp8", **options).fit(rng_data)


def test_too_many_components(rng_data):
    with pytest.raises(DimensionMismatchError, match="mpad48"):
        make_codec("mpad64,int8").fit(rng_data)


def test_too_few_training_vectors(rng_data):
    """Two vectors give one pair, and the axes all lean towards it (ill-conditioned);
    from three on the fit is exact on its training rows."""
    with pytest.raises(embcomp.InputError, match="needs at least 3; got 2"):
        make_codec("mpad48,fp32").fit(rng_data[:2])
    codec = make_codec("mpad48,fp32").fit(rng_data[:3])
    decoded = codec.decode(codec.encode(rng_data[:3]))
    np.testing.assert_allclose(decoded, rng_data[:3], atol=1e-4)


def test_cli_fit_with_mpad_options(tmp_path, rng_data, capsys):
    train = tmp_path / "train.npy"
    np.save(train, rng_data)
    out = tmp_path / "m.codec"
    argv = ["fit", "--spec", "mpad6,int8", "--train", str(train), "-o", str(out)]
    assert main(argv + ["--option", "alpha=4", "--option", "tail=upper", "--option", "b=3"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"] == "mpad6,int8" and info["code_size"] == 6
    assert info["options"]["alpha"] == 4 and info["options"]["tail"] == "upper"


def test_study_script_quick_run(tmp_path, monkeypatch):
    """bench/mpad_vs_pca.py end to end on its small synthetic set (the full run is manual)."""
    pytest.importorskip("faiss")
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "mpad_vs_pca.py"
    spec = importlib.util.spec_from_file_location("mpad_vs_pca", path)
    assert spec is not None and spec.loader is not None
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mpad_vs_pca", study)  # dataclasses look it up
    spec.loader.exec_module(study)
    assert study.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "mpad_vs_pca.json").read_text())["results"]
    table = results[0]["table"]
    assert [row["dims"] for row in table] == [2, 4, 8, 12]
    for row in table:
        assert 0.0 <= row["pca_recall"] <= 1.0 and 0.0 <= row["mpad_default_recall"] <= 1.0
    assert (tmp_path / "mpad_vs_pca.png").stat().st_size > 0
    assert "| dims |" in (tmp_path / "mpad_vs_pca.md").read_text()
