"""``embcomp recommend``: measure every codec embcomp can make on the user's own vectors
and pick the best one under a byte budget, or the smallest that reaches a recall.

    embcomp recommend --data sample.npy --budget-bytes 96 -o best.codec
    embcomp recommend --data sample.npy --queries q.npy --min-recall 0.95 --json

Candidates come from the spec grammar at run time (``embcomp.spec.STAGES``): every
fixed-rate quantizer alone and after a rotation; PCA at 1/8 .. 7/8 of the dimensions
and at the widths that exactly fill the budget, with every quantizer; every byte-budget
quantizer (``alloc{bytes}``) at the budget, alone and after a rotation or full PCA,
and after a PCA narrowed to the components that full PCA's fit gave bits to.
Reducers that are slow to fit (MPAD, and any other that takes a width) are then tried
in place of PCA in the three best candidates. Each is fitted on the data, encodes the
whole base and is scored by recall@10 (ties count) of exact search over its decoded
vectors against the exact float32 neighbours of the queries (held out from the data
when none are given).

A recall measured on a few hundred queries is noisy: when the winner's lead over a
candidate that is smaller, or at least twice as fast to fit, is within the 95% noise of
the paired per-query differences, that candidate is recommended instead, and the
output says so (an 800x slower MPAD fit is not worth a lead the queries cannot show).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embcomp.exceptions import EmbcompError, InputError
from embcomp.spec import parse_spec

from .datasets import Dataset, load_dataset, train_rows, with_metric
from .methods import (
    EmbcompMethod,
    _validate,
    budget_quantizers,
    budgets_for,
    fixed_rate_quantizers,
    narrower_rotation,
    numbered_reducers,
)
from .run import Settings, evaluate, make_truth

__all__ = ["Candidate", "candidate_specs", "recommend"]

FRACTIONS = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)
QUICK_FRACTIONS = (1 / 4, 1 / 2, 3 / 4)
_RATIOS_WITHOUT_BUDGET = (4, 8, 16, 32, 64)


def candidate_specs(
    d: int,
    budget_bytes: int | None = None,
    fractions: Sequence[float] = FRACTIONS,
    *,
    normalize: bool = False,
) -> list[str]:
    """Canonical specs of every candidate codec for width ``d`` (within the budget);
    ``normalize``: each starts with ``l2norm`` (for cosine search)."""
    quantizers = fixed_rate_quantizers(include_fp32=True)
    reducers = numbered_reducers()
    specs: list[str] = []
    specs += quantizers + [f"rot,{q}" for q in quantizers if q != "fp32"]
    widths = {max(1, round(d * f)) for f in fractions}
    from embcomp.spec import STAGES

    for q in quantizers:
        bits = STAGES[q].bits
        assert bits is not None
        fill = {max(1, (8 * budget_bytes) // bits)} if budget_bytes else set()
        for k in sorted((widths | fill) - {d}):
            if k < d:
                specs += [f"{r}{k},{q}" for r in reducers]
    budgets = [budget_bytes] if budget_bytes else budgets_for(d, _RATIOS_WITHOUT_BUDGET)
    for qb in budget_quantizers():
        for b in budgets:
            specs += [f"{qb}{b}", f"rot,{qb}{b}"] + [f"{r},{qb}{b}" for r in reducers]
    valid: list[str] = []
    for spec in specs:
        spec = f"l2norm,{spec}" if normalize else spec
        try:
            canonical = _validate("embcomp", spec, d)
        except EmbcompError:
            continue
        if canonical in valid:
            continue
        if budget_bytes is not None and parse_spec(canonical).code_size(d) > budget_bytes:
            continue
        valid.append(canonical)
    return valid


@dataclass
class Candidate:
    """One measured candidate codec."""

    method: EmbcompMethod
    results: dict[str, Any]
    per_query: dict[str, list[float]] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return self.method.ref

    def summary(self) -> dict[str, Any]:
        r = self.results
        keys = (
            "recall_at_1",
            "recall_at_10",
            "recall_at_100",
            "ndcg_at_10",
            "ndcg_retention",
            "fit_s",
            "encode_vectors_per_s",
            "decode_vectors_per_s",
        )
        return {
            "spec": self.spec,
            "code_size": r["bytes_per_vector"],
            "compression_ratio": r["compression_ratio"],
            **{k: r[k] for k in keys if k in r},
        }


@dataclass
class Recommendation:
    best: Candidate
    runner_up: Candidate | None
    candidates: list[Candidate]
    dataset: Dataset
    train_size: int
    constraint: dict[str, Any]
    note: str | None = None  # why the best is not the top recall, if it is not
    metric: str = "ip"  # what recall was measured by: "ip", "l2" or "cos"

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.best.summary(),
            "metric": self.metric,
            "runner_up": self.runner_up.summary() if self.runner_up else None,
            "note": self.note,
            "constraint": self.constraint,
            "candidates_evaluated": len(self.candidates),
            "data": {**self.dataset.describe(), "train_size": self.train_size},
        }


PRIMARY_REDUCER = "pca"
# Norms this unequal (largest/smallest) are not unit vectors rounded: the data may be
# meant for cosine search, which inner product then misjudges.
_UNEQUAL_NORMS = 1.01
_SECOND_STAGE_SEEDS = 3
# Two-sided 95%: a recall gap under this many standard errors is within the noise.
_NOISE_Z = 1.96
# Fit times closer than this ratio are not told apart (they vary by machine and run).
_FASTER_FIT = 2.0


def norm_spread(X: np.ndarray, rows: int = 4096) -> float:
    """Largest over smallest nonzero row norm among up to ``rows`` evenly spaced rows."""
    picked = X[np.unique(np.linspace(0, len(X) - 1, min(rows, len(X))).astype(np.int64))]
    norms = np.linalg.norm(np.asarray(picked, dtype=np.float64), axis=1)
    norms = norms[norms > 0]
    return float(norms.max() / norms.min()) if norms.size else 1.0


def paired_gap(a: Candidate, b: Candidate) -> tuple[float, float]:
    """Mean per-query recall@10 of ``a`` minus ``b``, and the standard error of that
    mean (the same queries score both, so the differences are paired)."""
    gaps = np.subtract(a.per_query["recall_at_10"], b.per_query["recall_at_10"])
    error = float(gaps.std(ddof=1) / np.sqrt(gaps.size)) if gaps.size > 1 else 0.0
    return float(gaps.mean()), error


def prefer_cheaper(ranked: list[Candidate]) -> tuple[list[Candidate], str | None]:
    """``ranked`` (best first) with a cheaper candidate moved to the front when the best
    one's recall@10 lead over it is within the noise; and a note saying so.

    Cheaper: fewer bytes, or as many and a fit at least ``_FASTER_FIT`` times faster.
    Among several, the highest recall@10, then the fewest bytes, then the fastest fit.
    """
    top = ranked[0]
    if "recall_at_10" not in top.per_query:
        return ranked, None
    size, fit = top.results["bytes_per_vector"], top.results["fit_s"]

    def cheaper(c: Candidate) -> bool:
        other = c.results["bytes_per_vector"]
        return other < size or (other == size and c.results["fit_s"] * _FASTER_FIT <= fit)

    tied = [
        (c, *paired_gap(top, c)) for c in ranked[1:] if cheaper(c) and "recall_at_10" in c.per_query
    ]
    tied = [(c, gap, error) for c, gap, error in tied if gap <= _NOISE_Z * error]
    if not tied:
        return ranked, None
    choice, gap, error = min(
        tied,
        key=lambda t: (
            -t[0].results["recall_at_10"],
            t[0].results["bytes_per_vector"],
            t[0].results["fit_s"],
        ),
    )
    saves = (
        f"{size - choice.results['bytes_per_vector']} fewer bytes per vector"
        if choice.results["bytes_per_vector"] < size
        else f"a {fit / max(choice.results['fit_s'], 1e-9):.0f}x faster fit"
    )
    note = (
        f"{choice.spec} over {top.spec}: {saves}, and its recall@10 is {gap:.4f} lower, "
        f"within the noise of {len(top.per_query['recall_at_10'])} queries "
        f"(95%: +-{_NOISE_Z * error:.4f})"
    )
    return [choice, top, *(c for c in ranked if c is not choice and c is not top)], note


def _rank(candidates: list[Candidate], budget_bytes: int | None, min_recall: float | None):
    """Candidates meeting the constraint, best first."""
    if budget_bytes is not None:
        return sorted(
            (c for c in candidates if c.results["bytes_per_vector"] <= budget_bytes),
            key=lambda c: (
                -c.results["recall_at_10"],
                c.results["bytes_per_vector"],
                -(c.results["encode_vectors_per_s"] or 0),
            ),
        )
    assert min_recall is not None
    return sorted(
        (c for c in candidates if c.results["recall_at_10"] >= min_recall),
        key=lambda c: (c.results["bytes_per_vector"], -c.results["recall_at_10"]),
    )


def narrower_specs(candidates: list[Candidate], d: int, measured: list[str]) -> list[str]:
    """``pca{k},alloc{B}`` for every measured ``pca,alloc{B}`` that coded only k < d
    components (same bytes, a cheaper rotation; see ``narrower_rotation``)."""
    specs: list[str] = []
    for cand in candidates:
        describe = getattr(cand.method.codec.quantizer, "describe", None)
        uncoded = describe().get("uncoded_components", 0) if describe is not None else 0
        spec = narrower_rotation(cand.spec, d, uncoded)
        if spec is None:
            continue
        canonical = _validate("embcomp", spec, d)
        if canonical not in measured and canonical not in specs:
            specs.append(canonical)
    return specs


def second_stage_specs(
    ranked: list[Candidate], d: int, budget_bytes: int | None, seeds: int = _SECOND_STAGE_SEEDS
) -> list[tuple[str, Candidate]]:
    """Specs that swap PCA in the best ``seeds`` candidates that reduce with PCA for
    every other reducer that takes a width (``pca96,fp8`` -> ``mpad96,fp8``), each with
    the candidate it swaps PCA in; narrowest reducer first (its fit is the cheapest)."""
    others = [r for r in numbered_reducers() if r != PRIMARY_REDUCER]
    swaps: list[tuple[str, Candidate]] = []

    def narrowed_by_pca(c: Candidate) -> bool:
        reducer = c.method.codec.spec.reducer
        return reducer is not None and reducer.name == PRIMARY_REDUCER and reducer.arg is not None

    for cand in [c for c in ranked if narrowed_by_pca(c)][:seeds]:
        spec = cand.method.codec.spec
        assert spec.reducer is not None
        for reducer in others:
            text = str(spec).replace(str(spec.reducer), f"{reducer}{spec.reducer.arg}", 1)
            try:
                canonical = _validate("embcomp", text, d)
            except EmbcompError:
                continue
            fits = budget_bytes is None or parse_spec(canonical).code_size(d) <= budget_bytes
            if fits and canonical not in [spec for spec, _ in swaps]:
                swaps.append((canonical, cand))
    return sorted(swaps, key=lambda swap: _reducer_width(swap[0]))


def _reducer_width(spec: str) -> int:
    reducer = parse_spec(spec).reducer
    return reducer.arg if reducer is not None and reducer.arg is not None else 0


def _measure_swaps(
    swaps: list[tuple[str, Candidate]],
    measure: Callable[[list[str]], list[Candidate]],
    log: Callable[[str], None],
) -> list[Candidate]:
    """Measure the second stage's reducer swaps, narrowest first. A reducer whose first
    swap does not beat the recall@10 of the PCA candidate it replaced is not tried again:
    its wider fits are the slow ones (MPAD on 19,000 x 1,536: 47 s at 192 dims, minutes
    at 1,283), and they did not pay where its cheapest one did not."""
    measured: list[Candidate] = []
    tried: set[str] = set()
    losing: dict[str, str] = {}
    for spec, replaced in swaps:
        reducer = parse_spec(spec).reducer
        assert reducer is not None
        if reducer.name in losing:
            log(f"skipped {spec}: {losing[reducer.name]}")
            continue
        got = measure([spec])
        measured += got
        if reducer.name in tried or not got:
            continue
        tried.add(reducer.name)
        mine, theirs = got[0].results["recall_at_10"], replaced.results["recall_at_10"]
        if mine <= theirs:
            losing[reducer.name] = (
                f"{reducer.name} did not beat {PRIMARY_REDUCER} in its first trial here "
                f"({spec} recall@10 {mine:.4f}, {replaced.spec} {theirs:.4f})"
            )
    return measured


def recommend(
    dataset: Dataset,
    *,
    budget_bytes: int | None = None,
    min_recall: float | None = None,
    train_size: int | None = 50000,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    metric: str | None = None,
) -> Recommendation:
    """Measure the candidates on ``dataset`` and choose under exactly one constraint.

    ``metric`` (default: the dataset's own): the search the codec is for, ``"ip"``,
    ``"l2"`` or ``"cos"``. For cosine, recall is measured over unit-norm rows and every
    candidate starts with ``l2norm``, so the chosen codec normalizes what it encodes.

    Two stages keep the cost bounded: first every candidate whose reducer (if any) is
    PCA; then the reducers that are slow to fit (MPAD, any other registered one) at
    the widths and quantizers of the best three PCA candidates, where they could
    change the answer.

    Raises
    ------
    InputError
        Neither or both constraints, or no candidate meets the constraint.
    """
    if (budget_bytes is None) == (min_recall is None):
        raise InputError("give exactly one of --budget-bytes B or --min-recall R")
    if budget_bytes is not None and budget_bytes < 1:
        raise InputError(f"--budget-bytes must be >= 1; got {budget_bytes}")
    if min_recall is not None and not 0.0 < min_recall <= 1.0:
        raise InputError(f"--min-recall must be in (0, 1]; got {min_recall}")
    if dataset.n_base < 100:  # with 10 the top 10 is everything: every codec scores 1.0
        raise InputError(
            f"recommend scores recall@10 among the base vectors: it needs at least 100 to "
            f"tell codecs apart; got {dataset.n_base}"
        )

    if metric is not None:
        dataset = with_metric(dataset, metric)
    elif dataset.metric == "ip":
        spread = norm_spread(dataset.base)
        if spread > _UNEQUAL_NORMS:
            log(
                f"recommend: the vectors' norms differ (largest/smallest of a sample: "
                f"{spread:.3g}), and inner product ranks by them; if you search by cosine, "
                "pass --metric cos"
            )
    cosine = metric == "cos"

    def primary(spec: str) -> bool:
        reducer = parse_spec(spec).reducer
        return reducer is None or reducer.arg is None or reducer.name == PRIMARY_REDUCER

    specs = [
        s
        for s in candidate_specs(
            dataset.d, budget_bytes, QUICK_FRACTIONS if quick else FRACTIONS, normalize=cosine
        )
        if primary(s)
    ]
    if not specs:
        raise InputError(
            f"no embcomp codec fits in {budget_bytes} bytes per {dataset.d}-d vector; "
            "raise --budget-bytes"
        )
    settings = Settings(
        k=min(100, dataset.n_base),
        train_size=train_size,
        train_rows="random",
        rescore=0,
        timing_repeats=1,
        seed=seed,
    )
    truth = make_truth(dataset, settings.k, None)
    train = train_rows(dataset, train_size, "random", seed)
    log(
        f"recommend: {len(specs)} candidate codecs on {dataset.n_base} x {dataset.d} "
        f"({dataset.n_queries} queries), fitted on {train.shape[0]} vectors"
    )
    candidates = _measure(specs, dataset, train, truth, settings, seed, progress, log)
    narrower = narrower_specs(candidates, dataset.d, specs)
    if narrower:
        log(f"recommend: {len(narrower)} more with narrower rotations: {', '.join(narrower)}")
        candidates += _measure(narrower, dataset, train, truth, settings, seed, progress, log)
    ranked = _rank(candidates, budget_bytes, min_recall)
    if not ranked:  # for min_recall: seed the second stage with the best recalls
        ranked = sorted(candidates, key=lambda c: -c.results["recall_at_10"])
    swaps = second_stage_specs(ranked, dataset.d, budget_bytes)
    if swaps:
        names = ", ".join(spec for spec, _ in swaps)
        log(f"recommend: up to {len(swaps)} more with other reducers: {names}")
        candidates += _measure_swaps(
            swaps,
            lambda specs: _measure(specs, dataset, train, truth, settings, seed, progress, log),
            log,
        )
    feasible = _rank(candidates, budget_bytes, min_recall)
    if not feasible:
        if not candidates:
            raise InputError("no candidate codec could be measured on this data")
        top = max(candidates, key=lambda c: c.results["recall_at_10"])
        raise InputError(
            f"no codec reaches recall@10 >= {min_recall}; the best was {top.spec} with "
            f"{top.results['recall_at_10']:.4f} ({top.results['bytes_per_vector']} bytes)"
        )
    feasible, note = prefer_cheaper(feasible)
    constraint: dict[str, Any] = (
        {"budget_bytes": budget_bytes}
        if budget_bytes is not None
        else {"min_recall_at_10": min_recall}
    )
    return Recommendation(
        feasible[0],
        feasible[1] if len(feasible) > 1 else None,
        candidates,
        dataset,
        int(train.shape[0]),
        constraint,
        note,
        "cos" if cosine else dataset.metric,
    )


def _measure(
    specs: list[str],
    dataset: Dataset,
    train: Any,
    truth: Any,
    settings: Settings,
    seed: int,
    progress: bool,
    log: Callable[[str], None],
) -> list[Candidate]:
    from .run import _progress

    measured = []
    for spec in _progress(specs, "candidates", progress):
        method = EmbcompMethod(spec, {"seed": seed})
        try:
            outcome = evaluate(method, dataset, train, truth, settings)
        except EmbcompError as exc:
            log(f"skipped {spec}: {exc}")
            continue
        measured.append(Candidate(method, outcome["results"], outcome["per_query"]))
    return measured


_METRIC_WORDS = {"ip": "inner product", "l2": "L2 distance", "cos": "cosine"}


def format_text(rec: Recommendation) -> str:
    """Human-readable recommendation."""
    info = rec.dataset

    def line(tag: str, c: Candidate) -> str:
        r = c.results
        ndcg = f"  nDCG@10 {r['ndcg_at_10']:.4f}" if r.get("ndcg_at_10") is not None else ""
        deep = f"  recall@100 {r['recall_at_100']:.4f}" if "recall_at_100" in r else ""
        return (
            f"{tag:<10} {c.spec:<16} {r['bytes_per_vector']:>5} bytes/vector "
            f"{r['compression_ratio']:>6.1f}x  recall@1 {r['recall_at_1']:.4f}  "
            f"recall@10 {r['recall_at_10']:.4f}{deep}{ndcg}  "
            f"encode {r['encode_vectors_per_s']:,.0f} vec/s"
        )

    if "budget_bytes" in rec.constraint:
        want = f"at most {rec.constraint['budget_bytes']} bytes per vector, best recall@10"
    else:
        want = f"recall@10 >= {rec.constraint['min_recall_at_10']}, fewest bytes"
    out = [
        f"data: {info.name} ({info.n_base} x {info.d}, {info.n_queries} queries; "
        f"fitted on {rec.train_size}; searched by {_METRIC_WORDS[rec.metric]})",
        f"constraint: {want}; {len(rec.candidates)} codecs measured",
        line("best", rec.best),
    ]
    if rec.runner_up is not None:
        out.append(line("runner-up", rec.runner_up))
    if rec.note:
        out.append(f"note: {rec.note}")
    return "\n".join(out)


def load_for_recommend(data: str, queries: str | None, qrels: str | None, seed: int) -> Dataset:
    """The user's sample as a dataset (queries held out when not given)."""
    return load_dataset(data, queries=queries, qrels=qrels, seed=seed)
