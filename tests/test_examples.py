"""Every script in examples/ runs to completion (a broken example is a failed test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_examples_exist():
    assert EXAMPLES, "examples/ holds no scripts"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = dict(os.environ, FIELDLIB_OUT=str(tmp_path), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert list(tmp_path.glob("*.png")), f"{script.name} wrote no plot"


def test_readme_snippet_runs():
    """The README's Python example runs as printed."""
    import re

    import torch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    scope: dict = {}
    torch.manual_seed(0)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["r"].marginals["x"].shape == (6, 4)
