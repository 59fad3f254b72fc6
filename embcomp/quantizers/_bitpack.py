"""Pack per-field integer codes of mixed bit widths into bytes, and back.

A :class:`BitLayout` fixes, for every field of a record, its width in bits (0 to 16).
Records are packed back to back into a little-endian bit stream: field ``j`` occupies
the ``widths[j]`` bits after those of fields ``0..j-1``, least significant bit first,
and bit ``t`` of the stream is bit ``t % 8`` of byte ``t // 8`` (``np.packbits`` with
``bitorder="little"``). The record is padded with zero bits to whole bytes.

Runs of consecutive 8-bit fields that start on a byte boundary are copied as bytes,
and runs of 4-bit fields on a byte boundary as nibbles, so the common layouts avoid
the per-bit path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..exceptions import InputError

__all__ = ["BitLayout"]

MAX_WIDTH = 16


@dataclass(frozen=True)
class _Run:
    """A run of fields ``[first, stop)`` handled by one strategy."""

    kind: str  # "byte", "nibble" or "bits"
    first: int
    stop: int
    bit_offset: int  # position of the run's first bit in the record
    n_bits: int


@dataclass(frozen=True, eq=False)
class BitLayout:
    """Bit widths of the fields of one record.

    Parameters
    ----------
    widths : sequence of int in [0, 16]
        Bits of each field; a 0-width field stores nothing and unpacks as 0.

    Attributes
    ----------
    n_bits : int, total bits of a record.
    n_bytes : int, ``ceil(n_bits / 8)``: bytes per packed record.
    """

    widths: tuple[int, ...]
    _runs: tuple[_Run, ...] = field(init=False, repr=False)

    def __init__(self, widths: object) -> None:
        values = tuple(int(w) for w in np.asarray(widths, dtype=np.int64).ravel())
        bad = [w for w in values if not 0 <= w <= MAX_WIDTH]
        if bad:
            raise InputError(f"bit widths must be in [0, {MAX_WIDTH}]; got {bad[:5]}")
        object.__setattr__(self, "widths", values)
        object.__setattr__(self, "_runs", _plan_runs(values))

    @property
    def n_fields(self) -> int:
        return len(self.widths)

    @property
    def n_bits(self) -> int:
        return int(sum(self.widths))

    @property
    def n_bytes(self) -> int:
        return (self.n_bits + 7) // 8

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """Pack ``codes`` (n, n_fields) unsigned ints -> uint8 (n, n_bytes).

        Each code must fit its field's width (values are masked to it, so callers must
        clip first; the quantizers here always do).
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.n_fields:
            raise InputError(f"codes must have shape (n, {self.n_fields}); got {codes.shape}")
        n = codes.shape[0]
        out = np.zeros((n, self.n_bytes), dtype=np.uint8)
        for run in self._runs:
            part = codes[:, run.first : run.stop]
            byte0 = run.bit_offset // 8
            if run.kind == "byte":
                out[:, byte0 : byte0 + run.n_bits // 8] = part
            elif run.kind == "nibble":
                values = part.astype(np.uint8) & 0x0F
                if values.shape[1] % 2:
                    values = np.concatenate([values, np.zeros((n, 1), np.uint8)], axis=1)
                nbytes = values.shape[1] // 2
                out[:, byte0 : byte0 + nbytes] |= values[:, 0::2] | (values[:, 1::2] << 4)
            else:
                widths = np.asarray(self.widths[run.first : run.stop])
                field_of_bit = np.repeat(np.arange(run.stop - run.first), widths)
                dtype = np.uint8 if widths.max(initial=0) <= 8 else np.uint16
                shift_of_bit = _shifts(widths).astype(dtype)
                bits = (part.astype(dtype)[:, field_of_bit] >> shift_of_bit) & 1
                lead = run.bit_offset % 8  # the run may start inside a byte
                if lead:
                    bits = np.concatenate([np.zeros((n, lead), bits.dtype), bits], axis=1)
                packed = np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")
                out[:, byte0 : byte0 + packed.shape[1]] |= packed
        return out

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pack`: uint8 (n, n_bytes) -> uint16 codes (n, n_fields)."""
        packed = np.asarray(packed)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != self.n_bytes:
            raise InputError(
                f"packed codes must be uint8 of shape (n, {self.n_bytes}); "
                f"got {packed.dtype} {packed.shape}"
            )
        n = packed.shape[0]
        out = np.zeros((n, self.n_fields), dtype=np.uint16)
        for run in self._runs:
            byte0 = run.bit_offset // 8
            count = run.stop - run.first
            if run.kind == "byte":
                out[:, run.first : run.stop] = packed[:, byte0 : byte0 + count]
            elif run.kind == "nibble":
                chunk = packed[:, byte0 : byte0 + (count + 1) // 2]
                both = np.empty((n, 2 * chunk.shape[1]), dtype=np.uint8)
                both[:, 0::2] = chunk & 0x0F
                both[:, 1::2] = chunk >> 4
                out[:, run.first : run.stop] = both[:, :count]
            else:
                lead = run.bit_offset % 8
                last = (run.bit_offset + run.n_bits + 7) // 8
                bits = np.unpackbits(
                    packed[:, byte0:last], axis=1, count=lead + run.n_bits, bitorder="little"
                )[:, lead:]
                widths = np.asarray(self.widths[run.first : run.stop])
                nonzero = np.flatnonzero(widths)
                if nonzero.size == 0:
                    continue
                weighted = bits.astype(np.uint16) << _shifts(widths).astype(np.uint16)
                starts = (np.cumsum(widths) - widths)[nonzero]
                sums = np.add.reduceat(weighted, starts, axis=1)
                out[:, run.first + nonzero] = sums
        return out


def _shifts(widths: np.ndarray) -> np.ndarray:
    """For each bit of a run of fields, its position inside its field (0 = LSB)."""
    total = int(widths.sum())
    starts = np.repeat(np.cumsum(widths) - widths, widths)
    return (np.arange(total) - starts).astype(np.uint32)


def _plan_runs(widths: tuple[int, ...]) -> tuple[_Run, ...]:
    """Split the fields into byte-aligned 8-bit runs, nibble runs, and general bit runs."""
    runs: list[_Run] = []
    offset = 0
    j = 0
    n = len(widths)
    pending_first, pending_offset = 0, 0

    def flush(stop: int, at: int) -> None:
        if stop > pending_first:
            runs.append(_Run("bits", pending_first, stop, pending_offset, at - pending_offset))

    while j < n:
        w = widths[j]
        if offset % 8 == 0 and w in (4, 8):
            k = j
            while k < n and widths[k] == w:
                k += 1
            count = k - j
            if w == 4 and count % 2:  # a nibble run must end on a byte boundary
                count -= 1
            if count >= 2 or (w == 8 and count >= 1):
                flush(j, offset)
                runs.append(_Run("byte" if w == 8 else "nibble", j, j + count, offset, w * count))
                offset += w * count
                j += count
                pending_first, pending_offset = j, offset
                continue
        offset += w
        j += 1
    flush(n, offset)
    return tuple(runs)
