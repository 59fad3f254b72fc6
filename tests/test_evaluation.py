import math

import numpy as np
import pytest
from memory import peak_bytes

from embcomp import InputError
from embcomp.evaluation import (
    exact_knn,
    load_qrels,
    ndcg_at_k,
    recall_at_k,
    relevance_recall_at_k,
)


def unit(X):
    X = X.astype(np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms == 0, 1.0, norms)


def brute_force(base, queries, k, metric):
    if metric == "cos":
        base, queries, metric = unit(base), unit(queries), "ip"
    if metric == "ip":
        scores = queries.astype(np.float64) @ base.T.astype(np.float64)
    else:
        scores = -((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(base)), scores.shape), -scores), axis=1)
    return order[:, :k]


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_exact_knn_matches_brute_force(metric, rng_data):
    base, queries = rng_data[:500], rng_data[500:]
    # norms from 0.1 to 10 (and a zero row): cosine and inner product rank differently
    scale = np.random.default_rng(1).uniform(0.1, 10.0, size=(500, 1)).astype(np.float32)
    base = base * scale
    base[17] = 0.0
    ids, scores = exact_knn(base, queries, 7, metric=metric)
    np.testing.assert_array_equal(ids, brute_force(base, queries, 7, metric))
    if metric == "l2":
        all_scores = ((queries[:, None] - base[None]) ** 2).sum(-1)
    else:
        all_scores = unit(queries) @ unit(base).T if metric == "cos" else queries @ base.T
    expected = np.take_along_axis(all_scores, ids, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    if metric == "cos":  # not the inner-product ranking: the norms are ignored
        assert (ids != exact_knn(base, queries, 7)[0]).any()
        every_id, every_score = exact_knn(base, queries[:1], 500, metric="cos")
        assert every_score[every_id == 17].tolist() == [0.0]  # the zero row scores 0
        assert np.abs(every_score).max() <= 1.0 + 1e-6


def test_exact_knn_breaks_ties_by_lower_index():
    base = np.array([[1.0, 0], [0, 1], [1.0, 0], [1.0, 0]], dtype=np.float32)
    ids, _ = exact_knn(base, np.array([[1.0, 0]], dtype=np.float32), 2)
    assert ids.tolist() == [[0, 2]]


def test_exact_knn_orders_many_ties_like_a_full_sort(monkeypatch):
    """Quantized vectors tie often: with a handful of distinct rows repeated, every
    query's top k is the full (score desc, id asc) order, whatever the blocks."""
    import embcomp.evaluation as ev

    rng = np.random.default_rng(5)
    base = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)[rng.integers(0, 6, size=300)]
    queries = rng.integers(-2, 3, size=(50, 4)).astype(np.float32)
    scores = queries @ base.T
    expected = np.array([np.lexsort((np.arange(300), -row))[:25] for row in scores])
    for b_block, q_block in ((300, 256), (37, 9), (1, 1)):
        monkeypatch.setattr(ev, "_B_BLOCK", b_block)
        monkeypatch.setattr(ev, "_Q_BLOCK", q_block)
        ids, _ = exact_knn(base, queries, 25)
        np.testing.assert_array_equal(ids, expected)


def test_exact_knn_blocks_agree(monkeypatch, rng_data):
    import embcomp.evaluation as ev

    full, _ = exact_knn(rng_data[:500], rng_data[500:], 10)
    monkeypatch.setattr(ev, "_B_BLOCK", 37)
    monkeypatch.setattr(ev, "_Q_BLOCK", 9)
    blocked, _ = exact_knn(rng_data[:500], rng_data[500:], 10)
    np.testing.assert_array_equal(full, blocked)


def test_blocked_knn_unchecked_is_the_top_k_of_the_whole_and_ranks_nan_last(monkeypatch):
    """alloc's norm-code check searches reconstructions that may overflow: blocked_knn
    without checks must still give the whole matrix's top k, whatever the blocks, and
    never rank a NaN score above a number."""
    import embcomp.evaluation as ev

    rng = np.random.default_rng(8)
    for n in (1, 9, 10, 11, 500):
        queries = rng.standard_normal((40, 6)).astype(np.float32)
        base = rng.standard_normal((n, 6)).astype(np.float32)
        base[n // 2] = np.nan
        scores = np.where(np.isnan(queries @ base.T), -np.inf, queries @ base.T)
        whole = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        for b_block, q_block in ((1, 1), (4, 7), (64, 256), (65536, 256)):
            monkeypatch.setattr(ev, "_B_BLOCK", b_block)
            monkeypatch.setattr(ev, "_Q_BLOCK", q_block)
            got, _ = ev.blocked_knn(base, queries, 10)
            assert [set(r) for r in got] == [set(r) for r in whole], (n, b_block)


def test_recall_counts_overlap_and_ties():
    base = np.array([[3.0], [2.0], [2.0], [1.0]], dtype=np.float32)
    queries = np.array([[1.0]], dtype=np.float32)
    true = np.array([[0, 1]])
    assert recall_at_k(np.array([[0, 1]]), true, 2) == 1.0
    assert recall_at_k(np.array([[0, 3]]), true, 2) == 0.5
    # id 2 ties with the true 2nd neighbour: a hit only when scores are consulted
    assert recall_at_k(np.array([[0, 2]]), true, 2) == 0.5
    assert recall_at_k(np.array([[0, 2]]), true, 2, base=base, queries=queries) == 1.0
    # duplicates never count twice
    assert recall_at_k(np.array([[0, 0]]), true, 2, base=base, queries=queries) == 0.5


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_recall_tie_tolerance_follows_the_scale_of_the_vectors(metric):
    """Ties are judged relative to the vectors' size: with an absolute tolerance, at
    norm 1e-6 every random id 'tied' (recall 0.9995 for random results), and at norm
    1e4 a score one float32 rounding below the k-th missed."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2000, 64)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[:50] + 0.1 * rng.standard_normal((50, 64)).astype(np.float32)
    random_ids = rng.integers(0, 2000, size=(50, 10))
    for factor in (1e-6, 1.0, 1e4):
        base, queries = X * np.float32(factor), Q * np.float32(factor)
        true, _ = exact_knn(base, queries, 10, metric=metric)
        at = recall_at_k(random_ids, true, 10, base=base, queries=queries, metric=metric)
        assert at < 0.05, (factor, at)
        assert recall_at_k(true, true, 10, base=base, queries=queries, metric=metric) == 1.0
    # a copy of the k-th neighbour whose float32 score is a rounding lower still ties
    base = np.vstack([X, X[:1]]).astype(np.float32) * np.float32(1e4)
    q = base[:1] * np.float32(1.0001)
    true, _ = exact_knn(base[:-1], q, 2, metric=metric)
    kth = base[true[0, -1]]
    base[-1] = np.nextafter(kth, np.float32(0))  # every value one ulp towards 0
    found = np.array([[true[0, 0], len(base) - 1]])
    assert recall_at_k(found, true, 2, base=base, queries=q, metric=metric) == 1.0


def test_recall_matches_brute_force_reference(rng_data):
    rng = np.random.default_rng(0)
    true = brute_force(rng_data[:300], rng_data[300:340], 10, "ip")
    found = true.copy()
    found[:, 5:] = rng.integers(0, 300, size=(40, 5))
    expected = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, true, strict=True)])
    assert recall_at_k(found, true, 10) == pytest.approx(expected)


def test_ndcg_and_relevance_recall(tmp_path):
    ids = np.array([[5, 1, 2], [7, 8, 9]])
    qrels = {0: {1: 1.0}, 1: {9: 1.0, 4: 1.0}}
    expected0 = (1 / math.log2(3)) / 1.0
    expected1 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ids, qrels, 3) == pytest.approx((expected0 + expected1) / 2)
    assert relevance_recall_at_k(ids, qrels, 3) == pytest.approx((1 + 0.5) / 2)
    path = tmp_path / "q.tsv"
    path.write_text("0\t1\n1\t9\n1\t4\n")
    assert load_qrels(path) == qrels
    assert ndcg_at_k(ids, {0: {1}}, 3) == pytest.approx(expected0)


def test_search_and_scoring_arguments_are_checked():
    X = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    bad = X.copy()
    bad[7, 1] = np.nan
    ids = np.tile(np.arange(5), (3, 1))
    cases = [
        (lambda: exact_knn(X, X, 2.5), "k must be an integer >= 1"),
        (lambda: exact_knn(X, X[:0], 3, metric="cosine"), "metric must be 'ip', 'l2' or 'cos'"),
        (lambda: exact_knn(X, bad, 3), "queries row 7 contains NaN"),
        (lambda: exact_knn(bad, X, 3), "base row 7 contains NaN"),
        (lambda: recall_at_k(ids, ids, 0), "k must be an integer >= 1"),
        (lambda: recall_at_k(ids[0], ids[0], 3), "2-D integer arrays"),
        (lambda: recall_at_k(ids, ids, 3, metric="IP"), "metric must be"),
        (lambda: recall_at_k(ids + 100, ids, 3, base=X, queries=X[:3]), "beyond the 50 base"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def far_from_origin(offset, spread=0.1, n=2000, m=20, d=32):
    """Tight vectors far from 0 (offset/spread 1e4), and queries near some of them."""
    rng = np.random.default_rng(5)
    base = (offset + rng.standard_normal((n, d)) * spread).astype(np.float32)
    queries = (base[:m] + rng.standard_normal((m, d)) * spread / 10).astype(np.float32)
    return base, queries


def test_l2_search_far_from_the_origin_keeps_its_digits():
    # |q|^2 + |x|^2 - 2 q.x in float32 lost every digit here: recall@10 was 0.006 and
    # distances came out negative. Measured from a point near the data, it is exact.
    base, queries = far_from_origin(1000.0)
    truth = brute_force(base, queries, 10, "l2")
    ids, distances = exact_knn(base, queries, 10, metric="l2")
    assert recall_at_k(ids, truth, 10) >= 0.99
    exact = ((queries[:, None].astype(np.float64) - base[ids]) ** 2).sum(-1)
    assert (distances >= 0).all()
    np.testing.assert_allclose(distances, exact, rtol=1e-3, atol=1e-4)


def test_recall_with_a_large_k_needs_no_k_squared_memory():

    rng = np.random.default_rng(3)
    m, k, n = 256, 2048, 6000
    true = np.stack([rng.permutation(n)[:k] for _ in range(m)])
    found = np.where(
        rng.random((m, k)) < 0.5, true[:, rng.permutation(k)], rng.integers(0, n, (m, k))
    )
    expected = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, true, strict=True)])
    got, peak = peak_bytes(lambda: recall_at_k(found, true, k))
    assert got == pytest.approx(expected)
    assert peak < 64 << 20  # the (m, k, k) comparison took 1 GiB


def test_exact_search_memory_stays_bounded_by_its_blocks():
    """256 queries x 65,536 base rows at a time took 270 MB at once (scores, their
    negation and argpartition's int64 indices), whatever the vectors' width."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((100_000, 8)).astype(np.float32)
    queries = rng.standard_normal((300, 8)).astype(np.float32)
    (ids, _), peak = peak_bytes(lambda: exact_knn(base, queries, 10))
    assert peak < 96 << 20
    expected = np.argsort(-(queries[:5] @ base.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids[:5], expected)


def test_recall_counts_each_found_id_once_like_a_set_intersection():
    rng = np.random.default_rng(11)
    for _ in range(300):  # duplicates, -1 padding, more found columns than k
        m, k = int(rng.integers(0, 20)), int(rng.integers(1, 12))
        n = int(rng.integers(k, 40))
        true = np.array([rng.permutation(n)[:k] for _ in range(m)], dtype=np.int64).reshape(m, k)
        found = rng.integers(-1, n, (m, k + int(rng.integers(0, 3))))
        pairs = zip(found[:, :k].tolist(), true.tolist(), strict=True)
        expected = np.mean([len(set(f) & set(t)) / k for f, t in pairs]) if m else 0.0
        assert recall_at_k(found, true, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1000.0, 1e6])
def test_l2_ties_on_an_integer_grid_stay_exact_near_and_far_from_the_origin(offset):
    # Measured from a fractional mean, equal distances between integer vectors would
    # round apart and break "ties go to the lower id"; the centre keeps them integers.
    rng = np.random.default_rng(2)
    base = (offset + rng.integers(0, 3, (500, 4))).astype(np.float32)
    queries = (offset + rng.integers(0, 3, (20, 4))).astype(np.float32)
    ids, distances = exact_knn(base, queries, 10, metric="l2")
    np.testing.assert_array_equal(ids, brute_force(base, queries, 10, "l2"))
    exact = ((queries[:, None].astype(np.float64) - base[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(distances, np.take_along_axis(exact, ids, axis=1))
