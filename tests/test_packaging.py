"""The three code folders install as one namespace, editable and from a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import fieldlib
import fieldlib.inference
import fieldlib.models

ROOT = Path(__file__).resolve().parents[1]


def test_editable_layout_maps_folders():
    assert Path(fieldlib.__file__).parent == ROOT / "fieldlib"
    assert Path(fieldlib.inference.__file__).parent == ROOT / "inference"
    assert Path(fieldlib.models.__file__).parent == ROOT / "models"


def test_wheel_contains_namespace_and_imports(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = wheels.glob("fieldlib-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("fieldlib/graph.py", "fieldlib/inference/exact.py",
                     "fieldlib/models/__init__.py"):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith(("inference/", "models/")) for n in names), \
        "generic top-level packages leaked into the wheel"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import fieldlib.inference, fieldlib.models; "
            "print(fieldlib.inference.__file__); "
            "from fieldlib.inference import get_engine; print(get_engine('exact').name)")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    first, second = proc.stdout.split()
    assert first.startswith(str(target)) and second == "exact"
