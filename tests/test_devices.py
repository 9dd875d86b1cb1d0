"""Engines run on the device their tensors are on (every device this machine has).

On a CPU-only machine this checks the CPU path; where a GPU is present the same test runs
on it and compares against the CPU answer.
"""

from __future__ import annotations

import pytest
import torch

from fieldlib import FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.inference import get_engine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _field(device):
    gen = torch.Generator().manual_seed(3)
    n, t, s, k = 2, 4, 3, 2
    d = torch.float64
    unary = torch.randn(n, t, s, generator=gen, dtype=d).to(device)
    psi = torch.randn(n, t, s, k, generator=gen, dtype=d).to(device)
    mu = torch.randn(s, s, generator=gen, dtype=d).to(device)
    g = FactorGraph()
    x = g.array("x", t, s, lengths=torch.tensor([4, 3]))
    intent = g.variable("I", k)
    g.add(Table(x, unary), FrameIntent(x, intent, psi), KernelTemporal(x, mu, kernel=2.0))
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", ["exact", "bruteforce", "meanfield"])
def test_engine_follows_the_tensors_device(device, engine):
    result = get_engine(engine)(_field(device))
    assert result.marginals["x"].device.type == device
    reference = get_engine(engine)(_field("cpu"))
    torch.testing.assert_close(result.marginals["x"].cpu(), reference.marginals["x"])
    value = result.log_z if result.log_z is not None else result.elbo
    ref = reference.log_z if reference.log_z is not None else reference.elbo
    torch.testing.assert_close(value.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_map_on_device(device):
    result = get_engine("exact")(_field(device), map=True)
    assert result.map["x"].device.type == device
    assert (result.map["x"][1, 3] == -1).all()  # padding
