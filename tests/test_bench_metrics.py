"""Benchmark metrics against brute-force references; FAISS and embcomp agree on the
same codec idea; the paper's procedures do exactly what the paper's code does."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import run as bench_run
from bench.datasets import Dataset
from bench.methods import make_method
from embcomp.exceptions import InputError
from embcomp.sample import load_sample


def brute_force_recall(found, base, queries, k, eps=1e-5):
    """Reference: a found id is a hit when its float64 score reaches the exact k-th."""
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    values = []
    for q in range(len(queries)):
        kth = np.sort(scores[q])[::-1][k - 1]
        hits = {int(i) for i in found[q, :k] if i >= 0 and scores[q, i] >= kth - eps}
        values.append(min(len(hits), k) / k)
    return float(np.mean(values))


@pytest.fixture(scope="module")
def tied():
    """Base with exact duplicates, so many neighbours tie with the k-th."""
    rng = np.random.default_rng(3)
    unique = rng.standard_normal((60, 8)).astype(np.float32)
    base = np.concatenate([unique, unique[:30], unique[:10]])  # 100 rows, 40 duplicates
    queries = rng.standard_normal((25, 8)).astype(np.float32)
    return Dataset("test-ties-8", base, queries, "ip")


@pytest.mark.parametrize("k", [1, 5, 10])
def test_tie_aware_recall_matches_brute_force(tied, k, monkeypatch):
    rng = np.random.default_rng(k)
    truth = bench_run.make_truth(tied, 10, None).ids
    exact_scores = tied.queries @ tied.base.T
    ids = np.broadcast_to(np.arange(tied.n_base), exact_scores.shape)
    candidates = [
        truth,  # the exact answer
        np.lexsort((-ids, -exact_scores), axis=1)[:, :10],  # ties broken the other way
        rng.integers(0, tied.n_base, size=(tied.n_queries, 10)),  # mostly wrong
        np.where(rng.random((tied.n_queries, 10)) < 0.3, -1, truth),  # missing results
        np.repeat(truth[:, :1], 10, axis=1),  # duplicates must not count twice
    ]
    monkeypatch.setattr(bench_run, "_QUERY_CHUNK", 7)  # chunks must not change the mean
    for found in candidates:
        expected = brute_force_recall(found, tied.base, tied.queries, k)
        assert bench_run.tie_aware_recall(found, truth, k, tied) == pytest.approx(expected)
        per_query = bench_run.tie_aware_recall(found, truth, k, tied, per_query=True)
        assert per_query.shape == (tied.n_queries,)
        assert per_query.mean() == pytest.approx(expected)


def test_a_tied_neighbour_is_a_hit_not_a_miss(tied):
    # query = row 0, whose exact duplicates are rows 60 and 90: all three tie for top-1
    one = Dataset("t", tied.base, tied.base[:1].copy(), "ip")
    truth = bench_run.make_truth(one, 3, None).ids
    assert truth[0].tolist() == [0, 60, 90]
    for twin in (60, 90):
        assert bench_run.tie_aware_recall(np.array([[twin]]), truth, 1, one) == 1.0
    assert bench_run.tie_aware_recall(np.array([[1]]), truth, 1, one) == 0.0


def test_rescoring_reranks_by_exact_score(tied):
    truth = bench_run.make_truth(tied, 10, None).ids
    shuffled = np.ascontiguousarray(truth[:, ::-1])  # right candidates, wrong order
    rescored = bench_run._rescore(shuffled, tied, depth=10, k=3)
    assert bench_run.tie_aware_recall(rescored, truth, 3, tied) == 1.0
    assert bench_run.tie_aware_recall(shuffled, truth, 3, tied) < 1.0


@pytest.fixture(scope="module")
def sample():
    base, queries = load_sample()
    dataset = Dataset("sample-test", base, queries, "ip")
    truth = bench_run.make_truth(dataset, 10, None)
    settings = bench_run.Settings(k=10, train_size=1500, rescore=0, timing_repeats=1)
    train = base[:1500]
    return dataset, truth, settings, train


def noise(p: float, n: int) -> float:
    """3 standard errors of the difference of two recalls measured on n neighbours."""
    return 3 * math.sqrt(2 * max(p * (1 - p), 1 / n) / n)


@pytest.mark.parametrize(
    ("faiss_name", "embcomp_name"),
    [("faiss:SQfp16", "embcomp:fp16"), ("faiss:SQ8", "embcomp:int8")],
)
def test_faiss_and_embcomp_agree_on_the_same_codec(sample, faiss_name, embcomp_name):
    """Same idea (float16; per-dimension min/max 8-bit levels), same bytes, same recall
    within sampling noise (binomial, over the queries' neighbours)."""
    dataset, truth, settings, train = sample
    ours = bench_run.evaluate(make_method(embcomp_name), dataset, train, truth, settings)
    theirs = bench_run.evaluate(make_method(faiss_name), dataset, train, truth, settings)
    assert ours["results"]["bytes_per_vector"] == theirs["results"]["bytes_per_vector"]
    for k in (1, 10):
        a, b = ours["results"][f"recall_at_{k}"], theirs["results"][f"recall_at_{k}"]
        assert abs(a - b) <= noise((a + b) / 2, k * dataset.n_queries), (k, a, b)
    assert ours["results"]["recall_at_10"] > 0.97


@pytest.mark.parametrize(
    "name", ["embcomp:int8", "embcomp:pca64,fp8", "faiss:SQ8", "faiss:PCA64,SQ8"]
)
def test_timed_into_reused_buffers_gives_the_same_codes_and_vectors(sample, name):
    """The sweep times encode and decode into buffers (no fresh-memory page faults);
    what they hold afterwards is what fresh calls return, and the record says so."""
    dataset, truth, settings, train = sample
    method = make_method(name)
    method.fit(train)
    codes = method.encode(dataset.base)
    code_buffer = np.full_like(codes, 0xA5)
    assert method.encode(dataset.base, out=code_buffer) is code_buffer
    np.testing.assert_array_equal(code_buffer, codes)
    buffer = np.full((dataset.n_base, dataset.d), np.nan, dtype=np.float32)
    assert method.decode(codes, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, method.decode(codes))
    result = bench_run.evaluate(make_method(name), dataset, train, truth, settings)["results"]
    assert result["encode_into"] == result["decode_into"] == "reused buffer"
    assert result["encode_vectors_per_s"] > 0 and result["decode_vectors_per_s"] > 0


def test_methods_that_cannot_write_into_buffers_are_timed_as_they_are(sample):
    dataset, truth, settings, train = sample
    lsh = bench_run.evaluate(make_method("faiss:LSH"), dataset, train, truth, settings)
    assert lsh["results"]["encode_into"] == "reused buffer"
    assert lsh["results"]["decode_vectors_per_s"] is None
    assert lsh["results"]["decode_into"] is None
    paper = make_method("paper:int8")
    paper.fit(train)
    with pytest.raises(InputError, match="paper:int8 allocates its codes"):
        paper.encode(dataset.base, out=np.empty((dataset.n_base, paper.code_size), np.uint8))
    result = bench_run.evaluate(make_method("paper:int8"), dataset, train, truth, settings)
    assert result["results"]["encode_into"] == "fresh array"


def test_paper_int8_truncates_and_wraps_like_an_unclipped_uint8_cast():
    train = np.array([[0.0, -1.0], [1.0, 1.0]], dtype=np.float32)
    method = make_method("paper:int8")
    method.fit(train)
    assert method.code_size == 2
    # steps are 1/255 and 2/255: 0.5 -> 127.5 truncates to 127; 1.25 -> 318.75 -> 318
    # wraps to 62; -1.1 -> -12.75 -> -12 wraps to 244 (no clipping, as in the paper's code)
    X = np.array([[0.5, 0.0], [1.25, -1.1]], dtype=np.float32)
    codes = method.encode(X)
    assert codes.dtype == np.uint8
    assert codes.tolist() == [[127, 127], [62, 244]]


def test_paper_fp8_is_a_plain_cast_and_binary_is_the_sign():
    import ml_dtypes

    X = np.array([[0.3, -0.02, 0.001, 0.0]], dtype=np.float32)
    fp8 = make_method("paper:fp8")
    fp8.fit(X)
    assert fp8.encode(X).tobytes() == X.astype(ml_dtypes.float8_e4m3fn).tobytes()
    binary = make_method("paper:binary")
    binary.fit(X)
    assert binary.code_size == 1
    assert np.unpackbits(binary.encode(X), axis=1, count=4).tolist() == [[1, 0, 1, 0]]


def test_paper_methods_score_raw_codes_by_cosine():
    """uint8 codes are all positive: cosine on raw codes ranks by something other than
    the original similarity -- the effect behind the paper's 'float8 beats int8'."""
    base, queries = load_sample()
    dataset = Dataset("sample-test", base, queries, "ip")
    truth = bench_run.make_truth(dataset, 10, None)
    settings = bench_run.Settings(k=10, train_size=1500, rescore=0, timing_repeats=1)
    paper = bench_run.evaluate(make_method("paper:int8"), dataset, base[:1500], truth, settings)
    ours = bench_run.evaluate(make_method("embcomp:int8"), dataset, base[:1500], truth, settings)
    assert paper["results"]["recall_at_10"] < ours["results"]["recall_at_10"] - 0.05
