"""Mixed-width bit packing: round trips for every width mix, and the exact bit layout."""

from __future__ import annotations

import numpy as np
import pytest

from embcomp import InputError
from embcomp.quantizers._bitpack import BitLayout


def _reference_pack(codes: np.ndarray, widths: list[int]) -> np.ndarray:
    """The documented layout, one bit at a time: LSB first, fields back to back."""
    rows = []
    for row in codes:
        bits = [(int(c) >> i) & 1 for c, w in zip(row, widths, strict=True) for i in range(w)]
        bits += [0] * (-len(bits) % 8)
        rows.append(np.packbits(np.array(bits, dtype=np.uint8), bitorder="little"))
    return np.array(rows, dtype=np.uint8).reshape(codes.shape[0], -1)


def _random_codes(rng: np.random.Generator, n: int, widths: list[int]) -> np.ndarray:
    top = (1 << np.asarray(widths, dtype=np.int64)) - 1
    return (rng.integers(0, 1 << 16, (n, len(widths))) & top).astype(np.uint16)


@pytest.mark.parametrize("width", range(0, 17))
def test_uniform_width_round_trip(width):
    rng = np.random.default_rng(width)
    for count in (1, 2, 3, 7, 8, 9, 16, 33):
        widths = [width] * count
        layout = BitLayout(widths)
        codes = _random_codes(rng, 5, widths)
        packed = layout.pack(codes)
        assert packed.shape == (5, (width * count + 7) // 8) and packed.dtype == np.uint8
        np.testing.assert_array_equal(packed, _reference_pack(codes, widths))
        np.testing.assert_array_equal(layout.unpack(packed), codes)


def test_every_pair_of_widths_round_trips():
    rng = np.random.default_rng(0)
    for first in range(0, 17):
        for second in range(0, 17):
            widths = [first, second, first, 8, 4, 4, second]
            codes = _random_codes(rng, 3, widths)
            layout = BitLayout(widths)
            packed = layout.pack(codes)
            np.testing.assert_array_equal(packed, _reference_pack(codes, widths))
            np.testing.assert_array_equal(layout.unpack(packed), codes)


def test_random_width_mixes_match_the_reference_layout():
    rng = np.random.default_rng(1)
    pool = [0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 8, 12, 16]
    for _ in range(200):
        widths = [int(w) for w in rng.choice(pool, int(rng.integers(1, 60)))]
        codes = _random_codes(rng, 4, widths)
        layout = BitLayout(widths)
        packed = layout.pack(codes)
        np.testing.assert_array_equal(packed, _reference_pack(codes, widths))
        np.testing.assert_array_equal(layout.unpack(packed), codes)


def test_sizes_and_fast_runs():
    layout = BitLayout([8, 8, 4, 4, 3, 5, 8, 2, 6])
    assert layout.n_bits == 48 and layout.n_bytes == 6 and layout.n_fields == 9
    kinds = [run.kind for run in layout._runs]
    assert kinds == ["byte", "nibble", "bits", "byte", "bits"]
    assert BitLayout([]).n_bytes == 0
    empty = BitLayout([0, 0])
    np.testing.assert_array_equal(empty.unpack(empty.pack(np.zeros((3, 2), np.uint16))), 0)


def test_values_are_masked_to_their_width():
    layout = BitLayout([3, 5])
    packed = layout.pack(np.array([[0xFF, 0xFF]], dtype=np.uint16))
    np.testing.assert_array_equal(packed, [[0xFF]])
    np.testing.assert_array_equal(layout.unpack(packed), [[7, 31]])


def test_bad_layouts_and_shapes():
    with pytest.raises(InputError, match="widths"):
        BitLayout([3, 17])
    with pytest.raises(InputError, match="widths"):
        BitLayout([-1])
    layout = BitLayout([4, 4, 3])
    with pytest.raises(InputError, match=r"\(n, 3\)"):
        layout.pack(np.zeros((2, 2), np.uint16))
    with pytest.raises(InputError, match="uint8"):
        layout.unpack(np.zeros((2, 2), np.uint16))
    with pytest.raises(InputError, match=r"\(n, 2\)"):
        layout.unpack(np.zeros((2, 3), np.uint8))
