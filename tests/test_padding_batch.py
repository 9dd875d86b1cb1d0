"""Batch of N equals N single calls; padding changes nothing (exact engines)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldlib import FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.inference import get_engine

D = torch.float64


def _field(unary, psi, mu, lengths=None):
    """A temporal field over a batch: unary (N, T, S), psi (N, T, S, I), mu (S, S)."""
    n, t, s = unary.shape
    g = FactorGraph()
    x = g.array("x", t, s, lengths=lengths)
    intent = g.variable("I", psi.shape[-1])
    g.add(Table(x, unary), FrameIntent(x, intent, psi), KernelTemporal(x, mu, kernel=1.5))
    return g


@pytest.mark.parametrize("engine", ["exact", "bruteforce"])
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_padding_and_batching(engine, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    n, t, s, k = len(lengths), 4, 2, 2
    unary = torch.randn(n, t, s, generator=gen, dtype=D)
    psi = torch.randn(n, t, s, k, generator=gen, dtype=D)
    mu = torch.randn(s, s, generator=gen, dtype=D)
    eng = get_engine(engine)
    batch = eng(_field(unary, psi, mu, lengths=torch.tensor(lengths)), map=True)
    for b, length in enumerate(lengths):
        single = eng(_field(unary[b:b + 1, :length], psi[b:b + 1, :length], mu), map=True)
        torch.testing.assert_close(batch.log_z[b], single.log_z[0])
        torch.testing.assert_close(batch.marginals["x"][b, :length], single.marginals["x"][0])
        torch.testing.assert_close(batch.marginals["I"][b], single.marginals["I"][0])
        assert float(batch.marginals["x"][b, length:].abs().sum()) == 0.0  # padding rows
        assert (batch.map["x"][b, length:] == -1).all()
        torch.testing.assert_close(batch.map_score[b], single.map_score[0])


def test_batched_evidence_per_element():
    gen = torch.Generator().manual_seed(1)
    unary = torch.randn(3, 3, 2, generator=gen, dtype=D)
    psi = torch.randn(3, 3, 2, 2, generator=gen, dtype=D)
    mu = torch.randn(2, 2, generator=gen, dtype=D)
    g = _field(unary, psi, mu)
    states = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    r = get_engine("exact")(g, {"x": states})
    for b in range(3):
        single = get_engine("bruteforce")(_field(unary[b:b + 1], psi[b:b + 1], mu),
                                          {"x": states[b]})
        torch.testing.assert_close(r.log_z[b], single.log_z[0])
        torch.testing.assert_close(r.marginals["I"][b], single.marginals["I"][0])


@pytest.mark.parametrize("engine", ["exact", "bruteforce"])
@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 3), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_empty_sequences_in_a_batch(engine, lengths, seed):
    """Length 0 (an empty video) is valid: its frames are all padding; the intent alone
    remains (no factor left on it: uniform, log Z = log k)."""
    gen = torch.Generator().manual_seed(seed)
    n, t, s, k = len(lengths), 3, 2, 3
    unary = torch.randn(n, t, s, generator=gen, dtype=D)
    psi = torch.randn(n, t, s, k, generator=gen, dtype=D)
    mu = torch.randn(s, s, generator=gen, dtype=D)
    eng = get_engine(engine)
    batch = eng(_field(unary, psi, mu, lengths=torch.tensor(lengths)), map=True)
    for b, length in enumerate(lengths):
        if length == 0:
            torch.testing.assert_close(batch.log_z[b], torch.tensor(k, dtype=D).log())
            torch.testing.assert_close(batch.marginals["I"][b], torch.full((k,), 1 / k, dtype=D))
            assert float(batch.marginals["x"][b].abs().sum()) == 0.0
            assert (batch.map["x"][b] == -1).all()
            continue
        single = eng(_field(unary[b:b + 1, :length], psi[b:b + 1, :length], mu), map=True)
        torch.testing.assert_close(batch.log_z[b], single.log_z[0])
        torch.testing.assert_close(batch.marginals["x"][b, :length], single.marginals["x"][0])
        torch.testing.assert_close(batch.map_score[b], single.map_score[0])
