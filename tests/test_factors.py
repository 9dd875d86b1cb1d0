"""Factor semantics: each factor's dense terms against a hand-written score (MATH.md §2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fieldlib import (
    BlockDomain,
    Component,
    Factor,
    FactorGraph,
    FieldlibError,
    FrameIntent,
    GaussianKernel,
    KernelSum,
    KernelTemporal,
    Table,
    Term,
    factor_types,
    register_factor,
)
from fieldlib.inference import BruteForce, VariableElimination

D = torch.float64


def _frame_block():
    """Frames whose states are (o, p) tuples: a block domain with 4 of the 6 pairs."""
    return BlockDomain({"o": 3, "p": 2}, [[0, 0], [0, 1], [1, 1], [2, 0]])


def _temporal_field(T=3, n_intent=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dom = _frame_block()
    g = FactorGraph()
    x = g.array("x", T, dom)
    intent = g.variable("I", n_intent)
    op = torch.randn(T, 3, 2, generator=gen, dtype=D)
    psi = torch.randn(T, 3, n_intent, generator=gen, dtype=D)
    mu = torch.randn(3, 3, generator=gen, dtype=D)
    times = torch.tensor([0.0, 1.0, 3.0][:T], dtype=D)
    g.add(Component(x, ("o", "p"), op, name="phi_op"))
    g.add(FrameIntent(x, intent, psi, component="o", name="phi_xi"))
    g.add(KernelTemporal(x, mu, times=times, kernel=2.0, component="o", name="phi_xx"))
    return g, dom, op, psi, mu, times


def test_temporal_field_score_by_hand():
    """log Z of the full field equals the hand-enumerated Σ exp score(x, I) (MATH.md §2)."""
    g, dom, op, psi, mu, times = _temporal_field()
    T = 3
    o, p = dom.component("o"), dom.component("p")
    scores = []
    for states in itertools.product(range(dom.size), repeat=T):
        for i in range(2):
            s = sum(op[t, o[x], p[x]] + psi[t, o[x], i] for t, x in enumerate(states))
            for a in range(T):
                for b in range(a + 1, T):
                    k = math.exp(-((times[b] - times[a]) ** 2) / (2 * 2.0**2))
                    s = s + mu[o[states[a]], o[states[b]]] * k  # ordered: a before b
            scores.append(s)
    expected = torch.logsumexp(torch.stack(scores), 0)
    for engine in (BruteForce(), VariableElimination()):
        torch.testing.assert_close(engine(g).log_z, expected)


def test_mu_is_ordered_not_symmetrised():
    """Swapping µ for µᵀ changes the model (µ(a, b) = affinity of 'a then b')."""
    g, *_ = _temporal_field()
    z1 = VariableElimination()(g).log_z
    kt = g.factors[2]
    kt.mu = kt.mu.T.contiguous()
    z2 = VariableElimination()(g).log_z
    assert abs(float(z1 - z2)) > 1e-3


def test_sparse_component_on_b():
    """φ(c,o,a,p) on B: listed tuples get their value, every other block state -inf."""
    dom = BlockDomain({"c": 2, "o": 2, "s": 2}, [[0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]])
    g = FactorGraph()
    x = g.variable("x", dom)
    b = torch.tensor([[0, 0], [1, 1]])  # allowed (c, o)
    comp = Component(x, ("c", "o"), torch.tensor([0.5, -2.0], dtype=D), configs=b)
    g.add(comp)
    table = comp.block_table()
    assert table.tolist() == [0.5, 0.5, -2.0, float("-inf")]
    r = VariableElimination()(g)
    assert float(r.marginals["x"][3]) == 0.0


def test_components_add_up_on_one_block():
    dom = BlockDomain({"o": 2, "p": 3}, [[0, 0], [1, 2], [1, 0]])
    g = FactorGraph()
    x = g.variable("x", dom)
    a = torch.randn(2, 3, dtype=D)
    b = torch.randn(3, dtype=D)
    g.add(Component(x, ("o", "p"), a), Component(x, ("p",), b))
    expected = torch.logsumexp(torch.stack([a[0, 0] + b[0], a[1, 2] + b[2], a[1, 0] + b[0]]), 0)
    torch.testing.assert_close(VariableElimination()(g).log_z, expected)


def test_kernel_sum_weights_are_differentiable():
    w = torch.tensor([0.5, 2.0], dtype=D, requires_grad=True)
    k = KernelSum([GaussianKernel(1.0), GaussianKernel(3.0)], w)
    delta = torch.tensor([0.0, 1.0, 2.0], dtype=D)
    expected = 0.5 * torch.exp(-delta**2 / 2) + 2.0 * torch.exp(-delta**2 / 18)
    torch.testing.assert_close(k(delta), expected)
    g = FactorGraph()
    x = g.array("x", 3, 2)
    g.add(KernelTemporal(x, torch.randn(2, 2, dtype=D), kernel=k))
    r = VariableElimination()(g, marginals=False)
    (grad,) = torch.autograd.grad(r.log_z, w)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_position_wise_table_equals_separate_tables():
    unary = torch.randn(4, 3, dtype=D)
    g1 = FactorGraph()
    x = g1.array("x", 4, 3)
    g1.add(Table(x, unary))
    g2 = FactorGraph()
    y = g2.array("y", 4, 3)
    for t in range(4):
        g2.add(Table(y[t], unary[t]))
    torch.testing.assert_close(VariableElimination()(g1).log_z, VariableElimination()(g2).log_z)


def test_user_factor_type_registration():
    """A user's factor: subclass + register_factor; the exact engines use its terms()."""

    @register_factor("test_potts")
    class Potts(Factor):
        def __init__(self, a, b, strength, name=None):
            super().__init__([a, b], name)
            self.strength = torch.as_tensor(strength, dtype=D)

        def tensors(self):
            return [self.strength]

        def dense_size(self):
            return self.scope[0].cardinality * self.scope[1].cardinality

        def terms(self):
            a, b = self.scope
            table = torch.eye(a.cardinality, b.cardinality, dtype=D) * self.strength
            return [Term((a, b), table, False, self)]

    assert factor_types()["test_potts"] is Potts
    g = FactorGraph()
    a, b = g.variable("a", 3), g.variable("b", 3)
    g.add(Potts(a, b, 1.0))
    expected = math.log(3 * math.e + 6)
    assert math.isclose(float(VariableElimination()(g).log_z), expected, rel_tol=1e-12)
    with pytest.raises(FieldlibError, match="already registered"):
        register_factor("table")(Potts)


def test_networkx_view_and_draw(tmp_path):
    g, *_ = _temporal_field()
    nxg = g.to_networkx()
    kinds = {d["kind"] for _, d in nxg.nodes(data=True)}
    assert kinds == {"variable", "factor"}
    # the kernel factor touches every frame; the intent factor touches frames and I
    assert nxg.degree["phi_xx#2"] == 3 and nxg.degree["I"] == 1
    out = tmp_path / "graph.png"
    g.draw(path=str(out))
    assert out.stat().st_size > 1000


def test_duplicate_variable_in_scope():
    g = FactorGraph()
    a = g.variable("a", 2)
    with pytest.raises(FieldlibError, match="twice"):
        g.add(Table((a, a), torch.zeros(2, 2)))
