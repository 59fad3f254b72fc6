"""`python -m bench speed` end to end on a tiny shape (timings are not asserted)."""

from __future__ import annotations

import json

import embcomp._jit as jit

QUANTIZERS = ["fp32", "fp16", "bf16", "fp8", "fp8e5m2", "fp4", "int8", "int4", "bin"]


def test_speed_benchmark_writes_a_complete_record(tmp_path, capsys):
    """`python -m bench speed` end to end on a tiny shape (timings are not asserted)."""

    from bench.speed import main

    out = tmp_path / "speed.json"
    argv = ["--shapes", "3000x16", "--repeats", "2", "--run-mb", "1"]
    assert main([*argv, "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    (shape,) = record["shapes"]
    assert (shape["n"], shape["d"]) == (3000, 16)
    rows = {row["spec"]: row for row in shape["rows"]}
    assert set(QUANTIZERS) | {"pca8,int8", "pca8,fp8"} <= set(rows)
    assert rows["int8"]["faiss"]["factory"] == "SQ8"
    assert rows["pca8,int8"]["faiss"]["factory"] == "PCA8,SQ8"
    assert rows["fp8"]["naive"]["cast"] == "float8_e4m3fn"
    assert len(rows["int4"]["encode"]["wall_s"]) == 2
    assert all(row["encode"]["mb_per_s"] > 0 for row in rows.values())
    assert {t["target"] for t in shape["targets"]} >= {
        "int8 encode >= 1.0x FAISS SQ8",
        "fp8 encode >= FAISS SQ8 encode",
        "pca8,fp8 encode >= 1.5x FAISS PCA8,SQ8",
        "int8 encode into a buffer >= 1.0x FAISS SQ8",
        "int8 decode into a buffer >= 1.0x FAISS SQ8",
    }
    assert all(t["rounds"]["of"] == 2 for t in shape["targets"])  # each round's own ratio
    assert " met |" in out.with_suffix(".md").read_text()
    # 3,000 x 16 float32 is 0.192 MB: each run makes 6 calls of every method, FAISS too
    assert record["run_mb"] == 1
    for op in ("encode", "decode", "encode_into", "decode_into"):
        assert rows["int8"][op]["calls_per_run"] == rows["int8"]["faiss"][op]["calls_per_run"] == 6
    assert "(6 calls per run here" in out.with_suffix(".md").read_text()
    for op in ("encode_into", "decode_into"):
        assert rows["int8"][f"{op}_ratio"] > 0 and op in rows["int8"]["faiss"]
    assert "| int8 |" in out.with_suffix(".md").read_text()
    # the floor under fresh-output decode: page faults alone, timed in the same rounds
    assert len(shape["fresh_output_floor"]["wall_s"]) == 2
    share = shape["fresh_output_floor_share_of_faiss_sq8_decode"]
    assert share > 0
    # at this tiny size the floor can take longer than FAISS's whole decode (timing
    # noise, or memory the allocator had faulted in already): the report then says so
    floor_words = "faulting in its pages" if share <= 1 else "without page faults"
    assert floor_words in out.with_suffix(".md").read_text()
    assert "FAISS SQ8 encode" in capsys.readouterr().out
    # each side's BLAS and the kernels it runs (the PCA rows are one matrix product each)
    owners = {lib["owner"]: lib for lib in record["environment"]["blas"]}
    assert {"numpy", "faiss"} <= set(owners) and owners["faiss"]["architecture"]
    assert "BLAS: " in out.with_suffix(".md").read_text()
    # which CPU: model name plus what tells apart machines of the same name
    detail = record["environment"]["cpu_detail"]
    if detail.get("vector_isa"):  # read from /proc/cpuinfo's flags (x86)
        assert detail["vector_isa"] in out.with_suffix(".md").read_text().splitlines()[2]

    if jit.AVAILABLE:  # the numpy path is timed alongside, and numba's cost is measured
        assert all("numpy_path" in row for spec, row in rows.items() if spec != "fp32")
        assert "numpy_path_value" in shape["targets"][0]
        cost = record["jit"]
        assert cost["installed_mb"]["llvmlite"] > 1 and cost["import_numba_s"] > 0
        # both timed (which is faster is the benchmark's finding, not a test's)
        assert cost["first_use_all_quantizers_cold_s"] > 0
        assert cost["first_use_all_quantizers_cached_s"] >= 0
        assert "numpy path" in out.with_suffix(".md").read_text()


def test_each_round_is_judged_on_its_own_pair_of_timings():
    from bench.speed import per_round

    # their seconds over ours, round by round: 0.9, 1.0, 1.1, 1.2
    rounds = per_round([1.0, 1.0, 2.0, 0.5], [0.9, 1.0, 2.2, 0.6], goal=1.0)
    assert rounds == {"q1": 0.975, "q3": 1.125, "met": 3, "of": 4}
    assert per_round([2.0], [1.0], goal=1.0) == {"q1": 0.5, "q3": 0.5, "met": 0, "of": 1}


def test_the_report_flags_blas_kernels_that_differ_between_the_sides():
    from bench.speed import blas_sentence

    def env(numpy_arch, faiss_arch, **variables):
        libs = [
            {
                "owner": "numpy",
                "library": "openblas",
                "version": "0.3.31",
                "architecture": numpy_arch,
            },
            {
                "owner": "faiss",
                "library": "openblas",
                "version": "0.3.15",
                "architecture": faiss_arch,
            },
        ]
        return {"blas": libs, "blas_env": variables}

    same = blas_sentence(env("SkylakeX", "SkylakeX", OPENBLAS_CORETYPE="SkylakeX"))
    assert "numpy's openblas 0.3.31 runs SkylakeX kernels" in same
    assert "OPENBLAS_CORETYPE=SkylakeX" in same and "Not like for like" not in same
    differ = blas_sentence(env("SkylakeX", "Barcelona"))
    assert "Not like for like" in differ and "Barcelona" in differ
    assert "no OPENBLAS_* set" in differ
    assert "not recorded" in blas_sentence({"blas": [{"error": "no threadpoolctl"}]})


def test_a_run_repeats_calls_on_small_inputs_until_it_has_handled_run_mb():
    import pytest

    from bench.speed import calls_per_run, main

    assert calls_per_run(1000 * 384 * 4, 256) == 167  # 1,000 x 384: 1.536 MB a call
    assert calls_per_run(200_000 * 384 * 4, 256) == 1  # the default shapes: one call
    assert calls_per_run(1000 * 384 * 4, 0) == 1
    assert calls_per_run(16, 256) == 1000  # at most 1,000
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(SystemExit, match=f"--run-mb must be a finite number >= 0; got {bad}"):
            main(["--shapes", "100x8", "--run-mb", bad, "--no-write"])


def test_settle_waits_for_spinning_threads_and_is_recorded(tmp_path):
    import threading
    import time

    import pytest

    from bench.speed import main, settle

    stop = threading.Event()

    def spin() -> None:  # like an OpenMP thread waiting for work: busy, then asleep
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end and not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        started = time.perf_counter()
        settle(2.0)
        waited = time.perf_counter() - started
    finally:
        stop.set()
        spinner.join()
    assert 0.1 <= waited < 1.5  # until the spinning stopped, not the whole limit
    started = time.perf_counter()
    settle(2.0)  # nothing running: about a millisecond
    assert time.perf_counter() - started < 0.5
    out = tmp_path / "s.json"
    argv = ["--shapes", "2000x8", "--repeats", "1", "--settle-ms", "20", "--no-jit-cost"]
    assert main([*argv, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["settle_ms"] == 20
    assert "at most 20 ms" in out.with_suffix(".md").read_text()
    for bad in ("-1", "inf", "nan"):
        refused = f"--settle-ms must be a finite number >= 0; got {bad}"
        with pytest.raises(SystemExit, match=refused):
            main(["--shapes", "100x8", "--settle-ms", bad, "--no-write"])


def test_cpu_words_name_the_cpu_with_what_tells_machines_apart():
    from bench.speed import cpu_words

    detail = {"cpu_family": 25, "model": 1, "vector_isa": "AVX2", "l2_per_core": "512K"}
    assert (
        cpu_words({"cpu": "AMD EPYC", "cpu_detail": detail})
        == "AMD EPYC (family 25 model 1, AVX2, L2 512K per core)"
    )
    # records written before cpu_detail existed: the model name alone
    assert cpu_words({"cpu": "AMD EPYC"}) == "AMD EPYC"
