"""Package-level promises: light imports, the README example runs."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_embcomp_leaves_heavy_extras_unimported():
    code = (
        "import sys, embcomp, embcomp.cli, embcomp.evaluation, embcomp.io\n"
        "embcomp.cli.build_parser()\n"
        "heavy = ('grpc', 'faiss', 'matplotlib', 'ray', 'pyarrow')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["codes"].shape == (3000, 192)
    assert namespace["approx"].shape == (3000, 384)


def test_readme_names_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_wheel_ships_the_harness_as_embcomp_bench_and_it_runs(tmp_path):
    """Installing embcomp must not add a top-level ``bench`` (any project may have one):
    the wheel ships the harness as ``embcomp_bench``, without the committed results and
    the repository's study scripts, and the CLI finds it there."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("embcomp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"embcomp", "embcomp_bench"}
    assert "embcomp_bench/sweeps/smoke.yaml" in names and "embcomp_bench/speed.py" in names
    assert not [n for n in names if "/results/" in n or "frontier" in n or "service_load" in n]
    code = (
        "import sys, embcomp, embcomp.cli\n"
        "actions = [a for a in embcomp.cli.build_parser()._actions if a.choices]\n"
        "print(embcomp.__file__)\n"
        "print(sorted(actions[0].choices))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bench', 'embcomp_bench')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,  # not the repository, whose bench/ an editable install also exposes
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site"))
    assert {"sweep", "recommend", "claims", "bench-speed"} <= set(ast.literal_eval(out[1]))
    modules = ast.literal_eval(out[2])
    assert modules and all(m.startswith("embcomp_bench") for m in modules)
