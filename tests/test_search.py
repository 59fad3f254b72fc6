"""Search over codes: one stage equals exact search of the decoded vectors; two stages
re-rank the small code's candidates with the large code."""

from __future__ import annotations

import numpy as np
import pytest

from embcomp import DimensionMismatchError, InputError, NotFittedError, make_codec
from embcomp.evaluation import exact_knn, recall_at_k
from embcomp.search import search_codes, two_stage_search


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(21)
    base = rng.standard_normal((3000, 32)).astype(np.float32) * np.linspace(2, 0.2, 32)
    queries = rng.standard_normal((40, 32)).astype(np.float32) * np.linspace(2, 0.2, 32)
    return base.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_search_codes_equals_exact_search_of_decoded(data, metric, monkeypatch):
    base, queries = data
    codec = make_codec("int4").fit(base)
    codes = codec.encode(base)
    expected_ids, expected_scores = exact_knn(codec.decode(codes), queries, 10, metric)
    monkeypatch.setattr("embcomp.search._BASE_BLOCK", 700)  # several blocks to merge
    monkeypatch.setattr("embcomp.search._QUERY_BLOCK", 16)
    ids, scores = search_codes(codec, codes, queries, 10, metric=metric)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_two_stage_with_fp32_rerank_equals_exact_on_candidates(data, metric):
    base, queries = data
    small = make_codec("bin").fit(base)
    large = make_codec("fp32").fit(base)
    small_codes, large_codes = small.encode(base), large.encode(base)
    ids, scores = two_stage_search(
        small, small_codes, large, large_codes, queries, 10, rerank=5, metric=metric
    )
    candidates, _ = search_codes(small, small_codes, queries, 50, metric=metric)
    for row in range(queries.shape[0]):
        pool = candidates[row]
        top, top_scores = exact_knn(base[pool], queries[row : row + 1], 10, metric)
        np.testing.assert_array_equal(ids[row], pool[top[0]])
        np.testing.assert_allclose(scores[row], top_scores[0], rtol=1e-5, atol=1e-4)


def test_two_stage_beats_the_small_code_alone(data):
    base, queries = data
    truth, _ = exact_knn(base, queries, 10)
    small = make_codec("pca,alloc4", kmeans_iters=4).fit(base)
    large = make_codec("int8").fit(base)
    small_codes, large_codes = small.encode(base), large.encode(base)
    alone, _ = search_codes(small, small_codes, queries, 10)
    both, _ = two_stage_search(small, small_codes, large, large_codes, queries, 10, rerank=10)
    one = recall_at_k(alone, truth, 10)
    two = recall_at_k(both, truth, 10)
    assert two > one + 0.1, (one, two)
    rerank_one, _ = two_stage_search(small, small_codes, large, large_codes, queries, 10, rerank=1)
    assert set(rerank_one[0]) == set(alone[0])  # rerank=1 only reorders


def test_bad_calls(data):
    base, queries = data
    small = make_codec("bin").fit(base)
    large = make_codec("int8").fit(base)
    codes_s, codes_l = small.encode(base), large.encode(base)
    with pytest.raises(InputError, match="same vectors"):
        two_stage_search(small, codes_s, large, codes_l[:10], queries, 5)
    with pytest.raises(InputError, match="rerank"):
        two_stage_search(small, codes_s, large, codes_l, queries, 5, rerank=0)
    with pytest.raises(InputError, match="metric"):
        search_codes(small, codes_s, queries, 5, metric="cosine")
    with pytest.raises(InputError, match="k must"):
        search_codes(small, codes_s, queries, 0)
    with pytest.raises(DimensionMismatchError, match="code_size"):
        search_codes(small, codes_l, queries, 5)
    with pytest.raises(DimensionMismatchError, match="queries"):
        search_codes(small, codes_s, queries[:, :5], 5)
    with pytest.raises(NotFittedError, match="not fitted"):
        search_codes(make_codec("int8"), codes_l, queries, 5)
    other = make_codec("int8").fit(base[:, :16])
    with pytest.raises(InputError, match="same vectors|-dim"):
        two_stage_search(small, codes_s, other, other.encode(base[:, :16]), queries, 5)
    ids, scores = search_codes(small, codes_s, queries[:0], 5)
    assert ids.shape == (0, 5) and scores.shape == (0, 5)
    ids, _ = search_codes(small, codes_s[:3], queries, 5)
    assert ids.shape == (queries.shape[0], 3)


def test_ties_go_to_the_lower_id_as_documented():
    """argpartition picks among tied scores arbitrarily; the results must not."""
    X = np.ones((1000, 4), np.float32)
    Q = np.ones((2, 4), np.float32)
    codec = make_codec("fp32").fit(X)
    codes = codec.encode(X)
    expected = np.tile(np.arange(5), (2, 1))
    np.testing.assert_array_equal(exact_knn(X, Q, 5)[0], expected)
    np.testing.assert_array_equal(search_codes(codec, codes, Q, 5)[0], expected)
    np.testing.assert_array_equal(two_stage_search(codec, codes, codec, codes, Q, 5)[0], expected)


def test_l2_search_of_codes_far_from_the_origin():
    rng = np.random.default_rng(5)
    base = (1000.0 + rng.standard_normal((2000, 32)) * 0.1).astype(np.float32)
    queries = (base[:20] + rng.standard_normal((20, 32)) * 0.01).astype(np.float32)
    truth = (
        ((queries[:, None].astype(np.float64) - base[None]) ** 2).sum(-1).argsort(axis=1)[:, :10]
    )
    codec = make_codec("fp32").fit(base)
    codes = codec.encode(base)
    ids, distances = search_codes(codec, codes, queries, 10, metric="l2")
    assert recall_at_k(ids, truth, 10) >= 0.99 and (distances >= 0).all()
    small = make_codec("int8").fit(base)
    ids, distances = two_stage_search(
        small, small.encode(base), codec, codes, queries, 10, rerank=10, metric="l2"
    )
    assert recall_at_k(ids, truth, 10) >= 0.99 and (distances >= 0).all()
