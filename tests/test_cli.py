import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embcomp import load_codec, make_codec, save_codec
from embcomp.artifacts import codec_id
from embcomp.cli import main
from embcomp.io import read_vectors, write_fvecs


@pytest.fixture()
def files(tmp_path, rng_data):
    train = tmp_path / "train.npy"
    np.save(train, rng_data)
    return tmp_path, train


def test_fit_encode_decode_inspect_eval(files, rng_data, capsys):
    tmp, train = files
    codec_path = tmp / "c.codec"
    assert (
        main(
            [
                "fit",
                "--spec",
                "pca16,int8",
                "--train",
                str(train),
                "-o",
                str(codec_path),
                "--sample",
                "500",
                "--option",
                "percentile=99.9",
            ]
        )
        == 0
    )
    codec = load_codec(codec_path)
    assert codec.options["percentile"] == 99.9
    assert main(["encode", "-c", str(codec_path), str(train), str(tmp / "codes.npy")]) == 0
    codes = np.load(tmp / "codes.npy")
    np.testing.assert_array_equal(codes, codec.encode(rng_data))
    assert (
        main(["decode", "-c", str(codec_path), str(tmp / "codes.npy"), str(tmp / "back.npy")]) == 0
    )
    np.testing.assert_array_equal(np.load(tmp / "back.npy"), codec.decode(codes))
    capsys.readouterr()
    assert main(["inspect", str(codec_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"] == "pca16,int8" and info["code_size"] == 16
    assert info["id"] == codec_id(codec)
    assert (
        main(
            [
                "eval",
                "-c",
                str(codec_path),
                "--base",
                str(train),
                "--queries",
                str(train),
                "--k",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bytes/vector       16" in out and "recall@5" in out


def test_eval_names_a_k_beyond_the_base_and_a_width_the_codec_does_not_take(tmp_path, capsys):
    """--k above the base rows failed with recall_at_k's internal shapes; a base of the
    wrong width was called "X"."""
    rng = np.random.default_rng(6)
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 16)).astype(np.float32))
    np.save(tmp_path / "w.npy", rng.standard_normal((50, 9)).astype(np.float32))
    codec = tmp_path / "c.codec"
    fit = ["fit", "--spec", "int8", "--train", str(tmp_path / "x.npy")]
    assert main([*fit, "-o", str(codec)]) == 0
    for base, queries, extra, message in (
        ("x", "x", ["--k", "51"], "--k 51 is more than the 50 base vectors"),
        ("w", "x", [], "base has 9 dims but the codec was fitted on 16-dim vectors"),
        ("x", "w", [], "queries has 9 dims but the codec was fitted on 16-dim vectors"),
    ):
        capsys.readouterr()
        argv = ["eval", "-c", str(codec), "--base", str(tmp_path / f"{base}.npy")]
        assert main([*argv, "--queries", str(tmp_path / f"{queries}.npy"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    argv = ["eval", "-c", str(codec), "--base", str(tmp_path / "x.npy")]
    assert main([*argv, "--queries", str(tmp_path / "x.npy"), "--k", "50"]) == 0


def test_eval_judges_a_normalizing_codec_by_cosine(tmp_path, capsys):
    """Vectors with norms 10-100: an l2norm codec keeps directions, so by inner product
    (which the norms dominate) its recall looks poor; eval uses cosine for it unless
    told, and says which metric it used."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 32)).astype(np.float32)
    X *= rng.uniform(10, 100, (600, 1)).astype(np.float32) / np.linalg.norm(X, axis=1)[:, None]
    np.save(tmp_path / "x.npy", X)
    codec = tmp_path / "c.codec"
    fit = ["fit", "--spec", "l2norm,fp16", "--train", str(tmp_path / "x.npy")]
    assert main([*fit, "-o", str(codec)]) == 0

    def recall(*extra: str) -> tuple[str, float]:
        capsys.readouterr()
        argv = ["eval", "-c", str(codec), "--base", str(tmp_path / "x.npy")]
        assert main([*argv, "--queries", str(tmp_path / "x.npy"), *extra]) == 0
        lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        return lines["metric"].strip(), float(lines["recall@10"])

    assert recall() == ("cos", 1.0)
    metric, by_ip = recall("--metric", "ip")
    assert metric == "ip" and by_ip < 0.5
    capsys.readouterr()
    argv = ["eval", "-c", str(codec), "--base", str(tmp_path / "x.npy")]
    assert main([*argv, "--queries", str(tmp_path / "x.npy"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "spec": "l2norm,fp16",
        "metric": "cos",
        "k": 10,
        "recall_at_k": 1.0,
        "bytes_per_vector": 64,
        "compression_ratio": 2.0,
        "base_rows": 600,
        "query_rows": 600,
    }


def test_fvecs_input(files, rng_data, tmp_path):
    path = tmp_path / "x.fvecs"
    write_fvecs(path, rng_data)
    np.testing.assert_array_equal(read_vectors(path), rng_data)
    assert main(["fit", "--spec", "int4", "--train", str(path), "-o", str(tmp_path / "c")]) == 0


def test_fvecs_writer_refuses_what_it_could_not_read_back(tmp_path):
    from embcomp import InputError
    from embcomp.io import read_fvecs

    path = tmp_path / "x.fvecs"
    bad = {
        "is empty": np.zeros((0, 4), np.float32),  # the dim lives in each vector's record
        "2-D": np.ones(4, np.float32),
        "row 1 holds 1e\\+300, beyond float32": np.array([[1.0, 2.0], [1e300, 0.0]]),
    }
    for message, X in bad.items():
        with pytest.raises(InputError, match=message):
            write_fvecs(path, X)
        assert not path.exists()
    with pytest.raises(InputError, match="No such file"):
        read_fvecs(tmp_path / "missing.fvecs")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fit", "--spec", "pca16,fp9", "--train", "{train}", "-o", "{tmp}/c"], "fp9"),
        (
            ["fit", "--spec", "int8", "--train", "{tmp}/missing.npy", "-o", "{tmp}/c"],
            "does not exist",
        ),
        (["fit", "--spec", "int8", "--train", "{train}", "-o", "{tmp}/nodir/c"], "does not exist"),
        (
            ["fit", "--spec", "int8", "--train", "{train}", "-o", "{tmp}/c", "--option", "x"],
            "key=value",
        ),
        (["inspect", "{train}"], "not an embcomp codec"),
    ],
)
def test_errors_are_one_line_exit_2(files, argv, message, capsys):
    tmp, train = files
    argv = [a.format(tmp=tmp, train=train) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp / "c").exists()


def test_nan_input_leaves_no_output(files, rng_data, tmp_path, capsys):
    tmp, train = files
    assert main(["fit", "--spec", "int8", "--train", str(train), "-o", str(tmp / "c")]) == 0
    bad = rng_data.copy()
    bad[42, 1] = np.nan
    np.save(tmp / "bad.npy", bad)
    assert main(["encode", "-c", str(tmp / "c"), str(tmp / "bad.npy"), str(tmp / "o.npy")]) == 2
    assert "row 42" in capsys.readouterr().err
    assert not (tmp / "o.npy").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["bad.npy", "c", "train.npy"]


def test_truncated_npy_is_a_clear_error(files, tmp_path, capsys):
    tmp, train = files
    data = train.read_bytes()
    (tmp / "cut.npy").write_bytes(data[: len(data) // 2])
    assert (
        main(["fit", "--spec", "int8", "--train", str(tmp / "cut.npy"), "-o", str(tmp / "c")]) == 2
    )
    assert "truncated" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo", "--spec", "int8", "--spec", "pca96,fp8"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "pca96,fp8" in out


# -- bad input and the environment: one line, status 2, nothing destroyed -----------------
def test_outputs_never_replace_their_inputs(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    codec = str(tmp_path / "c.codec")
    assert main(["fit", "--spec", "int8", "--train", str(tmp_path / "v.npy"), "-o", codec]) == 0
    for argv in (
        ["encode", "-c", codec, str(tmp_path / "v.npy"), str(tmp_path / "v.npy")],
        [
            "fit",
            "--spec",
            "int8",
            "--train",
            str(tmp_path / "v.npy"),
            "-o",
            str(tmp_path / "v.npy"),
        ],
    ):
        assert main(argv) == 2
        assert "is the input" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), X)


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    codec = str(tmp_path / "c.codec")
    assert (
        main(["fit", "--spec", "pca8,int8", "--train", str(tmp_path / "v.npy"), "-o", codec]) == 0
    )
    capsys.readouterr()
    np.save(tmp_path / "zero.npy", np.zeros((10, 0), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "a_dir").mkdir()
    nan_queries = X[:5].copy()
    nan_queries[2, 3] = np.nan
    np.save(tmp_path / "q.npy", nan_queries)
    fit = ["fit", "--spec", "pca8,int8", "--train", str(tmp_path / "v.npy")]
    cases = {
        "0 values": ["fit", "--spec", "int8", "--train", str(tmp_path / "zero.npy"), "-o", codec],
        "whiten='False'": [*fit, "-o", codec, "--option", "whiten=False"],
        "percentile='abc'": [*fit, "-o", codec, "--option", "percentile=abc"],
        "a_dir' is a directory; give a file path inside it": [*fit, "-o", str(tmp_path / "a_dir")],
        "not a readable .npy file of codes": [
            "decode",
            "-c",
            codec,
            str(tmp_path / "empty.npy"),
            str(tmp_path / "o.npy"),
        ],
        ".fvecs holds float vectors": [
            "encode",
            "-c",
            codec,
            str(tmp_path / "v.npy"),
            str(tmp_path / "c.fvecs"),
        ],
        "queries row 2 contains NaN": [
            "eval",
            "-c",
            codec,
            "--base",
            str(tmp_path / "v.npy"),
            "--queries",
            str(tmp_path / "q.npy"),
        ],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.fvecs").exists() and not (tmp_path / "o.npy").exists()


def test_a_command_missing_its_extra_names_it_in_one_line(monkeypatch, capsys):
    """A core-only install lacks grpc, faiss, yaml...: a command that needs one says
    which extra installs it (it was a traceback)."""
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now fails
    assert main(["health"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "embcomp health: error: this command needs grpc, which is not installed: "
        "pip install 'embcomp[service]'"
    )
    # a benchmark command names the extra that brings all it needs (tqdm alone is in
    # 'batch' too, but recommend also needs faiss)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert main(["sweep", "--data", "sample-wordnet-minilm-384", "--out", "/nonexistent/x"]) == 2
    assert "pip install 'embcomp[bench]'" in capsys.readouterr().err


def test_claims_without_faiss_fails_before_writing_anything(monkeypatch, capsys, tmp_path):
    """It used to compute and cache the ground truth first, then fail."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    out = tmp_path / "claims"
    assert main(["claims", "--data", "sample-wordnet-minilm-384", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs faiss" in err and "pip install 'embcomp[bench]'" in err
    assert not out.exists()


def test_output_to_a_closed_pipe_exits_quietly(tmp_path):
    """`embcomp inspect x.codec | head -1`: the reader leaves; no 'Broken pipe' error."""
    codec_file = tmp_path / "c.codec"
    save_codec(make_codec("int8").fit(np.eye(8, dtype=np.float32)), codec_file)
    process = subprocess.Popen(
        [sys.executable, "-m", "embcomp", "inspect", str(codec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before anything is written
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 141
    assert stderr == b""


def test_inspect_shows_the_options_a_codec_loads_with(capsys):
    """An artifact saved before centring existed lacks the option; it loads uncentred."""
    golden = Path(__file__).parent / "data" / "golden_v1_fp8e5m2.codec"
    assert main(["inspect", str(golden)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["options"] == {"center": False, "scale": "dim", "seed": 7}
