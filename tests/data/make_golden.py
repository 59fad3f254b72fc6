"""Writes the golden artifacts of the current format version that do not exist yet.

Existing files are never rewritten: they pin backward compatibility (``fp8e5m2`` was
saved before the float formats were centred, ``fp4`` after)."""

from pathlib import Path

import numpy as np

import embcomp
from embcomp.artifacts import FORMAT_VERSION

HERE = Path(__file__).parent
GOLDEN_SPECS = ("l2norm,pca16,fp8", "int4", "pca,bin", "fp8e5m2", "rot,int8", "pca,alloc12", "fp4")


def main() -> None:
    rng = np.random.default_rng(20261127)
    train = (rng.standard_normal((300, 32)) * np.linspace(1.5, 0.1, 32)).astype(np.float32)
    probe = train[:24]
    inputs = HERE / f"golden_v{FORMAT_VERSION}_input.npy"
    if inputs.exists():
        np.testing.assert_array_equal(np.load(inputs), probe)
    else:
        np.save(inputs, probe)
    for spec in GOLDEN_SPECS:
        codec = embcomp.make_codec(spec, seed=7).fit(train)
        stem = HERE / f"golden_v{FORMAT_VERSION}_{codec.spec.slug}"
        if stem.with_suffix(".codec").exists():
            continue
        embcomp.save_codec(codec, stem.with_suffix(".codec"))
        codes = codec.encode(probe)
        np.save(f"{stem}.codes.npy", codes)
        np.save(f"{stem}.decoded.npy", codec.decode(codes))


if __name__ == "__main__":
    main()
