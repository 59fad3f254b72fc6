"""Encode and decode row blocks for the batch engines.

Both engines read the input in the same blocks (same readers, same block sizes), so
they write the same bytes. A codec with a reducer encodes a row read in another
grouping (another block size, alone) to the same codes up to BLAS rounding: the
projection's last bit can depend on the shape of the matrix product, and a value on
a rounding boundary then takes the neighbouring level (up to 0.1% of values; see
``embcomp.reducers._base.project``). Codecs without a reducer never depend on grouping.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._readers import BadRow, Block, bad_row_message, nonfinite_reasons
from ..codec import Codec
from ..exceptions import InputError

__all__ = ["decode_rows", "encode_rows", "transform_block"]


def encode_rows(codec: Codec, X: np.ndarray) -> np.ndarray:
    """``codec.encode(X)``: float (n, d_in) -> uint8 (n, code_size) (see the module
    docstring for how a row's codes can depend on its block)."""
    return codec.encode(X)


def decode_rows(codec: Codec, codes: np.ndarray) -> np.ndarray:
    """``codec.decode(codes)``: uint8 (n, code_size) -> float32 (n, d_in)."""
    return codec.decode(codes)


def transform_block(
    codec: Codec, block: Block, command: str, on_bad_row: str
) -> tuple[np.ndarray, np.ndarray, Any, list[BadRow]]:
    """Encode (``compress``) or decode (``decompress``) one block.

    Returns
    -------
    out : uint8 (n, code_size) codes or float32 (n, d_in) vectors.
    rows : int64 (n,), the file row of each output row.
    ids : the block's ids for those rows (pyarrow Array) or None.
    bad : rows dropped here (non-finite vectors, or finite ones the codec cannot
        encode); only when ``on_bad_row="skip"``.

    Non-finite values are found by ``Codec.encode`` itself while it works through the
    block, so the common, clean case reads the data once; only a failing block is
    scanned again to name every bad row (and, when finite rows fail too, bisected).
    """
    if command == "decompress":
        return decode_rows(codec, block.data), block.rows, block.ids, []
    try:
        return encode_rows(codec, block.data), block.rows, block.ids, []
    except InputError as exc:
        error = exc
    reasons = nonfinite_reasons(block.data)
    keep = np.ones(block.data.shape[0], dtype=bool)
    keep[list(reasons)] = False
    codes = _encode_or_none(codec, block.data[keep]) if reasons else None
    if codes is None:  # finite rows fail too (values too large for the reducer)
        found = _unencodable_rows(codec, block.data, np.flatnonzero(keep))
        if not found:  # no row fails alone: not a matter of bad rows
            raise error
        reasons.update(found)
        keep[list(found)] = False
    ids = block.ids
    bad = [
        BadRow(
            str(block.source.path),
            int(block.rows[i]),
            None if ids is None else ids[i].as_py(),
            reasons[i],
        )
        for i in sorted(reasons)
    ]
    if on_bad_row != "skip":
        raise InputError(bad_row_message(bad[0], len(bad)))
    if codes is None:
        codes = encode_rows(codec, block.data[keep])
    kept_ids = None if ids is None else ids.filter(keep)
    return codes, block.rows[keep], kept_ids, bad


def _encode_or_none(codec: Codec, data: np.ndarray) -> np.ndarray | None:
    try:
        return encode_rows(codec, data)
    except InputError:
        return None


def _unencodable_rows(codec: Codec, data: np.ndarray, candidates: np.ndarray) -> dict[int, str]:
    """Block row -> reason for the rows among ``candidates`` (finite ones) that the
    codec refuses, e.g. values so large that they become inf in the reducer.

    Found by bisection: a range that encodes holds none, so a clean range costs one
    call and each bad row about log2(n) small ones.
    """
    reasons: dict[int, str] = {}
    pending = [candidates] if candidates.size else []
    while pending:
        rows = pending.pop()
        try:
            encode_rows(codec, data[rows])
        except InputError as exc:
            if rows.size > 1:
                half = rows.size // 2
                pending += [rows[half:], rows[:half]]
            else:
                # the codec's words ("row 0 becomes inf after the reducer: ...") without
                # its row number: the caller names the row in the file
                reasons[int(rows[0])] = str(exc).removeprefix("row 0 ")
    return reasons
