"""The one parser of codec spec strings.

A spec names the stages of a codec in data-flow order, joined by commas, in the spirit
of FAISS's ``index_factory``::

    fp16            int8            pca256,fp8          l2norm,pca192,fp8e5m2
    mpad128,int8    pca64,bin       pca,alloc96         rot,int4

Grammar: ``[l2norm,] [reducer,] [quantizer]``; the quantizer defaults to ``fp32``.
``parse_spec`` returns a frozen :class:`CodecSpec` whose ``str()`` is canonical
(aliases resolved, the quantizer always written) and parses back to an equal spec.
Everything else -- bytes per vector, file names, plot labels, CLI help -- derives
from the parsed spec, never from the raw string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from .exceptions import SpecError

__all__ = ["STAGES", "CodecSpec", "Stage", "StageInfo", "parse_spec"]

StageKind = Literal["normalize", "reducer", "quantizer"]
ArgRule = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class StageInfo:
    """Grammar facts about one stage name.

    Attributes
    ----------
    kind : "normalize", "reducer" or "quantizer"; fixes the stage's slot in the spec.
    arg : whether the name takes a trailing integer (``pca256``, ``alloc96``).
    bits : bits per output dimension for fixed-rate quantizers; ``None`` when the
        argument itself is the byte budget (``alloc{bytes}``) or for non-quantizers.
    help : one line for CLI help and docs.
    """

    kind: StageKind
    arg: ArgRule
    bits: int | None
    help: str


# The single table of stage names. Adding a stage = one row here + its class.
STAGES: dict[str, StageInfo] = {
    "l2norm": StageInfo("normalize", "none", None, "scale each vector to unit L2 norm"),
    "pca": StageInfo("reducer", "optional", None, "PCA to {d} dims (all dims if no number)"),
    "mpad": StageInfo("reducer", "required", None, "MPAD projection to {d} dims"),
    "rot": StageInfo("reducer", "none", None, "seeded random orthogonal rotation"),
    "fp32": StageInfo("quantizer", "none", 32, "float32, lossless"),
    "fp16": StageInfo("quantizer", "none", 16, "IEEE float16, centred and scaled"),
    "bf16": StageInfo("quantizer", "none", 16, "bfloat16, centred and scaled"),
    "fp8": StageInfo("quantizer", "none", 8, "float8 E4M3 (max 448), per-dim centre + scale"),
    "fp8e5m2": StageInfo("quantizer", "none", 8, "float8 E5M2 (max 57344), per-dim centre + scale"),
    "fp4": StageInfo("quantizer", "none", 4, "float4 E2M1 (max 6), per-dim centre + scale, 2/byte"),
    "int8": StageInfo("quantizer", "none", 8, "8-bit uniform levels, per-dim calibrated range"),
    "int4": StageInfo("quantizer", "none", 4, "4-bit uniform levels, per-dim range, 2 per byte"),
    "bin": StageInfo("quantizer", "none", 1, "1 bit per dim: sign about a fitted center"),
    "alloc": StageInfo(
        "quantizer",
        "required",
        None,
        "exactly {n} bytes: bits where queries weigh the data + k-means",
    ),
}

ALIASES: dict[str, str] = {"fp8e4m3": "fp8", "float32": "fp32", "float16": "fp16"}

DEFAULT_QUANTIZER = "fp32"
_SLOT_ORDER: dict[StageKind, int] = {"normalize": 0, "reducer": 1, "quantizer": 2}
_NAME_NUMBER = re.compile(r"^([a-z]+)([0-9]+)$")


@dataclass(frozen=True)
class Stage:
    """One parsed stage: a canonical name and its optional integer argument."""

    name: str
    arg: int | None = None

    @property
    def info(self) -> StageInfo:
        return STAGES[self.name]

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}{self.arg}"


@dataclass(frozen=True)
class CodecSpec:
    """A parsed, validated codec spec. ``str(spec)`` is canonical and round-trips."""

    normalize: bool
    reducer: Stage | None
    quantizer: Stage

    @property
    def stages(self) -> tuple[Stage, ...]:
        head = (Stage("l2norm"),) if self.normalize else ()
        middle = (self.reducer,) if self.reducer is not None else ()
        return head + middle + (self.quantizer,)

    def __str__(self) -> str:
        return ",".join(str(stage) for stage in self.stages)

    @property
    def slug(self) -> str:
        """A file-name-safe form of the spec (``pca256,fp8`` -> ``pca256-fp8``)."""
        return str(self).replace(",", "-")

    def d_out(self, d_in: int) -> int:
        """Width of the vectors the quantizer sees, for inputs of width ``d_in``."""
        if self.reducer is None or self.reducer.arg is None:
            return d_in
        return self.reducer.arg

    def code_size(self, d_in: int) -> int:
        """Bytes per encoded vector for inputs of width ``d_in``, without fitting."""
        bits = self.quantizer.info.bits
        if bits is None:  # the argument is the byte budget itself
            assert self.quantizer.arg is not None
            return self.quantizer.arg
        return math.ceil(self.d_out(d_in) * bits / 8)


def _valid_names() -> str:
    return ", ".join(sorted(STAGES) + sorted(ALIASES))


def _parse_token(token: str, position: int, spec: str) -> Stage:
    name, arg = token, None
    canonical = ALIASES.get(name, name)
    if canonical not in STAGES:
        match = _NAME_NUMBER.match(token)
        if match is None or match.group(1) not in STAGES:
            raise SpecError(
                f"unknown stage {token!r} at position {position} in spec {spec!r}; "
                f"valid names: {_valid_names()} (reducers and alloc take a number, e.g. pca256)"
            )
        if len(match.group(2)) > 9:
            raise SpecError(
                f"stage {token!r} at position {position} in spec {spec!r}: the number is too large"
            )
        canonical, arg = match.group(1), int(match.group(2))
    info = STAGES[canonical]
    if arg is None and info.arg == "required":
        raise SpecError(
            f"stage {token!r} at position {position} in spec {spec!r} needs a number, "
            f"e.g. {canonical}128"
        )
    if arg is not None and info.arg == "none":
        raise SpecError(
            f"stage {canonical!r} at position {position} in spec {spec!r} takes no number; "
            f"got {token!r}"
        )
    if arg is not None and arg < 1:
        raise SpecError(
            f"stage {token!r} at position {position} in spec {spec!r}: the number must be >= 1"
        )
    return Stage(canonical, arg)


def parse_spec(spec: str | CodecSpec) -> CodecSpec:
    """Parse a spec string into a :class:`CodecSpec`.

    Parameters
    ----------
    spec : str or CodecSpec
        E.g. ``"pca256,fp8"``. Case and surrounding spaces are ignored. A
        ``CodecSpec`` is returned unchanged.

    Raises
    ------
    SpecError
        Naming the offending token, its position (0-based) and the valid names.
    """
    if isinstance(spec, CodecSpec):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string like 'pca256,fp8', got {type(spec).__name__}")
    tokens = [t.strip().lower() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in tokens):
        raise SpecError(
            f"empty stage in spec {spec!r}; write stages joined by commas, e.g. 'pca256,fp8'"
        )
    slots: dict[StageKind, Stage] = {}
    last_slot = -1
    for position, token in enumerate(tokens):
        stage = _parse_token(token, position, spec)
        kind = stage.info.kind
        if kind in slots:
            raise SpecError(
                f"second {kind} {token!r} at position {position} in spec {spec!r}; "
                f"a spec has at most one {kind} (already {slots[kind]})"
            )
        if _SLOT_ORDER[kind] < last_slot:
            raise SpecError(
                f"stage {token!r} at position {position} in spec {spec!r} is out of order; "
                "write [l2norm,] [reducer,] [quantizer] with the quantizer last"
            )
        slots[kind] = stage
        last_slot = _SLOT_ORDER[kind]
    return CodecSpec(
        normalize="normalize" in slots,
        reducer=slots.get("reducer"),
        quantizer=slots.get("quantizer", Stage(DEFAULT_QUANTIZER)),
    )
