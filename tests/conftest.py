"""Shared fixtures: seeded synthetic data and the real wordnet-minilm embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wordnet-minilm"


@pytest.fixture(scope="session")
def rng_data() -> np.ndarray:
    """(600, 48) float32 anisotropic Gaussian data, seeded."""
    rng = np.random.default_rng(1234)
    scales = np.linspace(2.0, 0.05, 48)
    return (rng.standard_normal((600, 48)) * scales + 0.3).astype(np.float32)


@pytest.fixture(scope="session")
def wordnet() -> dict[str, np.ndarray]:
    """The real 50,000 x 384 wordnet-minilm embeddings; skipped where ../shared is absent."""
    if not (SHARED_DATA / "base.npy").exists():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return {
        "base": np.load(SHARED_DATA / "base.npy"),
        "queries": np.load(SHARED_DATA / "queries.npy"),
        "gt": np.load(SHARED_DATA / "gt_ip_100.npy"),
    }
