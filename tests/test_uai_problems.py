"""The seven UAI 2014 problems of ../shared/data/uai: log10 Z and every marginal against the
stated answers (log Z within 1e-5 relative, marginals within 1e-5 absolute), float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fieldlib.inference import get_engine
from fieldlib.io import load_model

UAI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uai"
PROBLEMS = ["ObjectDetection_11", "CSP_12", "Promedus_15", "Grids_12", "Segmentation_11",
            "DBN_11", "Pedigree_12"]


def _require(name: str) -> Path:
    path = UAI / f"{name}.uai"
    if not path.is_file():
        pytest.skip(f"UAI reference problem not found at {path} (a clone without ../shared)")
    return path


def read_answers(name: str) -> tuple[float, list[list[float]]]:
    """``(log10 Z, marginals)`` from NAME.uai.PR and NAME.uai.MAR."""
    pr = (UAI / f"{name}.uai.PR").read_text().split()
    assert pr[0] == "PR"
    mar = (UAI / f"{name}.uai.MAR").read_text().split()
    assert mar[0] == "MAR"
    n, pos, marginals = int(mar[1]), 2, []
    for _ in range(n):
        d = int(mar[pos])
        marginals.append([float(x) for x in mar[pos + 1: pos + 1 + d]])
        pos += 1 + d
    return float(pr[1]), marginals


@pytest.mark.parametrize("name", PROBLEMS)
def test_log_z_and_marginals_match_stated_answers(name):
    path = _require(name)
    model, graph, evidence = load_model(path, UAI / f"{name}.uai.evid")
    result = get_engine("exact")(graph, evidence)
    assert result.log_z.dtype == torch.float64
    log10_z, marginals = read_answers(name)
    ours = float(result.log_z) / math.log(10)
    assert abs(ours - log10_z) <= 1e-5 * abs(log10_z), (ours, log10_z)
    assert len(marginals) == model.num_variables
    worst = 0.0
    for var, expected in zip(model.names, marginals):
        got = result.marginal(var)
        assert got.shape == (len(expected),)
        worst = max(worst, float((got - torch.tensor(expected, dtype=got.dtype)).abs().max()))
    assert worst <= 1e-5, f"{name}: largest marginal error {worst:.2e}"


def test_cli_matches_stated_answer_on_one_problem(tmp_path):
    """End to end through `fieldlib infer`: PR output parses back to the stated value."""
    from fieldlib.cli import main

    name = "Promedus_15"
    path = _require(name)
    out = tmp_path / "out.PR"
    code = main(["infer", str(path), "--evid", str(UAI / f"{name}.uai.evid"), "--task", "PR",
                 "-o", str(out)])
    assert code == 0
    head, value = out.read_text().split()
    assert head == "PR"
    log10_z, _ = read_answers(name)
    assert abs(float(value) - log10_z) <= 1e-5 * abs(log10_z)
