"""Encode and decode row blocks so that a row's bytes never depend on its neighbours.

Both engines cut the input into blocks wherever their reader or scheduler happens to,
so the codes of a row must not depend on how rows are grouped. One thing breaks that:
a one-row matrix product goes through BLAS's matrix-vector kernel, whose summation
order differs from the matrix-matrix kernel used for every larger block, and a value
on a rounding boundary can then land on the neighbouring code. ``Codec.encode`` feeds
its reducer blocks of ``rows_per_block`` rows, so a call whose row count leaves a
remainder of one would hit it. These wrappers never let that happen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._blocks import rows_per_block
from .._readers import BadRow, Block, bad_row_message, nonfinite_reasons
from ..codec import Codec
from ..exceptions import InputError

__all__ = ["decode_rows", "encode_rows", "transform_block"]


def _lone_row(n: int, width: int) -> bool:
    return n % rows_per_block(4 * width) == 1


def encode_rows(codec: Codec, X: np.ndarray) -> np.ndarray:
    """``codec.encode(X)``: float (n, d_in) -> uint8 (n, code_size), row-independent."""
    n, d_in = X.shape[0], codec._check_fitted()
    if not _lone_row(n, d_in):
        return codec.encode(X)
    if n == 1:
        return codec.encode(np.concatenate([X, X]))[:1]
    return np.concatenate([codec.encode(X[:-2]), codec.encode(X[-2:])])


def decode_rows(codec: Codec, codes: np.ndarray) -> np.ndarray:
    """``codec.decode(codes)``: uint8 (n, code_size) -> float32 (n, d_in), row-independent."""
    n, d_in = codes.shape[0], codec._check_fitted()
    if not _lone_row(n, d_in):
        return codec.decode(codes)
    if n == 1:
        return codec.decode(np.concatenate([codes, codes]))[:1]
    return np.concatenate([codec.decode(codes[:-2]), codec.decode(codes[-2:])])


def transform_block(
    codec: Codec, block: Block, command: str, on_bad_row: str
) -> tuple[np.ndarray, np.ndarray, Any, list[BadRow]]:
    """Encode (``compress``) or decode (``decompress``) one block.

    Returns
    -------
    out : uint8 (n, code_size) codes or float32 (n, d_in) vectors.
    rows : int64 (n,), the file row of each output row.
    ids : the block's ids for those rows (pyarrow Array) or None.
    bad : rows dropped here (non-finite vectors); only when ``on_bad_row="skip"``.

    Non-finite values are found by ``Codec.encode`` itself while it works through the
    block, so the common, clean case reads the data once; only a failing block is
    scanned again to name every bad row.
    """
    if command == "decompress":
        return decode_rows(codec, block.data), block.rows, block.ids, []
    try:
        return encode_rows(codec, block.data), block.rows, block.ids, []
    except InputError:
        reasons = nonfinite_reasons(block.data)
        if not reasons:
            raise
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
    keep = np.ones(block.data.shape[0], dtype=bool)
    keep[sorted(reasons)] = False
    kept_ids = None if ids is None else ids.filter(keep)
    return encode_rows(codec, block.data[keep]), block.rows[keep], kept_ids, bad
