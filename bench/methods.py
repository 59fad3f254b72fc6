"""The methods a sweep compares, behind one small interface, in three families.

* ``embcomp:<spec>`` -- an embcomp codec (``embcomp:pca192,fp8``).
* ``faiss:<index_factory string>`` -- a FAISS codec (``faiss:OPQ48,PQ48``); encode and
  decode are ``sa_encode`` / ``sa_decode``; RaBitQ and LSH, whose decoded vectors are
  not meant for search, are searched with the index's own search over the same codes.
* ``paper:[pca{d},]{fp8|int8|binary}`` -- the procedures of the RAG-storage paper
  (arXiv 2505.00105, from the authors' code) so its claims can be checked: ``fp8`` is a
  plain cast to float8 E4M3 (no scaling), ``int8`` is sentence-transformers' uint8
  (per-dimension min/max from the training vectors, truncating cast, no clipping) and
  ``binary`` is ``x > 0``. Queries go through the same procedure, and documents are
  scored by cosine similarity on the resulting values (raw codes for int8 and binary).
  ``pca{d}`` first projects onto the top ``d`` principal axes (centered), like
  scikit-learn's ``PCA.transform``.

Every method: ``fit(train, metric)``, ``encode(X) -> uint8 (n, code_size)``,
``code_size``, and ``search(codes, queries, k) -> ids``; methods that decode
(``decodes``) also have ``decode(codes) -> float32 (n, d)``, and their search is an
exact FAISS flat search over the decoded vectors -- the same for both families, so
search cost is not a confound.

Sweeps name methods by templates expanded against the dataset's width and the
registered spec grammar (:func:`expand_templates`), so a new stage in
``embcomp.spec.STAGES`` joins the default sweep without editing it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

import embcomp
from embcomp._validation import normalize_rows
from embcomp.exceptions import EmbcompError, InputError, SpecError
from embcomp.reducers import LinearReducer
from embcomp.spec import STAGES, parse_spec

__all__ = [
    "EmbcompMethod",
    "FaissMethod",
    "Method",
    "PaperMethod",
    "budget_quantizers",
    "expand_templates",
    "fixed_rate_quantizers",
    "make_method",
    "numbered_reducers",
    "split_method_name",
]

FAMILIES = ("embcomp", "faiss", "paper")


# -- the interface ---------------------------------------------------------------------
class Method(ABC):
    """One way of storing vectors in fewer bytes and searching them.

    Parameters
    ----------
    ref : the family-specific name (a spec, a factory string, a paper procedure).
    options : training options, recorded with every result.
    """

    family: ClassVar[str]
    decodes: bool = True
    writes_into: bool = True  # encode/decode take out= (the paper's procedures do not)

    def __init__(self, ref: str, options: Mapping[str, Any] | None = None) -> None:
        self.ref = ref
        self.options: dict[str, Any] = dict(options or {})
        self.metric = "ip"
        self.d: int | None = None
        self.fit_s: float | None = None  # set by fit() when it knows better than a timer

    @property
    def name(self) -> str:
        """``family:ref``: unique across families."""
        return f"{self.family}:{self.ref}"

    @property
    def search_path(self) -> str:
        """How :meth:`search` finds neighbours (for records)."""
        return "exact FAISS flat search over decoded float32 vectors"

    @property
    @abstractmethod
    def code_size(self) -> int:
        """Bytes per encoded vector."""

    @abstractmethod
    def fit(self, train: np.ndarray, metric: str = "ip") -> None:
        """Fit on ``train`` (n, d) float32 for searches by ``metric`` ("ip" or "l2")."""

    @abstractmethod
    def encode(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``X`` (n, d) float32 -> uint8 codes (n, code_size).

        ``out``: a uint8 C-contiguous (n, code_size) buffer to write into and return,
        where ``writes_into`` (``Codec.encode(out=)``, FAISS ``sa_encode(x, codes)``).
        """

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 codes (n, code_size) -> float32 (n, d). Only when ``decodes``.

        ``out``: a float32 C-contiguous (n, d) buffer to write into and return (both
        families can: ``Codec.decode(out=)``, FAISS ``sa_decode(codes, x)``).
        """
        raise InputError(f"{self.name} does not decode to vectors; it searches its own codes")

    def search(
        self, codes: np.ndarray, queries: np.ndarray, k: int, decoded: np.ndarray | None = None
    ) -> np.ndarray:
        """Top-``k`` base ids (m, k) int64 for ``queries`` (m, d) float32, best first.

        ``decoded`` (n, d) float32 may be passed to avoid decoding again.
        """
        vectors = self.decode(codes) if decoded is None else decoded
        return flat_search(vectors, queries, k, self.metric)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the method, for records."""
        return {
            "name": self.name,
            "family": self.family,
            "ref": self.ref,
            "options": self.options,
            "decodes": self.decodes,
            "search": self.search_path,
        }


def flat_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact search of ``queries`` (m, d) over ``vectors`` (n, d), both float32, with a
    FAISS flat index; returns ids (m, k) int64, best first."""
    import faiss

    index = (
        faiss.IndexFlatIP(vectors.shape[1])
        if metric == "ip"
        else faiss.IndexFlatL2(vectors.shape[1])
    )
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64, copy=False)


# -- embcomp ---------------------------------------------------------------------------
class EmbcompMethod(Method):
    """An embcomp codec named by its spec; ``options`` go to ``make_codec``.

    Options the spec's stages do not take are dropped (a sweep gives one option set to
    a whole family, e.g. MPAD's ``max_iter``, and only MPAD specs take it), so the
    recorded options are exactly the ones used. A codec with a ``metric`` option
    (``alloc``) is fitted for the search it is measured by, unless the options say.

    Fitted reducers are shared between specs with the same reducer stage, options and
    training rows (``pca96,int8`` and ``pca96,fp8`` fit PCA once). Codecs with a reducer
    are fitted in two timed steps: the reducer alone (or the cached fitted one), then
    ``Codec.fit(train, reducer=...)``, which fits only the quantizer. ``fit_s`` is the
    reducer's own fit time (measured once, reused) plus this codec's step, what a fresh
    fit costs; the codec left in ``codec`` is an ordinary one.
    """

    family = "embcomp"
    _reducer_cache: ClassVar[dict[str, tuple[LinearReducer, float]]] = {}
    _REDUCER_CACHE_SIZE = 16

    def __init__(self, ref: str, options: Mapping[str, Any] | None = None) -> None:
        spec = parse_spec(ref)
        accepted = set(embcomp.make_codec(spec).options)
        kept = {k: v for k, v in (options or {}).items() if k in accepted}
        super().__init__(str(spec), kept)
        self.codec = embcomp.make_codec(spec, **self.options)
        self.reducer_fit_s: float | None = None
        self.reducer_cached = False

    @property
    def code_size(self) -> int:
        return self.codec.code_size

    def _reducer_key(self, codec: embcomp.Codec, train: np.ndarray) -> str | None:
        if codec.reducer is None:
            return None
        # Every byte of the training rows: a sample of them let two datasets that agree
        # on it share a fit (found by a red-team pass). blake2b reads ~1 GB/s.
        digest = hashlib.blake2b(np.ascontiguousarray(train).data, digest_size=16).hexdigest()
        params = json.dumps(codec.reducer.get_params(), sort_keys=True, default=str)
        return (
            f"{type(codec.reducer).__name__}|{params}|{codec.spec.normalize}|"
            f"{train.shape}|{digest}|seed={codec.options.get('seed')}"
        )

    def fit(self, train: np.ndarray, metric: str = "ip") -> None:
        self.metric, self.d = metric, train.shape[1]
        if "metric" in self.codec.options and "metric" not in self.options:
            self.options["metric"] = metric  # alloc weighs its errors for this search
        codec = embcomp.make_codec(self.codec.spec, **self.options)
        key = self._reducer_key(codec, train)
        if key is None or codec.reducer is None:
            start = time.perf_counter()
            codec.fit(train)
            self.fit_s = time.perf_counter() - start
            self.reducer_fit_s, self.reducer_cached = None, False
            self.codec = codec
            return
        cached = self._reducer_cache.get(key)
        if cached is None:
            # the reducer alone, on the rows Codec.fit would give it
            X = np.ascontiguousarray(train, dtype=np.float32)
            X = normalize_rows(X.copy()) if codec.spec.normalize else X
            reducer = codec.reducer
            start = time.perf_counter()
            reducer.fit(X)
            self.reducer_fit_s = time.perf_counter() - start
            if len(self._reducer_cache) >= self._REDUCER_CACHE_SIZE:
                self._reducer_cache.pop(next(iter(self._reducer_cache)))
            self._reducer_cache[key] = (reducer, self.reducer_fit_s)
            self.reducer_cached = False
        else:
            reducer, self.reducer_fit_s = cached
            self.reducer_cached = True
        start = time.perf_counter()
        codec.fit(train, reducer=reducer)  # the quantizer only (the codec keeps a copy)
        # the reducer's fit counts once per codec, as a fresh fit would spend it
        self.fit_s = self.reducer_fit_s + (time.perf_counter() - start)
        self.codec = codec

    def encode(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.codec.encode(X, out=out)

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.codec.decode(codes, out=out)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["reducer_fit_reused"] = self.reducer_cached
        return out


# -- FAISS -----------------------------------------------------------------------------
_SEARCH_ONLY = re.compile(r"(RaBitQ|LSH)")
_FAISS_OPTIONS = ("kmeans_niter", "rabitq_qb")


class FaissMethod(Method):
    """A FAISS codec built by ``index_factory``.

    Options
    -------
    kmeans_niter : int, optional
        k-means iterations for PQ codebooks and OPQ's alternations (FAISS defaults:
        25 for PQ, 50 OPQ rounds); lower trains faster at a small cost in accuracy.
    rabitq_qb : int, optional
        Bits per query component in RaBitQ searches (``IndexRaBitQ.qb``; 0 = float
        queries, the most accurate; index_factory's default is 4).
    """

    family = "faiss"

    def __init__(self, ref: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ref.strip(), options)
        unknown = sorted(set(self.options) - set(_FAISS_OPTIONS))
        if unknown:
            raise SpecError(
                f"unknown FAISS method option(s) {unknown}; valid: {list(_FAISS_OPTIONS)}"
            )
        self.decodes = _SEARCH_ONLY.search(self.ref) is None
        self.index: Any = None

    @property
    def search_path(self) -> str:
        if self.decodes:
            return super().search_path
        return "the FAISS index's own search over the same codes (add_sa_codes)"

    def _metric_type(self, metric: str) -> int:
        import faiss

        # IndexLSH compares Hamming codes; the factory accepts it only with METRIC_L2.
        if "LSH" in self.ref or metric == "l2":
            return int(faiss.METRIC_L2)
        return int(faiss.METRIC_INNER_PRODUCT)

    def build(self, d: int, metric: str = "ip") -> Any:
        """An untrained index for width ``d`` (raises ``SpecError`` for a bad string)."""
        import faiss

        try:
            index = faiss.index_factory(d, self.ref, self._metric_type(metric))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1][:200]
            raise SpecError(f"FAISS cannot build {self.ref!r} for d={d}: {first}") from exc
        _no_polysemous_training(index)
        niter = self.options.get("kmeans_niter")
        if niter is not None:
            _set_kmeans_niter(index, int(niter))
        qb = self.options.get("rabitq_qb")
        inner = _innermost(index)
        if qb is not None and hasattr(inner, "qb"):
            inner.qb = int(qb)
        return index

    @property
    def code_size(self) -> int:
        if self.index is None:
            raise InputError(f"{self.name} is not fitted")
        return int(self.index.sa_code_size())

    def fit(self, train: np.ndarray, metric: str = "ip") -> None:
        self.metric, self.d = metric, train.shape[1]
        self.index = self.build(train.shape[1], metric)
        if not self.index.is_trained:
            self.index.train(np.ascontiguousarray(train, dtype=np.float32))

    def encode(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        return np.asarray(self.index.sa_encode(X, out))

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if not self.decodes:
            return super().decode(codes, out)
        return np.asarray(self.index.sa_decode(np.ascontiguousarray(codes), out))

    def search(
        self, codes: np.ndarray, queries: np.ndarray, k: int, decoded: np.ndarray | None = None
    ) -> np.ndarray:
        if self.decodes:
            return super().search(codes, queries, k, decoded)
        self.index.reset()
        self.index.add_sa_codes(np.ascontiguousarray(codes))
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        self.index.reset()
        return ids.astype(np.int64, copy=False)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.index is not None:
            training = faiss_training(self.index)
            if training:
                out["training"] = training
        if self.index is not None and "RaBitQ" in self.ref:
            inner = _innermost(self.index)
            out["rabitq"] = {
                "nb_bits": int(inner.rabitq.nb_bits) if hasattr(inner, "rabitq") else None,
                "query_bits": int(getattr(inner, "qb", 0)),
                "centered": bool(getattr(inner, "centered", False)),
            }
        return out


def _innermost(index: Any) -> Any:
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _pq_parts(index: Any) -> tuple[list[Any], Any]:
    """The OPQ rotations in ``index``'s pre-transforms and its innermost ``IndexPQ``
    (None for indexes without PQ), the parts whose k-means training can be set."""
    import faiss

    rotations = []
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain
        for i in range(chain.size()):
            transform = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                rotations.append(transform)
        index = faiss.downcast_index(index.index)
    return rotations, index if isinstance(index, faiss.IndexPQ) else None


def faiss_training(index: Any) -> dict[str, Any]:
    """The k-means settings ``index`` was (or will be) trained with, read from the index
    itself: ``pq_kmeans_niter`` (PQ codebooks), ``opq_niter`` (OPQ alternations) and
    ``polysemous_training``; empty for indexes without PQ or OPQ."""
    rotations, pq = _pq_parts(index)
    out: dict[str, Any] = {}
    for rotation in rotations:  # the last one wins, as the recursive walk did
        out["opq_niter"] = int(rotation.niter)
    if pq is not None:
        out["pq_kmeans_niter"] = int(pq.pq.cp.niter)
        out["polysemous_training"] = bool(pq.do_polysemous_training)
    return out


def _no_polysemous_training(index: Any) -> None:
    """index_factory turns on polysemous training for ``PQ{m}``: a simulated-annealing
    renumbering of the centroids that only helps Hamming-distance filtering. It leaves
    the reconstruction (so every number measured here) unchanged and took minutes at
    384-d, so it is turned off (as the ``PQ{m}np`` factory string would)."""
    _, pq = _pq_parts(index)
    if pq is not None:
        pq.do_polysemous_training = False


def _set_kmeans_niter(index: Any, niter: int) -> None:
    rotations, pq = _pq_parts(index)
    for rotation in rotations:
        rotation.niter = niter
    if pq is not None:
        pq.pq.cp.niter = niter


# -- the paper's procedures ------------------------------------------------------------
_PAPER_REF = re.compile(r"^(?:pca(\d+),)?(fp8|int8|binary)$")


class PaperMethod(Method):
    """The RAG-storage paper's quantization procedures, reproduced faithfully
    (including the steps a careful implementation would do differently)."""

    family = "paper"
    decodes = False
    writes_into = False

    def __init__(self, ref: str, options: Mapping[str, Any] | None = None) -> None:
        ref = ref.strip().lower()
        match = _PAPER_REF.match(ref)
        if match is None:
            raise SpecError(
                f"unknown paper procedure {ref!r}; use [pca{{d}},]fp8, int8 or binary "
                "(e.g. paper:int8, paper:pca192,fp8)"
            )
        super().__init__(ref, options)
        self.n_components = int(match.group(1)) if match.group(1) else None
        self.kind = match.group(2)
        self.pca: embcomp.PCAReducer | None = None
        self.starts_: np.ndarray | None = None
        self.steps_: np.ndarray | None = None
        self.d_out: int | None = None

    @property
    def search_path(self) -> str:
        return "cosine similarity between the quantized queries and quantized documents"

    @property
    def code_size(self) -> int:
        assert self.d_out is not None, "fit first"
        return (self.d_out + 7) // 8 if self.kind == "binary" else self.d_out

    def fit(self, train: np.ndarray, metric: str = "ip") -> None:
        self.metric, self.d = metric, train.shape[1]
        X = train
        if self.n_components is not None:
            pca = embcomp.PCAReducer(n_components=self.n_components)
            pca.fit(train)
            self.pca = pca
            X = pca.transform(train)
        self.d_out = X.shape[1]
        if self.kind == "int8":
            # sentence-transformers quantize_embeddings(precision="uint8")
            lo, hi = X.min(axis=0), X.max(axis=0)
            self.starts_ = lo.astype(np.float32)
            self.steps_ = ((hi - lo) / 255).astype(np.float32)

    def _project(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        return self.pca.transform(X) if self.pca is not None else X

    def encode(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            raise InputError(f"{self.name} allocates its codes; it takes no out=")
        Z = self._project(X)
        if self.kind == "fp8":
            import ml_dtypes

            return Z.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # plain cast, no scale
        if self.kind == "int8":
            assert self.starts_ is not None and self.steps_ is not None
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                scaled = (Z - self.starts_) / self.steps_
            scaled = np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)
            # astype(uint8) truncates toward zero and wraps out-of-range values on x86;
            # spelled out so the result is the same everywhere and warns nowhere.
            return np.trunc(scaled).astype(np.int64).astype(np.uint8)
        return np.packbits(Z > 0, axis=1)

    def _values(self, codes: np.ndarray) -> np.ndarray:
        """What the paper scores: the float8 values, the raw uint8 codes, or 0/1 bits."""
        if self.kind == "fp8":
            import ml_dtypes

            values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        elif self.kind == "int8":
            values = codes.astype(np.float32)
        else:
            assert self.d_out is not None
            values = np.unpackbits(codes, axis=1, count=self.d_out).astype(np.float32)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        norms[~(norms > 0)] = 1.0
        values = values / norms
        return np.nan_to_num(values, nan=0.0)

    def search(
        self, codes: np.ndarray, queries: np.ndarray, k: int, decoded: np.ndarray | None = None
    ) -> np.ndarray:
        return flat_search(self._values(codes), self._values(self.encode(queries)), k, "ip")


# -- names and templates -------------------------------------------------------------
_CLASSES: dict[str, type[Method]] = {
    "embcomp": EmbcompMethod,
    "faiss": FaissMethod,
    "paper": PaperMethod,
}


def split_method_name(name: str) -> tuple[str, str]:
    """``"faiss:SQ8"`` -> ``("faiss", "SQ8")``; a bare name is an embcomp spec."""
    family, sep, ref = name.partition(":")
    if not sep:
        return "embcomp", name
    if family not in _CLASSES:
        raise SpecError(f"unknown method family {family!r} in {name!r}; use one of {FAMILIES}")
    return family, ref


def make_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """Build an unfitted method from ``family:ref`` (bare names are embcomp specs)."""
    family, ref = split_method_name(name)
    return _CLASSES[family](ref, options)


def fixed_rate_quantizers(include_fp32: bool = False) -> list[str]:
    """Quantizer stage names with a fixed number of bits per dimension."""
    return [
        name
        for name, info in STAGES.items()
        if info.kind == "quantizer"
        and info.arg == "none"
        and info.bits is not None
        and (include_fp32 or name != "fp32")
    ]


def budget_quantizers() -> list[str]:
    """Quantizer stage names whose number is a byte budget (``alloc{bytes}``)."""
    return [name for name, info in STAGES.items() if info.kind == "quantizer" and info.bits is None]


def numbered_reducers() -> list[str]:
    """Reducer stage names that take a target width (``pca{d}``, ``mpad{d}``)."""
    return [name for name, info in STAGES.items() if info.kind == "reducer" and info.arg != "none"]


def narrower_rotation(spec: str, d: int, uncoded: int) -> str | None:
    """``pca{k},{rest}`` for a ``pca,{rest}`` (full rotation of ``d`` components) whose
    fitted quantizer leaves ``uncoded`` of them without bits (``alloc{B}`` does, from
    its ``describe()``): the same allocation from a narrower rotation, which encodes
    faster (the left-out components are no longer computed only to be dropped). None
    when the spec has no full PCA or every component is coded."""
    parsed = parse_spec(spec)
    reducer = parsed.reducer
    coded = d - uncoded
    if reducer is None or reducer.name != "pca" or reducer.arg is not None or not 0 < coded < d:
        return None
    return str(parsed).replace(str(reducer), f"pca{coded}", 1)


_DIM_PLACEHOLDER = re.compile(r"\{(?:d(?:(\d+)|/(\d+))?|m/(\d+))\}")


def nearest_divisor(d: int, target: float) -> int:
    """The divisor of ``d`` closest to ``target`` (the smaller one on a tie)."""
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), m))


def _substitute_dims(template: str, d: int) -> str:
    def repl(match: re.Match[str]) -> str:
        percent, divisor, parts = match.group(1), match.group(2), match.group(3)
        if int(divisor or parts or 1) == 0:
            raise SpecError(f"template {template!r}: {match.group(0)} divides by zero")
        if percent is not None:
            return str(max(1, round(d * int(percent) / 100)))
        if divisor is not None:
            return str(max(1, d // int(divisor)))
        if parts is not None:  # FAISS PQ's M must divide d
            return str(nearest_divisor(d, d / int(parts)))
        return str(d)

    return _DIM_PLACEHOLDER.sub(repl, template)


def budgets_for(d: int, ratios: Iterable[float]) -> list[int]:
    """Byte budgets that give the compression ``ratios`` against float32 (4 d bytes)."""
    return sorted({max(1, int(4 * d // r)) for r in ratios}, reverse=True)


def expand_templates(
    family: str, templates: Sequence[str], d: int, ratios: Sequence[float] = (4, 8, 16, 32)
) -> tuple[list[str], list[str]]:
    """Expand sweep templates into concrete method refs for width ``d``.

    Placeholders: ``{d}``, ``{dNN}`` (NN% of d, rounded), ``{d/N}`` (d // N), ``{m/N}``
    (the divisor of d nearest d / N: FAISS PQ's M, which must divide d); for
    embcomp also ``{q}`` (every fixed-rate quantizer but fp32), ``{qb}`` (every
    byte-budget quantizer at the budgets of ``ratios``) and ``{r}`` (every reducer that
    takes a width), each read from ``embcomp.spec.STAGES`` now.

    Returns
    -------
    refs : unique, valid refs in template order.
    skipped : ``"ref: reason"`` for expansions that are not valid codecs here
        (unknown or unimplemented stage, wider than the input, bigger than float32).
    """
    refs: list[str] = []
    skipped: list[str] = []
    for template in templates:
        text = _substitute_dims(template, d)
        choices: dict[str, list[str]] = {
            "{q}": fixed_rate_quantizers(),
            "{qb}": [f"{q}{b}" for q in budget_quantizers() for b in budgets_for(d, ratios)],
            "{r}": numbered_reducers(),
        }
        present = [key for key in choices if key in text]
        for combo in itertools.product(*(choices[key] for key in present)):
            ref = text
            for key, value in zip(present, combo, strict=True):
                ref = ref.replace(key, value)
            try:
                ref = _validate(family, ref, d)
            except EmbcompError as exc:
                skipped.append(f"{family}:{ref}: {exc}")
                continue
            if ref not in refs:
                refs.append(ref)
    return refs, skipped


def _validate(family: str, ref: str, d: int) -> str:
    """Canonical ref if ``ref`` is a usable method for width ``d``; else raise."""
    if family == "embcomp":
        spec = parse_spec(ref)
        embcomp.make_codec(spec)  # raises for stages without an implementation
        if spec.d_out(d) > d:
            raise SpecError(f"keeps {spec.d_out(d)} dims of {d}")
        if spec.code_size(d) > 4 * d:
            raise SpecError(f"{spec.code_size(d)} bytes per vector is more than float32")
        return str(spec)
    if family == "faiss":
        FaissMethod(ref).build(d)
        return ref.strip()
    if family == "paper":
        method = PaperMethod(ref)
        if method.n_components is not None and method.n_components > d:
            raise SpecError(f"keeps {method.n_components} dims of {d}")
        return method.ref
    raise SpecError(f"unknown method family {family!r}; use one of {FAMILIES}")
