"""Mean-field on arrays without per-position work: factors answer the engine's set-up from
their scope (coupling_arity, has_hard_zeros), compute what does not depend on Q once per run
(Beliefs.constant), and contract their tables with matrix products on views
(labelled_einsum's two-operand layout). Speed itself is measured in benchmarks/meanfield.py;
these tests pin the behaviour the speed relies on."""

from __future__ import annotations

import pytest
import torch

from fieldlib import (
    BlockDomain,
    Component,
    Factor,
    FactorGraph,
    FrameIntent,
    KernelTemporal,
    SparseTable,
    Table,
)
from fieldlib.factors import FixedBeliefs, MessageOptions
from fieldlib.factors.beliefs import contract, labelled_einsum
from fieldlib.inference import get_engine
from fieldlib.kernels import GaussianKernel, KernelSum

F64 = torch.float64
SYNC = dict(schedule="synchronous", max_iter=6, tol=0.0)


def _field(n=2, t=5, seed=0, per_state=False, neginf=False, lengths=None):
    """A small Charades-shaped field: block frames (o, p), intent, unary Table, Component
    φ(o, p), FrameIntent (per object or per state), KernelTemporal."""
    gen = torch.Generator().manual_seed(seed)
    obj = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    prog = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    dom = BlockDomain({"o": 3, "p": 2, "k": 7}, torch.stack([obj, prog, torch.arange(7)], 1))
    g = FactorGraph()
    x = g.array("x", t, dom, lengths=lengths)
    i = g.variable("I", 4)
    xi = torch.randn(n, t, 7 if per_state else 3, 4, generator=gen, dtype=F64)
    if neginf:
        xi[:, :, 1, 2] = float("-inf")
    g.add(Table(x, torch.randn(n, t, 7, generator=gen, dtype=F64)),
          Component(x, ("o", "p"), torch.randn(n, t, 3, 2, generator=gen, dtype=F64)),
          FrameIntent(x, i, xi, component=None if per_state else "o"),
          KernelTemporal(x, 0.3 * torch.randn(3, 3, generator=gen, dtype=F64), kernel=2.0,
                         component="o"))
    return g


# -- no per-position work on the synchronous path -------------------------------------------------
@pytest.mark.parametrize("per_state", [False, True])
def test_synchronous_run_never_lists_terms_or_couplings(monkeypatch, per_state):
    g = _field(per_state=per_state, lengths=torch.tensor([5, 3]))
    ref = get_engine("meanfield", **SYNC)(g)

    def refuse(self, *args):
        raise AssertionError(f"{type(self).__name__}: per-position listing on the mean-field path")

    for cls in (Table, Component, FrameIntent, KernelTemporal):
        monkeypatch.setattr(cls, "terms", refuse)
        monkeypatch.setattr(cls, "couplings", refuse)
    r = get_engine("meanfield", **SYNC)(g)
    assert torch.equal(r.marginals["x"], ref.marginals["x"])
    assert torch.equal(r.elbo, ref.elbo)


def test_coupling_arity_and_hard_zeros_agree_with_the_dense_terms():
    g = _field(neginf=True)
    a, b = g.variable("a", 2), g.variable("b", 3)
    x = g.arrays["x"]
    sparse = SparseTable([a, b], [[0, 1], [1, 2]], torch.tensor([0.5, -1.0], dtype=F64))
    full = SparseTable([a, b], [[i, j] for i in range(2) for j in range(3)],
                       torch.zeros(6, dtype=F64))
    pair = Table([x, a], torch.zeros(5, 7, 2, dtype=F64))
    lone = Table([], torch.tensor(1.5, dtype=F64))
    g.add(sparse, full, pair, lone)
    q = FixedBeliefs(get_engine("meanfield", max_iter=2)(g).marginals, 2)
    for f in g.factors:
        assert f.coupling_arity() == Factor.coupling_arity(f), f
        zeros = any(bool(torch.isneginf(t.table).any()) for t in f.terms())
        assert f.has_hard_zeros(q) == zeros, f


# -- what does not depend on Q: once per run, never across runs --------------------------------
def test_tensors_changed_in_place_between_runs_are_seen():
    g = _field()
    engine = get_engine("meanfield", **SYNC)
    engine(g)
    for f in g.factors:  # an optimiser step between two calls
        for t in f.parameters().values():
            t.mul_(1.5)
    g.factors[2].table[0, 1, 2, 1] = float("-inf")
    fresh = _field()
    for f, h in zip(g.factors, fresh.factors):
        for name, t in h.parameters().items():
            t.copy_(f.parameters()[name])
    again, ref = engine(g), engine(fresh)
    assert torch.equal(again.marginals["x"], ref.marginals["x"])
    assert torch.equal(again.elbo, ref.elbo)


def test_elbo_differentiable_through_the_kernel_computed_once_per_run():
    g = _field()
    kt = g.factors[3]
    w = torch.tensor([0.7, 0.4], dtype=F64, requires_grad=True)
    kt.kernel = KernelSum([GaussianKernel(1.0), GaussianKernel(3.0)], w)
    r = get_engine("meanfield", **SYNC)(g)
    (grad,) = torch.autograd.grad(r.elbo.sum(), w)
    q = FixedBeliefs({k: v.detach() for k, v in r.marginals.items()}, 2)
    (ref,) = torch.autograd.grad(kt.expected_energy(q).sum(), w)
    assert torch.allclose(grad, ref) and bool((grad != 0).all())


# -- FrameIntent with -inf entries: vectorised, as the generic per-frame terms ------------------
@pytest.mark.parametrize("per_state", [False, True])
@pytest.mark.parametrize("penalty", [None, 7.0])
def test_frame_intent_with_hard_zeros_matches_the_generic_messages(per_state, penalty):
    g = _field(per_state=per_state, neginf=True)
    fi = g.factors[2]
    r = get_engine("meanfield", **SYNC)(g)
    marg = {k: v.detach() for k, v in r.marginals.items()}
    marg["x"] = marg["x"].clone()
    marg["x"][0, 2] = torch.full((7,), 1 / 7, dtype=F64)  # mass on the impossible entries
    marg["I"] = torch.full((2, 4), 0.25, dtype=F64)
    x, i = g.arrays["x"], g.variables["I"]
    marg.update({v.name: marg["x"][:, t] for t, v in enumerate(x)})  # the terms read these
    q = FixedBeliefs(marg, 2, MessageOptions(penalty=penalty))
    fast, generic = fi.expected_messages(q), Factor.expected_messages(fi, q)
    index = x.domain.component("o") if not per_state else torch.arange(7)
    to_frames = fast[x].message[..., index]
    per_frame = torch.stack([generic[v] for v in x], 1)
    assert bool(torch.isneginf(per_frame).any()) == (penalty is None)
    for got, want in ((to_frames, per_frame), (fast[i], generic[i])):
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        finite = ~torch.isneginf(want)
        assert torch.allclose(got[finite], want[finite], rtol=1e-12, atol=1e-9)
    assert torch.allclose(fi.expected_energy(q), Factor.expected_energy(fi, q),
                          rtol=1e-12, atol=1e-9, equal_nan=True)


# -- two-operand einsums laid out for one matrix product ----------------------------------------
PAIRS = [
    ("ntdi", "ni", "ntd"), ("ntd", "ntdi", "ni"), ("tdi", "ni", "ntd"), ("ntd", "tdi", "ni"),
    ("nlab", "nla", "nb"), ("nla", "nla", "nl"), ("ab", "bc", "ca"), ("ab", "ab", ""),
    ("abc", "c", "ab"), ("nmab", "nmb", "nma"), ("ab", "cd", "abcd"), ("abc", "ab", "c"),
]


@pytest.mark.parametrize("sa, sb, out", PAIRS)
def test_labelled_einsum_pairs_equal_torch_einsum(sa, sb, out):
    gen = torch.Generator().manual_seed(len(sa) * 7 + len(sb))
    size = {"n": 3, "t": 4, "d": 5, "i": 2, "l": 3, "a": 4, "b": 2, "c": 3, "m": 2}
    a = torch.randn(*[size.get(x, 2) for x in sa], generator=gen, dtype=F64)
    b = torch.randn(*[size.get(x, 2) for x in sb], generator=gen, dtype=F64)
    want = torch.einsum(f"{sa},{sb}->{out}", a, b)
    variants = [(a, b), (a.mT.contiguous().mT if a.dim() > 1 else a, b)]  # not contiguous
    if "n" in sa and "n" in sb:
        variants.append((a[:1], b))  # a batch axis of 1 broadcast against N
        want1 = torch.einsum(f"{sa},{sb}->{out}", a[:1], b)
    for k, (x, y) in enumerate(variants):
        got = labelled_einsum(x, list(sa), y, list(sb), list(out))
        ref = want1 if k == 2 else want
        assert got.shape == ref.shape and torch.allclose(got, ref)


def test_contract_one_operand_at_a_time_equals_one_einsum():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)
    q1 = torch.rand(2, 3, 4, generator=gen, dtype=F64)
    q2 = torch.rand(2, 5, generator=gen, dtype=F64)
    got = contract(t, ["n", "l", "a", "b"], [(q2, ["n", "b"]), (q1, ["n", "l", "a"])], ["n", "l"])
    assert torch.allclose(got, torch.einsum("nlab,nla,nb->nl", t, q1, q2))
    expanded = q2[:, None].expand(2, 3, 5)  # a view that cannot merge (stride 0)
    got = contract(t, ["n", "l", "a", "b"], [(expanded, ["n", "l", "b"])], ["n", "l", "a"])
    assert torch.allclose(got, torch.einsum("nlab,nlb->nla", t, expanded))
