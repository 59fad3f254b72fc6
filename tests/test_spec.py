import pytest

from embcomp import SpecError, parse_spec
from embcomp.spec import STAGES

VALID = {
    "fp16": "fp16",
    "int8": "int8",
    "pca256,fp8": "pca256,fp8",
    "l2norm,pca192,fp8e5m2": "l2norm,pca192,fp8e5m2",
    "pca64,bin": "pca64,bin",
    "fp8e4m3": "fp8",
    " PCA32 , INT4 ": "pca32,int4",
    "pca128": "pca128,fp32",
    "pca,int4": "pca,int4",
    "rot,int4": "rot,int4",
    "l2norm": "l2norm,fp32",
}


@pytest.mark.parametrize("text,canonical", VALID.items())
def test_canonical_and_round_trip(text, canonical):
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec
    assert hash(spec) == hash(parse_spec(canonical))


@pytest.mark.parametrize(
    "text,token,position",
    [
        ("pca256,fp9", "fp9", 1),
        ("fp8,pca256", "pca256", 1),
        ("int8,fp8", "fp8", 1),
        ("pca0,int8", "pca0", 0),
        ("fp16x", "fp16x", 0),
        ("rot3,int8", "rot", 0),
        ("pca64,pca32,int8", "pca32", 1),
        ("pca\uff18,int8", "pca\uff18", 0),  # a fullwidth 8: digits are ASCII only
    ],
)
def test_bad_specs_name_token_and_position(text, token, position):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    message = str(info.value)
    assert token in message and f"position {position}" in message


def test_unknown_stage_lists_valid_names():
    with pytest.raises(SpecError, match="valid names: .*int8"):
        parse_spec("float8")


@pytest.mark.parametrize("text", ["", ",", "pca64,,int8", None, 5])
def test_empty_or_wrong_type(text):
    with pytest.raises(SpecError):
        parse_spec(text)


def test_spec_error_is_value_error():
    with pytest.raises(ValueError):
        parse_spec("nope")


@pytest.mark.parametrize(
    "text,d_in,size",
    [
        ("fp32", 384, 1536),
        ("fp16", 384, 768),
        ("fp8", 384, 384),
        ("int4", 383, 192),
        ("pca192,fp8", 384, 192),
        ("bin", 385, 49),
        ("pca,int8", 100, 100),
    ],
)
def test_code_size_from_spec(text, d_in, size):
    assert parse_spec(text).code_size(d_in) == size


def test_every_quantizer_has_bits_or_budget():
    for name, info in STAGES.items():
        if info.kind == "quantizer":
            assert info.bits is not None or info.arg == "required", name
