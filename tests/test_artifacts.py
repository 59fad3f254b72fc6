"""Artifact format: golden files load forever; every kind of damage is an ArtifactError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from matching import assert_codes_match, assert_vectors_match

import embcomp
from embcomp import (
    ArtifactError,
    codec_from_bytes,
    codec_to_bytes,
    load_codec,
    make_codec,
    read_manifest,
)
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
        # BLAS on another CPU may round the products' last bits differently (matching.py)
        assert_vectors_match(codec, decoded, np.load(stem + ".decoded.npy"))
        assert_codes_match(codec, codec.encode(probe), codes)


def test_float_artifacts_from_before_centring_load_uncentred_and_decode_bit_exactly():
    """``fp8e5m2`` was saved before the float formats were centred: its manifest has no
    ``center`` option and its state no ``offset_``. It loads with center=False and
    decodes to the very bits it did (-0.0 included); ``fp4`` was saved centred."""
    old, new = (
        load_codec(DATA / "golden_v1_fp8e5m2.codec"),
        load_codec(DATA / "golden_v1_fp4.codec"),
    )
    assert "center" not in read_manifest(DATA / "golden_v1_fp8e5m2.codec")["options"]
    assert old.options["center"] is False and not old.quantizer.offset_.any()
    assert new.options["center"] is True and new.quantizer.offset_.any()
    for name in ("fp8e5m2", "fp4"):
        codes = np.load(DATA / f"golden_v1_{name}.codes.npy")
        want = np.load(DATA / f"golden_v1_{name}.decoded.npy")
        codec = old if name == "fp8e5m2" else new
        np.testing.assert_array_equal(codec.decode(codes).view(np.uint32), want.view(np.uint32))
    # re-saved, the old codec keeps its meaning (center=False is now written down)
    again = codec_from_bytes(codec_to_bytes(old))
    assert again.options["center"] is False
    np.testing.assert_array_equal(again.quantizer.offset_, old.quantizer.offset_)


def test_an_offset_on_a_codec_that_is_not_centred_is_refused():
    for options in ({"center": False}, {"scale": "none"}):
        codec = make_codec("fp8", **options).fit(np.eye(4, dtype=np.float32) + 3)
        arrays = codec.quantizer.state_arrays()
        arrays["offset_"] = np.full(4, 3.0, dtype=np.float32)
        with pytest.raises(ArtifactError, match="'offset_' is not zero"):
            make_codec("fp8", **options).quantizer.set_state(arrays)


def test_an_old_artifact_claiming_a_huge_width_is_refused_not_allocated():
    codec = make_codec("fp8", center=False).fit(np.eye(4, dtype=np.float32))
    arrays = codec.quantizer.state_arrays()
    del arrays["offset_"]
    arrays["d_"] = np.asarray(10**12, dtype=np.int64)
    with pytest.raises(ArtifactError, match="scale_"):
        make_codec("fp8", center=False).quantizer.set_state(arrays)


def test_a_centred_artifact_without_its_offset_is_refused():
    codec = make_codec("fp8").fit(np.random.default_rng(0).standard_normal((50, 4)) + 3)
    arrays = codec.quantizer.state_arrays()
    del arrays["offset_"]
    with pytest.raises(ArtifactError, match="missing \\['offset_'\\]"):
        make_codec("fp8").quantizer.set_state(arrays)


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


def _array_names(blob: bytes) -> set[str]:
    _, _, length, _ = struct.unpack_from("<8sII32s", blob)
    return {entry["name"] for entry in json.loads(blob[48 : 48 + length])["arrays"]}


@pytest.mark.parametrize("spec", ["rot,int8", "pca,int8", "pca8,fp8", "l2norm,pca16,bin"])
def test_an_inverse_equal_to_the_forward_matrix_is_stored_once(rng_data, spec):
    """rot and pca without whitening map back with their forward matrix; format 1 wrote
    it twice, so a rot,int8 codec for 3072 dims (75 MB) was over the service's 64 MiB."""
    codec = make_codec(spec, seed=3).fit(rng_data)
    blob = codec_to_bytes(codec)
    assert "reducer/components_" in _array_names(blob)
    assert "reducer/inverse_components_" not in _array_names(blob)
    matrix = codec.reducer.components_.nbytes
    assert len(blob) < 1.5 * matrix + 8192
    loaded = codec_from_bytes(blob)
    assert loaded.reducer.inverse_components_ is loaded.reducer.components_  # held once
    probe = rng_data[:40]
    codes = codec.encode(probe)
    np.testing.assert_array_equal(loaded.encode(probe), codes)
    bits = codec.decode(codes).view(np.uint32)
    np.testing.assert_array_equal(loaded.decode(codes).view(np.uint32), bits)
    np.testing.assert_array_equal(
        loaded.project_queries(probe).view(np.uint32), codec.project_queries(probe).view(np.uint32)
    )
    assert codec_to_bytes(loaded) == blob


def test_a_whitened_or_mpad_inverse_is_still_stored(rng_data):
    for spec, options in (("pca8,int8", {"whiten": True}), ("mpad8,int8", {})):
        blob = codec_to_bytes(make_codec(spec, **options).fit(rng_data))
        assert "reducer/inverse_components_" in _array_names(blob)


def test_format_1_needs_every_array_and_resaves_to_the_same_codes():
    """Only format 2 may leave the inverse out: a format-1 header on such a file is a
    damaged file. A format-1 rot codec re-saved in format 2 computes the same bits."""
    path = DATA / "golden_v1_rot-int8.codec"
    old = load_codec(path)
    assert "reducer/inverse_components_" in _array_names(path.read_bytes())
    assert old.reducer.inverse_components_ is old.reducer.components_  # equal: held once
    blob = codec_to_bytes(old)
    assert "reducer/inverse_components_" not in _array_names(blob)
    again = codec_from_bytes(blob)
    probe = np.load(DATA / "golden_v1_input.npy")
    codes = np.load(DATA / "golden_v1_rot-int8.codes.npy")
    np.testing.assert_array_equal(again.encode(probe), old.encode(probe))
    np.testing.assert_array_equal(
        again.decode(codes).view(np.uint32), old.decode(codes).view(np.uint32)
    )
    labelled_v1 = bytearray(blob)
    struct.pack_into("<I", labelled_v1, 8, 1)
    with pytest.raises(ArtifactError, match="missing \\['inverse_components_'\\]"):
        codec_from_bytes(bytes(labelled_v1))


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


def rewrite_manifest(blob: bytes, edit) -> bytes:
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
            codec_from_bytes(rewrite_manifest(blob, edit))


def _drop(key):
    def edit(manifest):
        del manifest[key]

    return edit


def _put(set_in, key, value):
    def edit(manifest):
        set_in(manifest)[key] = value

    return edit


def _top(manifest):
    return manifest


def _first_array(manifest):
    return manifest["arrays"][0]


@pytest.mark.parametrize(
    "edit,message",
    [
        *[
            (_drop(key), f"manifest has no '{key}' field")
            for key in ("spec", "d_in", "d_out", "code_size", "options", "arrays")
        ],
        (_drop("data_sha256"), "manifest has no 'data_sha256' field"),
        (_put(_top, "code_size", "8"), "'code_size' must be an integer; got \"8\""),
        (_put(_top, "d_out", True), "'d_out' must be an integer; got true"),
        (_put(_top, "options", []), "'options' must be an object; got \\[\\]"),
        (_put(_top, "arrays", 5), "'arrays' must be a list; got 5"),
        (_put(_top, "spec", 5), "'spec' must be a string"),
        (_put(_top, "arrays", [7]), "arrays\\[0\\] must be an object; got int"),
        (_put(_first_array, "name", 3), "arrays\\[0\\] field 'name' must be a string"),
        (_put(_first_array, "offset", -64), "non-negative integer offset"),
        (_put(_first_array, "shape", [8, -48]), "non-negative integer offset, nbytes and shape"),
        (_put(_first_array, "shape", [8.0, 48]), "non-negative integer offset, nbytes and shape"),
        (_put(_top, "code_size", 9), "manifest says code_size 9 but the arrays give 8"),
        (_put(_top, "d_out", 7), "manifest says d_out 7 but the arrays give 8"),
    ],
)
def test_a_manifest_missing_or_mistyping_a_field_is_an_artifact_error(blob, edit, message):
    """A crafted upload may leave out or retype any field: it must be an ArtifactError
    naming the field (the service answers INVALID_ARGUMENT), never a KeyError,
    TypeError or AttributeError (which the service reports as INTERNAL)."""
    with pytest.raises(ArtifactError, match=message) as info:
        codec_from_bytes(rewrite_manifest(blob, edit), source="forged.codec")
    assert str(info.value).startswith("forged.codec: ")


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


def test_saving_removes_a_killed_save_s_temporary_file(tmp_path, rng_data):
    import os
    import time

    stale = tmp_path / ".c.codec.abcdefgh.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"partial")
    old = time.time() - 120
    os.utime(stale, (old, old))
    embcomp.save_codec(make_codec("int8").fit(rng_data), tmp_path / "c.codec")
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


def _tamper(attribute_path, change):
    def apply(codec):
        owner_name, _, name = attribute_path.rpartition(".")
        owner = getattr(codec, owner_name) if owner_name else codec
        value = getattr(owner, name)
        setattr(owner, name, change(value.copy() if isinstance(value, np.ndarray) else value))

    return apply


def _first_rows_of_pca(k):
    def apply(codec):
        for name in ("components_", "inverse_components_", "explained_variance_"):
            setattr(codec.reducer, name, getattr(codec.reducer, name)[:k].copy())

    return apply


def _set(index, value):
    def change(array):
        array[index] = value
        return array

    return change


@pytest.mark.parametrize(
    "spec,tamper,message",
    [
        # arrays shorter than the widths the kernels loop over: they read out of bounds
        ("int8", _tamper("quantizer.d_", lambda _: 4_000_000), "expected float32 \\(4000000,\\)"),
        ("int8", _tamper("d_in", lambda _: 50), "quantizer's arrays are for 48-dim vectors"),
        ("int8", _tamper("quantizer.min_", lambda a: a[:3]), "'min_' is float32 \\(3,\\)"),
        ("int4", _tamper("quantizer.step_", _set(0, -1.0)), "'step_' holds a step below 1.2e-38"),
        ("fp8", _tamper("quantizer.scale_", _set(0, np.nan)), "'scale_' holds NaN or inf"),
        ("fp8", _tamper("quantizer.scale_", lambda a: a.astype(np.float64)), "'scale_' is float64"),
        ("bin", _tamper("quantizer.low_", lambda a: a[:5]), "'low_' is float32 \\(5,\\)"),
        ("alloc8", _tamper("quantizer.order_", _set(0, 999)), "'order_' is not a permutation"),
        ("pca,alloc8", _tamper("quantizer.units_", _set((0, 2), 12)), "bits outside 1..8"),
        ("pca,alloc8", _tamper("quantizer.units_", _set((-1, 0), 48)), "outside the 48 comp"),
        ("pca,alloc8", _tamper("quantizer.codebooks_", lambda a: a[:-1]), "'codebooks_' is"),
        # values no fit produces, whose float32 squares overflow into NaN scores (segfault)
        ("pca,alloc8", _tamper("quantizer.codebooks_", _set(0, 3e38)), "beyond 2\\*\\*56"),
        ("pca8,int8", _tamper("reducer.components_", lambda a: a[:4]), "inverse_components_"),
        ("pca8,int8", _tamper("reducer.inverse_components_", lambda a: a.T.copy()), "\\(8, 48\\)"),
        ("pca,int8", _first_rows_of_pca(40), "full PCA keeps all 48"),
        ("rot,int8", _tamper("reducer.mean_", lambda a: a[:4]), "'mean_' is float32 \\(4,\\)"),
        # manifest widths that disagree with the arrays
        ("pca12,fp8", _tamper("d_in", lambda _: 99), "d_in is 99 but the reducer's arrays"),
        ("pca12,fp8", _tamper("d_in", lambda _: -3), "d_in must be a positive integer"),
        ("int8", _tamper("d_in", lambda _: 0), "d_in must be a positive integer"),
    ],
)
def test_inconsistent_state_is_an_artifact_error_not_a_crash(rng_data, spec, tamper, message):
    """Checksums prove the bytes are what was written, not that a writer was honest: an
    artifact whose arrays do not fit its widths must fail to load (a service imports
    artifacts from clients, and the kernels index without bounds checks)."""
    codec = make_codec(spec).fit(rng_data)
    tamper(codec)
    with pytest.raises(ArtifactError, match=message) as info:
        codec_from_bytes(codec_to_bytes(codec), source="tampered.codec")
    assert str(info.value).startswith("tampered.codec: ")
