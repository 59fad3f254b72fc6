"""Quantizers: float vectors <-> bytes (``fit`` / ``encode`` / ``decode`` / ``code_size``)."""

from ._alloc import AllocQuantizer
from ._base import Quantizer, pack_nibbles, unpack_nibbles
from ._binary import BinaryQuantizer
from ._float import FORMATS, FloatQuantizer
from ._int import IntQuantizer

__all__ = [
    "FORMATS",
    "AllocQuantizer",
    "BinaryQuantizer",
    "FloatQuantizer",
    "IntQuantizer",
    "Quantizer",
    "pack_nibbles",
    "unpack_nibbles",
]
