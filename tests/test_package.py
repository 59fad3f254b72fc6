"""Package-level promises: light imports, the README example runs."""

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
