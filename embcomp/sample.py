"""The small real-embedding sample bundled with the package (see ``data/README.md``)."""

from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["load_sample"]


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(base, queries)``: float32 (3000, 384) and (200, 384), unit-norm
    all-MiniLM-L6-v2 embeddings of WordNet glosses and lemmas."""
    folder = resources.files("embcomp") / "data"
    with resources.as_file(folder / "wordnet_minilm_sample_base.npy") as path:
        base = np.load(path, allow_pickle=False).astype(np.float32)
    with resources.as_file(folder / "wordnet_minilm_sample_queries.npy") as path:
        queries = np.load(path, allow_pickle=False).astype(np.float32)
    return base, queries
