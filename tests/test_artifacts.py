"""Artifact format: golden files load forever; every kind of damage is an ArtifactError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import embcomp
from embcomp import ArtifactError, codec_from_bytes, codec_to_bytes, load_codec, make_codec
from embcomp.artifacts import FORMAT_VERSION, MAGIC

DATA = Path(__file__).parent / "data"
GOLDEN = sorted(DATA.glob("golden_v*.codec"))


def test_golden_files_exist_for_every_version():
    versions = {int(p.name.split("_")[1][1:]) for p in GOLDEN}
    assert versions == set(range(1, FORMAT_VERSION + 1))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_artifact_decodes_to_stored_output(path):
    version = path.name.split("_")[1]
    probe = np.load(DATA / f"golden_{version}_input.npy")
    stem = str(path)[: -len(".codec")]
    codes = np.load(stem + ".codes.npy")
    codec = load_codec(path)
    decoded = codec.decode(codes)
    if codec.reducer is None:
        np.testing.assert_array_equal(decoded, np.load(stem + ".decoded.npy"))
        np.testing.assert_array_equal(codec.encode(probe), codes)
    else:
        # BLAS may round a matmul's last bit differently with memory alignment: allow an
        # ulp-level difference in decoded values and a rare one-level code difference.
        np.testing.assert_allclose(decoded, np.load(stem + ".decoded.npy"), rtol=1e-5, atol=1e-6)
        diff = np.abs(codec.encode(probe).astype(int) - codes)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


@pytest.fixture(scope="module")
def blob(rng_data):
    return codec_to_bytes(make_codec("pca8,int8").fit(rng_data))


def test_bytes_are_deterministic(blob, rng_data):
    assert codec_to_bytes(make_codec("pca8,int8").fit(rng_data)) == blob
    assert codec_to_bytes(codec_from_bytes(blob)) == blob


def test_manifest_contents(blob, tmp_path):
    path = tmp_path / "x.codec"
    path.write_bytes(blob)
    manifest = embcomp.read_manifest(path)
    assert manifest["spec"] == "pca8,int8"
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["d_in"] == 48 and manifest["d_out"] == 8 and manifest["code_size"] == 8
    assert manifest["options"] == {"seed": 0, "whiten": False, "percentile": None}
    assert {"embcomp", "numpy", "ml_dtypes", "python"} <= set(manifest["versions"])
    assert all(len(a["sha256"]) == 64 for a in manifest["arrays"])


def test_truncated(blob):
    for cut in (3, 40, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ArtifactError, match="truncated|checksum"):
            codec_from_bytes(blob[:cut])


def test_flipped_bit_anywhere_is_detected(blob):
    for position in (20, 60, len(blob) - 100, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        with pytest.raises(ArtifactError):
            codec_from_bytes(bytes(damaged))


def test_foreign_files(tmp_path):
    with pytest.raises(ArtifactError, match="not an embcomp codec"):
        codec_from_bytes(b"PK\x03\x04" + b"\0" * 100)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ArtifactError, match="not an embcomp codec"):
        load_codec(npy)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_codec(tmp_path / "missing.codec")
    with pytest.raises(ArtifactError, match="expected bytes"):
        codec_from_bytes("text")  # type: ignore[arg-type]


def _rewrite_manifest(blob: bytes, edit) -> bytes:
    import hashlib

    _, version, length, _ = struct.unpack_from("<8sII32s", blob)
    manifest = json.loads(blob[48 : 48 + length])
    edit(manifest)
    new = json.dumps(manifest, sort_keys=True).encode()
    header = struct.pack("<8sII32s", MAGIC, version, len(new), hashlib.sha256(new).digest())
    return header + new + blob[48 + length :]


def test_newer_format_is_refused(blob):
    newer = bytearray(blob)
    struct.pack_into("<I", newer, 8, FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer.*upgrade"):
        codec_from_bytes(bytes(newer))


def test_consistent_but_wrong_manifest_is_refused(blob):
    def bad_spec(m):
        m["spec"] = "pca8,fp9"

    def bad_dtype(m):
        m["arrays"][0]["dtype"] = "|O"

    def bad_option(m):
        m["options"]["pickle"] = True

    def bad_size(m):
        m["code_size"] = 9

    for edit in (bad_spec, bad_dtype, bad_option, bad_size):
        with pytest.raises(ArtifactError):
            codec_from_bytes(_rewrite_manifest(blob, edit))


def test_save_is_atomic(tmp_path, rng_data, monkeypatch):
    codec = make_codec("int8").fit(rng_data)
    target = tmp_path / "c.codec"
    embcomp.save_codec(codec, target)
    before = target.read_bytes()
    import embcomp.artifacts as artifacts

    def explode(_codec):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifacts, "codec_to_bytes", explode)
    with pytest.raises(RuntimeError):
        artifacts.save_codec(codec, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.codec"]


def test_no_pickle_anywhere():
    root = Path(embcomp.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, source


def test_saved_files_get_normal_permissions(tmp_path, rng_data):
    import os
    import stat

    path = embcomp.save_codec(make_codec("int8").fit(rng_data), tmp_path / "p.codec")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
