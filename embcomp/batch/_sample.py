"""Seeded uniform samples of inputs of any size, for fitting codecs.

The row count of every input is known from metadata (``.npy``/HDF5 headers, file
sizes, Parquet footers), so the sample is drawn as row numbers first, exactly
uniform without replacement, and only those rows are read: through a memory map for
``.npy``/``.fvecs`` (touching just their pages), by row group for Parquet and by
block for HDF5. Memory is the sample plus one block, never the corpus.
"""

from __future__ import annotations

import os

import numpy as np

from .._readers import iter_blocks, open_sources
from ..exceptions import DimensionMismatchError, InputError

__all__ = ["sample_vectors"]


def sample_vectors(
    path: str | os.PathLike[str],
    n: int | None,
    *,
    seed: int = 0,
    column: str | None = None,
    dataset: str = "train",
) -> tuple[np.ndarray, int]:
    """Draw ``n`` rows uniformly at random (seeded) from a file or directory.

    Parameters
    ----------
    path : any input :func:`embcomp.batch.compress` reads.
    n : sample size; ``None`` or ``n >= total`` returns every row (loads the input).
    seed : the same seed and input give the same rows. For a single ``.npy`` the rows
        are those ``np.random.default_rng(seed).choice(total, n, replace=False)``
        picks, as ``embcomp fit --sample`` always chose.
    column, dataset : Parquet embedding column, HDF5 dataset.

    Returns
    -------
    X : float32 ndarray, shape (min(n, total), d), rows in input order.
    total : rows in the whole input.

    Raises
    ------
    InputError
        ``n < 1``; a sampled row is null, non-finite or of the wrong length (the
        message names its file and row).
    """
    sources = open_sources(path, kind="vectors", column=column, dataset=dataset)
    widths = {source.width for source in sources if source.width is not None}
    if len(widths) > 1:  # known from headers: fail whichever rows a sample would pick
        described = ", ".join(f"{s.path.name}: {s.width}" for s in sources)
        raise DimensionMismatchError(
            f"{path}: files hold vectors of different widths ({described})"
        )
    total = sum(source.n_rows for source in sources)
    if total == 0:
        raise InputError(f"{path} holds no vectors")
    if n is not None and n < 1:
        raise InputError(f"--sample must be >= 1; got {n}")
    if n is None or n >= total:
        blocks = iter_blocks(sources, check_finite=True, on_bad_row="refuse")
        parts = [block.data for block in blocks]
    else:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        parts = []
        for source in sources:
            local = picks[(picks >= source.offset) & (picks < source.offset + source.n_rows)]
            if local.size:
                parts.append(source.read_rows(local - source.offset))
    widths = {part.shape[1] for part in parts}
    if len(widths) > 1:  # widths only the rows tell (list<float> Parquet columns)
        described = ", ".join(f"{s.path.name}: {s.width}" for s in sources)
        raise DimensionMismatchError(
            f"{path}: files hold vectors of different widths ({described})"
        )
    return np.concatenate(parts), total
