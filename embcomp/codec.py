"""Codec = optional L2 normalization + optional reducer + one quantizer.

>>> codec = make_codec("pca256,fp8").fit(train)      # doctest: +SKIP
>>> codes = codec.encode(X)           # uint8 (n, codec.code_size)
>>> approx = codec.decode(codes)      # float32 (n, d_in)
"""

from __future__ import annotations

import copy
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from . import _jit
from ._blocks import Scratch, float32_block, map_blocks, rows_per_block
from ._validation import (
    all_finite,
    check_codes,
    check_finite,
    check_matrix,
    check_output,
    column_range,
    normalize_rows,
    to_float32,
)
from .exceptions import InputError, NotFittedError, SpecError
from .quantizers import (
    AllocQuantizer,
    BinaryQuantizer,
    FloatQuantizer,
    IntQuantizer,
    Quantizer,
)
from .reducers import LinearReducer, MPADReducer, PCAReducer, RandomRotation
from .reducers._base import project
from .spec import CodecSpec, Stage, parse_spec

__all__ = ["Codec", "make_codec"]

# stage name -> (class, structural constructor arguments derived from the spec)
StageFactory = Callable[[Stage], tuple[type, dict[str, Any]]]
STAGE_FACTORIES: dict[str, StageFactory] = {
    "pca": lambda s: (PCAReducer, {"n_components": s.arg}),
    "mpad": lambda s: (MPADReducer, {"n_components": s.arg}),
    "rot": lambda s: (RandomRotation, {}),
    "int8": lambda s: (IntQuantizer, {"bits": 8}),
    "int4": lambda s: (IntQuantizer, {"bits": 4}),
    "bin": lambda s: (BinaryQuantizer, {}),
    "alloc": lambda s: (AllocQuantizer, {"budget": s.arg}),
    **{
        name: (lambda s: (FloatQuantizer, {"fmt": s.name}))
        for name in ("fp32", "fp16", "bf16", "fp8", "fp8e5m2", "fp4")
    },
}

# Options every codec accepts even when no stage uses them, so callers (CLI,
# service) can always pass them.
_UNIVERSAL_OPTIONS = {"seed": 0}


def _tunable_params(cls: type, structural: dict[str, Any]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls).parameters
    return {
        name: p
        for name, p in params.items()
        if name != "self" and name not in structural and p.kind is p.KEYWORD_ONLY
    }


def _build_stage(stage: Stage, options: dict[str, Any]) -> Any:
    cls, structural = STAGE_FACTORIES[stage.name](stage)
    kwargs = {k: v for k, v in options.items() if k in _tunable_params(cls, structural)}
    return cls(**structural, **kwargs)


def _check_option_types(spec: CodecSpec, options: dict[str, Any]) -> None:
    """Reject option values of the wrong type before fitting (a ``SpecError``).

    The expected types are the type hints of the spec's stage constructors (plus
    ``seed: int``), checked strictly with pydantic: ``percentile="abc"`` or
    ``whiten="yes"`` would otherwise fail deep inside ``fit`` as a bare ValueError, or
    not at all. Names no stage knows are left to ``make_codec``, which lists the valid ones.
    """
    hints: dict[str, Any] = {"seed": int}
    for stage in spec.stages:
        factory = STAGE_FACTORIES.get(stage.name)
        if factory is not None:
            cls, structural = factory(stage)
            init = cls.__init__  # type: ignore[misc]  # the class, not an instance
            try:
                stage_hints = typing.get_type_hints(init)
            except (NameError, TypeError):  # unresolvable hints: leave it to the stage
                continue
            for name, hint in stage_hints.items():
                if name != "return" and name not in structural:
                    hints[name] = hint
    for name, value in options.items():
        if name not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[name])
        except PydanticSchemaGenerationError:  # a hint pydantic cannot check
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            expected = getattr(hints[name], "__name__", None) or str(hints[name])
            raise SpecError(
                f"option {name}={value!r} for spec {str(spec)!r} has the wrong type: expected "
                f"{expected} ({exc.errors()[0]['msg']})"
            ) from None


class Codec:
    """A fitted (or fittable) codec named by a spec string.

    Parameters
    ----------
    spec : spec string or CodecSpec, e.g. ``"pca256,fp8"``.
    **options : training knobs of the spec's stages (``seed``, ``scale``,
        ``percentile``, ``whiten``, MPAD's ``alpha``/``b``...). Unknown names raise
        ``SpecError`` listing the valid ones. Stored in the artifact manifest.

    Attributes
    ----------
    spec : CodecSpec
    reducer : LinearReducer or None
    quantizer : Quantizer
    d_in, d_out, code_size : int, available after ``fit``.
    """

    def __init__(self, spec: str | CodecSpec, **options: Any) -> None:
        self.spec = parse_spec(spec)
        valid = dict(_UNIVERSAL_OPTIONS)
        for stage in self.spec.stages:
            if stage.name in STAGE_FACTORIES:
                cls, structural = STAGE_FACTORIES[stage.name](stage)
                for name, p in _tunable_params(cls, structural).items():
                    valid.setdefault(name, p.default)
            elif stage.name != "l2norm":
                raise SpecError(f"stage {stage.name!r} has no implementation registered")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SpecError(
                f"unknown option(s) {unknown} for spec {str(self.spec)!r}; "
                f"valid options: {sorted(valid)}"
            )
        for name, value in options.items():
            try:  # options are stored in the artifact's JSON manifest
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise SpecError(
                    f"option {name}={value!r} must be a plain JSON value (a finite number, "
                    "string, bool or list of them)"
                ) from None
        _check_option_types(self.spec, options)
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"option seed must be an integer >= 0; got {seed!r}")
        self.options: dict[str, Any] = {**valid, **options}
        self.reducer: LinearReducer | None = (
            _build_stage(self.spec.reducer, self.options) if self.spec.reducer else None
        )
        self.quantizer: Quantizer = _build_stage(self.spec.quantizer, self.options)
        self.d_in: int | None = None

    # -- properties -----------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.d_in is not None

    def _check_fitted(self) -> int:
        if self.d_in is None:
            raise NotFittedError(
                f"codec {str(self.spec)!r} is not fitted yet; call fit(X) with training vectors"
            )
        return self.d_in

    @property
    def d_out(self) -> int:
        """Width of the reduced vectors the quantizer stores."""
        return self.spec.d_out(self._check_fitted())

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector: exactly the width of ``encode``'s output."""
        self._check_fitted()
        return self.quantizer.code_size

    @property
    def compression_ratio(self) -> float:
        """float32 bytes per vector divided by ``code_size``."""
        return 4 * self._check_fitted() / self.code_size

    # -- fit / encode / decode ---------------------------------------------------------
    def fit(self, X: Any, *, reducer: LinearReducer | None = None) -> Codec:
        """Fit every stage on training vectors ``X`` (n, d_in) float; returns ``self``.

        ``reducer``: a reducer already fitted (on these rows, normalized if the spec
        says so) to use as it is, so only the quantizer is fitted: one PCA shared by
        codecs that differ in their quantizer (``pca96,int8``, ``pca96,fp8``). It must be
        of this codec's reducer stage and settings; the codec keeps a copy.
        """
        X = check_matrix(X, name="training vectors")
        X32 = to_float32(X, name="training vectors")
        check_finite(X32, name="training vectors")
        if reducer is not None:
            self._check_given_reducer(reducer, X32.shape[1])
        if self.spec.normalize:  # in place, but never in the caller's array
            X32 = normalize_rows(X32.copy() if np.may_share_memory(X32, X) else X32)
        # Stages are fitted as copies and swapped in together: a fit that fails part way
        # leaves the codec as it was, never a new reducer before an old quantizer.
        given = reducer is not None
        reducer = copy.copy(reducer if given else self.reducer)
        origin = None
        if reducer is not None:
            lo, hi = column_range(X32)
            if (lo == hi).all():
                raise InputError(
                    f"the {X32.shape[0]} training vector(s) are all identical: "
                    f"{self.spec.stages[-2]} centres them on their mean, which leaves "
                    "the quantizer nothing to calibrate on; fit on varied vectors"
                )
            if not given:
                reducer.fit(X32)
            with np.errstate(over="ignore", invalid="ignore"):  # named just below
                X32 = reducer.transform(X32)
            if not all_finite(X32):
                raise InputError(
                    f"training row {_first_nonfinite_row(X32)} becomes inf after the reducer: "
                    "its values are too large for float32 arithmetic; rescale the vectors"
                )
            # where the input's origin lands: inner-product queries are measured from it
            origin = reducer.transform(np.zeros((1, X.shape[1]), dtype=np.float32))[0]
        quantizer = copy.copy(self.quantizer).fit(X32, origin=origin)
        self.reducer, self.quantizer, self.d_in = reducer, quantizer, X.shape[1]
        return self

    def _check_given_reducer(self, reducer: Any, d_in: int) -> None:
        """A reducer passed to :meth:`fit` must be what this codec would have fitted."""
        mine = self.reducer
        if mine is None:
            raise InputError(f"codec {self.spec} has no reducer stage; fit it without reducer=")
        if type(reducer) is not type(mine) or reducer.get_params() != mine.get_params():
            raise InputError(
                f"reducer= must be a fitted {type(mine).__name__} with the settings of "
                f"codec {self.spec} ({mine.get_params()}); got a {type(reducer).__name__}"
                + (f" ({reducer.get_params()})" if type(reducer) is type(mine) else "")
            )
        width = reducer.n_features_in_  # raises NotFittedError when it is not fitted
        if width != d_in:
            raise InputError(
                f"reducer= was fitted on {width} dims; the training vectors have {d_in}"
            )

    def _reduce_block(self, block: np.ndarray, scratch: Scratch, *, owned: bool) -> np.ndarray:
        """Normalize and reduce one C-contiguous finite float32 block (the encode hot path).

        ``owned``: ``block`` is a temporary that may be overwritten. The result is always
        one the quantizer may overwrite when there is a reducer or normalization.
        """
        if self.spec.normalize:
            if not owned:
                copy = scratch.get("input", block.shape, np.float32)
                np.copyto(copy, block)
                block = copy
            block = normalize_rows(block)
        if self.reducer is None:
            return block
        reducer = self.reducer
        if type(reducer).transform_block is not LinearReducer.transform_block:
            return reducer.transform_block(block)
        # LinearReducer.transform_block (X @ P - offset) with its output in scratch
        z = scratch.get("reduced", (block.shape[0], reducer.n_components_), np.float32)
        project(block, reducer._projection, z.shape[1], out=z)
        np.subtract(z, reducer._offset, out=z)
        return z

    def encode(self, X: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Encode ``X`` (n, d_in) float -> uint8 codes (n, code_size).

        Works block by block on all cores (normalize, reduce, quantize fused per block),
        so memory beyond the output is a few blocks per thread whatever ``n`` is.
        ``out``: a uint8 (n, code_size) C-contiguous buffer to write into and return
        (like FAISS's ``sa_encode(x, codes)``); reusing one skips the page faults of
        fresh memory. If encoding fails (a non-finite row), ``out`` is partly written.
        """
        d_in = self._check_fitted()
        X = check_matrix(X, d=d_in, allow_empty=True)
        out = check_output(out, (X.shape[0], self.code_size), X, encoding=True)
        transformed = self.spec.normalize or self.reducer is not None

        def work(start: int, stop: int, scratch: Scratch) -> None:
            block, owned = float32_block(X, start, stop, scratch)
            if not transformed:  # the quantizer checks finiteness (in its kernel's pass)
                self.quantizer._encode_checked(
                    block, out[start:stop], scratch, overwrite=owned, row_offset=start
                )
                return
            # A NaN or inf in an input row makes its normalized or reduced row non-finite
            # too (inf * 0 is NaN), so checking the quantizer's input is enough, and saves
            # a pass over the (wider) input. Only a failure looks at the input again.
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                reduced = self._reduce_block(block, scratch, owned=owned)
            try:
                self.quantizer._encode_checked(
                    reduced, out[start:stop], scratch, overwrite=True, row_offset=start
                )
            except InputError:
                check_finite(X[start:stop], row_offset=start)  # names the bad input row
                raise InputError(
                    f"row {_first_nonfinite_row(reduced) + start} becomes inf after "
                    f"{'normalization' if self.reducer is None else 'the reducer'}: its "
                    "values are too large for float32 arithmetic; rescale the vectors"
                ) from None

        # With a reducer, blocks of rows_per_block rows (the grouping BLAS rounding depends
        # on, which the batch engine and the client align to); else the quantizer's own.
        rows = rows_per_block(4 * d_in) if transformed else self.quantizer._block_rows(X)
        map_blocks(
            X.shape[0], rows, work, uses_blas=self.reducer is not None, divisible=not transformed
        )
        return out

    def decode(
        self, codes: Any, *, reduced: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Decode uint8 codes (n, code_size) -> float32 (n, d_in).

        With ``reduced=True`` return the (n, d_out) vectors in the reducer's space,
        for search against :meth:`project_queries`. ``out``: a float32 C-contiguous
        buffer of that shape to write into and return (like FAISS's
        ``sa_decode(codes, x)``); reusing one skips the page faults of fresh memory,
        and a large one is written with streaming stores (see ``Quantizer.decode``).
        """
        d_in = self._check_fitted()
        codes = check_codes(codes, code_size=self.code_size)
        expand = self.reducer is not None and not reduced
        shape = (codes.shape[0], d_in if expand else self.d_out)
        given = out is not None
        out = check_output(out, shape, codes)
        stream = given and not expand and _jit.streams(out)  # see embcomp._jit.streams

        def work(start: int, stop: int, scratch: Scratch) -> None:
            block = np.ascontiguousarray(codes[start:stop])
            if not expand:
                self.quantizer._decode_into(block, out[start:stop], scratch, stream=stream)
                return
            assert self.reducer is not None
            z = scratch.get("reduced", (block.shape[0], self.d_out), np.float32)
            self.quantizer._decode_into(block, z, scratch)
            reducer = self.reducer
            if type(reducer).inverse_transform_block is not LinearReducer.inverse_transform_block:
                out[start:stop] = reducer.inverse_transform_block(z)
                return
            # LinearReducer.inverse_transform_block (Z @ inverse_components_ + mean_), in place
            assert reducer.inverse_components_ is not None and reducer.mean_ is not None
            project(z, reducer._inverse, out.shape[1], out=out[start:stop])
            np.add(out[start:stop], reducer.mean_, out=out[start:stop])

        rows = rows_per_block(4 * d_in) if expand else self.quantizer._block_rows()
        map_blocks(codes.shape[0], rows, work, uses_blas=expand, divisible=not expand)
        return out

    def project_queries(self, Q: Any, *, metric: str = "ip") -> np.ndarray:
        """Map float queries (n, d_in) into the reduced space: (n, d_out) float32.

        For ``metric="ip"``, ``project_queries(Q) @ decode(c, reduced=True).T`` ranks
        every base vector exactly as ``Q @ decode(c).T`` does: the two differ by
        ``Q @ mean_``, a constant per query. (Centering the query would instead add a
        term that depends on the base vector and change the ranking.) For
        ``metric="l2"`` the query is centered, which is exact for orthonormal reducers
        (PCA without whitening, rotations).
        """
        d_in = self._check_fitted()
        Q = check_matrix(Q, name="queries", d=d_in, allow_empty=True)
        Q32 = to_float32(Q, name="queries")
        check_finite(Q32, name="queries")
        if self.reducer is None:
            return Q32.copy() if Q32 is Q else Q32
        if metric == "ip":
            return project(Q32, self.reducer._query_projection, self.reducer._offset.shape[0])
        if metric == "l2":
            if not self.reducer.has_orthonormal_rows:
                raise SpecError(
                    f"metric='l2' query projection is exact only for orthonormal reducers; "
                    f"{str(self.spec)!r} is not one: search decoded vectors instead"
                )
            return self.reducer.transform(Q32)
        raise SpecError(f"metric must be 'ip' or 'l2'; got {metric!r}")

    def __repr__(self) -> str:
        fitted = f"d_in={self.d_in}, code_size={self.code_size}" if self.is_fitted else "unfitted"
        return f"Codec({str(self.spec)!r}, {fitted})"


def _first_nonfinite_row(block: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])


def make_codec(spec: str | CodecSpec, **options: Any) -> Codec:
    """Build an unfitted :class:`Codec` from a spec string and training options."""
    return Codec(spec, **options)
