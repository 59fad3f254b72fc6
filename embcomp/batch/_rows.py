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
