"""Mean-field on the seven shared UAI problems: a lower bound, with its marginal error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fieldlib.inference import get_engine

UAI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uai"
PROBLEMS = ["CSP_12", "DBN_11", "Grids_12", "ObjectDetection_11", "Pedigree_12",
            "Promedus_15", "Segmentation_11"]


def _read_mar(path: Path) -> list[torch.Tensor]:
    tokens = path.read_text().split()
    assert tokens[0] == "MAR"
    n, k, out = int(tokens[1]), 2, []
    for _ in range(n):
        card = int(tokens[k])
        out.append(torch.tensor([float(x) for x in tokens[k + 1:k + 1 + card]],
                                dtype=torch.float64))
        k += 1 + card
    return out


@pytest.mark.parametrize("name", PROBLEMS)
def test_meanfield_bounds_the_stated_log_z(name):
    if not UAI.is_dir():
        pytest.skip(f"shared UAI problems not found at {UAI}")
    from fieldlib.io import load_model

    path = UAI / f"{name}.uai"
    evid = UAI / f"{name}.uai.evid"
    model, graph, evidence = load_model(path, evid if evid.exists() else None)
    log_z = float((UAI / f"{name}.uai.PR").read_text().split()[1]) * math.log(10)
    r = get_engine("meanfield", schedule="sequential", max_iter=25, tol=1e-5)(graph, evidence)
    elbo = float(r.elbo)
    assert elbo <= log_z + 1e-3 * (1 + abs(log_z)), (elbo, log_z)  # PR files: 6 digits
    stated = _read_mar(UAI / f"{name}.uai.MAR")
    tv = max(float(0.5 * (r.marginals[v] - p).abs().sum()) for v, p in zip(model.names, stated))
    for p in r.marginals.values():
        assert torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype))
    print(f"{name}: log Z {log_z:.4f}  ELBO {elbo:.4f}  max marginal TV {tv:.3f}")
