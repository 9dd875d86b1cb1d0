"""Helpers for the Charades tests: where the official files are, tiny CSV writers.

A uniquely named module (not conftest) so that imports cannot clash with other test folders.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

#: tests/charades/conftest.py -> parents[2] is the repository root; shared/ sits beside it.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "charades"
HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
          "descriptions", "actions", "length"]


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"official Charades file {path} not found (../shared/data/charades/ is "
                    "absent in this clone)")
    return path


def write_csv(path: Path, rows: list[tuple], header=HEADER) -> Path:
    """rows: (id, scene, actions, length) tuples, or full rows when len == len(header)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            if len(r) == 4:
                vid, scene, actions, length = r
                r = [vid, "S1", scene, "5", "6", "Yes", "A person, walking.", "bed;door",
                     "desc, with comma", actions, length]
            w.writerow(r)
    return path
