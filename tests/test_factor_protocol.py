"""The protocol between factors and mean-field engines (fieldlib/factors/beliefs.py): typed Q,
options as arguments, per-run state, declared parameters and closed forms, no alphabet limit."""

from __future__ import annotations

import threading

import pytest
import torch
from test_meanfield import _toy

from fieldlib import (
    Factor,
    FactorGraph,
    FieldlibError,
    KernelTemporal,
    Table,
    Term,
    register_factor,
)
from fieldlib.cli import main
from fieldlib.factors import Beliefs, FixedBeliefs, MessageOptions
from fieldlib.factors.beliefs import labelled_einsum
from fieldlib.inference import get_engine
from fieldlib.inference.check import (
    NO_CLOSED_FORM,
    compare,
    compare_closed_form,
    gradient_error,
    toy_temporal_field,
)
from fieldlib.inference.losses import closed_form_gradients, factor_parameters, meanfield_loss
from fieldlib.inference.meanfield_stack import TableStack, stack_tables
from fieldlib.inference.meanfield_state import Layout, MeanFieldState

F64 = torch.float64


@register_factor("test_protocol_bias")
class Bias(Factor):
    """A user's factor with only ``terms()``: a unary log-table named ``strength``."""

    def __init__(self, v, strength, name=None):
        super().__init__(v, name)
        self.strength = strength

    def tensors(self):
        return [self.strength]

    def dense_size(self):
        return self.strength.numel()

    def terms(self):
        return [Term(tuple(self.scope), self.strength, False, self)]


@register_factor("test_protocol_potts")
class Potts(Factor):
    """A user's factor with its own closed form: log φ(a, b) = strength · 1[a = b]."""

    def __init__(self, a, b, strength, name=None):
        super().__init__([a, b], name)
        self.strength = strength

    def tensors(self):
        return [self.strength]

    def dense_size(self):
        return self.scope[0].cardinality * self.scope[1].cardinality

    def terms(self):
        a, b = self.scope
        eye = torch.eye(a.cardinality, b.cardinality, dtype=self.strength.dtype)
        return [Term((a, b), eye * self.strength, False, self)]

    def energy_gradient(self, q, form="sequence"):
        a, b = self.scope
        d = min(a.cardinality, b.cardinality)
        return {"strength": (q.probs(a)[:, :d] * q.probs(b)[:, :d]).sum(-1)}  # (N,)


def _grads(scalar, params):
    names = list(params)
    gs = torch.autograd.grad(scalar, [params[k] for k in names], allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(names, gs)}


# -- Q is a typed protocol; options travel inside it ---------------------------------------------
def test_states_implement_the_beliefs_protocol():
    g, *_ = _toy(t=3)
    state = MeanFieldState(Layout(g), 1, F64, torch.device("cpu"))
    assert isinstance(state, Beliefs) and state.options == MessageOptions()
    fixed = FixedBeliefs(get_engine("meanfield")(g).marginals, 1)
    assert isinstance(fixed, Beliefs)
    soft = state.with_options(penalty=1e30)
    assert soft.options.penalty == 1e30 and state.options.penalty is None
    assert soft.q is state.q  # a view: same storage


def test_kernel_method_reaches_the_factor_through_its_beliefs():
    g, *_ = _toy(t=80)  # above 64 frames: auto picks the FFT
    q = get_engine("meanfield", max_iter=2, tol=0.0)(g).marginals
    kt = next(f for f in g.factors if isinstance(f, KernelTemporal))
    energies = {m: kt.expected_energy(FixedBeliefs(q, 1, MessageOptions(kernel_method=m)))
                for m in ("dense", "fft", "auto")}
    assert torch.allclose(energies["dense"], energies["fft"], atol=1e-10)
    with pytest.raises(FieldlibError, match="unknown kernel-sum method 'nope'"):
        kt.expected_energy(FixedBeliefs(q, 1, MessageOptions(kernel_method="nope")))


def test_penalty_is_an_argument_not_a_global():
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 2)
    tab = Table([a, b], torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]], dtype=F64))
    g.add(tab)
    q = {"a": torch.tensor([0.5, 0.5], dtype=F64), "b": torch.tensor([0.25, 0.75], dtype=F64)}
    hard = tab.expected_messages(FixedBeliefs(q, 1))[a]
    soft = tab.expected_messages(FixedBeliefs(q, 1, MessageOptions(penalty=10.0)))[a]
    assert torch.isneginf(hard).all()
    assert torch.allclose(soft, torch.tensor([[-7.5, -2.5]], dtype=F64))


# -- per-run state: one engine, two graphs, two threads -------------------------------------------
def test_two_graphs_on_one_engine_from_two_threads():
    eng = get_engine("meanfield", schedule="synchronous", damping=0.2, tol=0.0, max_iter=30)
    before = dict(vars(eng))
    # one graph with padding (not every position free), one without: a run that read the
    # other's masks would update padded positions
    ga, *_ = _toy(n=3, t=5, lengths=torch.tensor([3, 5, 2]), seed=1)
    gb, *_ = _toy(n=2, t=6, seed=2)
    serial = {"a": eng(ga), "b": eng(gb)}
    barrier = threading.Barrier(2)
    results: dict = {"a": [], "b": []}
    errors: list = []

    def work(key, graph):
        try:
            barrier.wait()
            for _ in range(10):
                results[key].append(eng(graph))
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in (("a", ga), ("b", gb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, runs in results.items():
        assert len(runs) == 10
        for r in runs:
            assert torch.equal(r.elbo, serial[key].elbo), key
            for name, m in serial[key].marginals.items():
                assert torch.equal(r.marginals[name], m), (key, name)
    assert vars(eng) == before  # the engine holds options only, never run state


# -- declared parameters and closed forms ----------------------------------------------------------
def test_parameters_are_declared_by_the_factors():
    g, params, _ = toy_temporal_field(0)
    assert factor_parameters(g) == params  # the built-in keys, unchanged
    kt = g.factors[-1]
    assert list(kt.parameters()) == ["mu"]  # the frame times are not a potential
    h = FactorGraph()
    a, b = h.variable("a", 3), h.variable("b", 3)
    s = torch.tensor(0.7, dtype=F64)
    h.add(Potts(a, b, s, name="potts"))
    assert factor_parameters(h) == {"potts.strength": s}  # a name no rule could guess


def _with_user_bias(seed=0, coupling=True):
    g, params, labels = toy_temporal_field(seed, coupling=coupling)
    gen = torch.Generator().manual_seed(seed)
    intent = g.variables["I"]
    strength = torch.randn(intent.cardinality, generator=gen, dtype=F64).requires_grad_(True)
    g.add(Bias(intent, strength, name="bias"))
    return g, {**params, "bias.strength": strength}, labels


def test_user_factor_without_closed_form_is_reported_not_skipped():
    g, params, labels = _with_user_bias()
    closed = closed_form_gradients(g, *_marginals(g, labels))
    assert "bias.strength" not in closed and "mu.mu" in closed
    report = compare_closed_form(g, labels, params=params)
    rows = [r for r in report.rows if r.quantity == "bias.strength"]
    assert len(rows) == 2 and all(r.note == NO_CLOSED_FORM and not r.must_hold for r in rows)
    assert report.ok and "no closed form" in report.table()
    checked = [r for r in report.rows if r.must_hold]
    assert len(checked) == 2 * (len(params) - 1)
    # compare() differentiates the user's parameter like the others
    assert any(r.quantity == "d NLL/bias.strength" for r in compare(g, labels).rows)


def _marginals(g, labels):
    loss = meanfield_loss(g, labels)
    return loss.free, loss.target


def test_user_factor_with_its_own_closed_form_is_checked():
    g = FactorGraph()
    a, b = g.variable("a", 3), g.variable("b", 2)
    gen = torch.Generator().manual_seed(1)
    s = torch.tensor(0.8, dtype=F64, requires_grad=True)
    u = torch.randn(3, generator=gen, dtype=F64).requires_grad_(True)
    g.add(Table(a, u, name="u"), Potts(a, b, s, name="potts"))
    labels = {"a": torch.tensor(1), "b": torch.tensor(1)}
    loss = meanfield_loss(g, labels)
    closed = closed_form_gradients(g, loss.free, loss.target)
    auto = _grads(loss.loss, factor_parameters(g))
    assert set(closed) == {"u.log_potential", "potts.strength"}
    for k in closed:
        assert gradient_error(closed[k], auto[k])[0] < 1e-12, k
    assert compare_closed_form(g, labels).ok


def test_gradcheck_reports_a_factor_without_closed_form(monkeypatch, capsys):
    import fieldlib.inference.check as check

    monkeypatch.setattr(check, "toy_temporal_field",
                        lambda seed, coupling=True, **kw: _with_user_bias(seed, coupling))
    assert main(["gradcheck", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "bias.strength" in out and "no closed form" in out
    assert "rows with no closed form (not checked)" in out


# -- a capability, not a type list, decides what is stacked --------------------------------------
def test_a_user_table_type_is_stacked_by_its_declared_table():
    @register_factor("test_protocol_user_table")
    class UserTable(Bias):
        def dense_table(self):
            return self.strength

    gen = torch.Generator().manual_seed(2)
    g = FactorGraph()
    vs = [g.variable(f"v{i}", 3) for i in range(4)]
    for i, (x, y) in enumerate(zip(vs, vs[1:])):
        g.add(UserTable([x, y], torch.randn(3, 3, generator=gen, dtype=F64), name=f"p{i}"))
    stacks, rest = stack_tables(g.factors, Layout(g))
    assert not rest and isinstance(stacks[0], TableStack) and len(stacks[0].factors) == 3
    eng = get_engine("meanfield", tol=1e-12)
    stacked = eng(g)
    h = FactorGraph()
    ws = [h.variable(f"v{i}", 3) for i in range(4)]
    for f, (x, y) in zip(g.factors, zip(ws, ws[1:])):
        h.add(Bias([x, y], f.strength))  # the same tables, through the generic messages
    plain = eng(h)
    assert torch.allclose(stacked.elbo, plain.elbo, atol=1e-12)
    for v in g.variables:
        assert torch.allclose(stacked.marginals[v], plain.marginals[v], atol=1e-12)


# -- no alphabet limit ----------------------------------------------------------------------------
def test_labelled_einsum_beyond_52_labels():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(*[1] * 57, 2, 3, 2, generator=gen, dtype=F64)
    qs = [torch.rand(d, generator=gen, dtype=F64) for d in [1] * 57 + [2, 2]]
    args: list = []
    for j, q in zip([*range(57), 57, 59], qs):
        args += [q, [j]]
    out = labelled_einsum(t, list(range(60)), *args, [58])
    ref = torch.einsum("abc,a,c->b", t.reshape(2, 3, 2), qs[57], qs[58])
    assert torch.allclose(out, ref * torch.stack(qs[:57]).prod(), atol=1e-12)
    a, b = torch.randn(2, 3, generator=gen), torch.randn(3, 4, generator=gen)
    assert torch.allclose(labelled_einsum(a, ["row", "k"], b, ["k", "col"], ["col", "row"]),
                          (a @ b).T)


def test_a_table_over_sixty_variables():
    """57 variables of one state and three real ones: mean-field, the stacked messages and
    the closed form all see the same model as the three-variable table (no letter limit)."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 2, generator=gen, dtype=F64)
    ua, ubc = torch.randn(2, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)
    g = FactorGraph()
    ones = [g.variable(f"u{i}", 1) for i in range(57)]
    a, b, c = g.variable("a", 2), g.variable("b", 3), g.variable("c", 2)
    wide = t.reshape(*[1] * 30, 2, *[1] * 27, 3, 2).clone().requires_grad_(True)
    g.add(Table([*ones[:30], a, *ones[30:], b, c], wide, name="wide"),
          Table(a, ua, name="ua"), Table([b, c], ubc, name="bc"))
    h = FactorGraph()
    a2, b2, c2 = h.variable("a", 2), h.variable("b", 3), h.variable("c", 2)
    h.add(Table([a2, b2, c2], t), Table(a2, ua), Table([b2, c2], ubc))
    eng = get_engine("meanfield", tol=1e-12)
    r, ref = eng(g), eng(h)
    assert torch.allclose(r.elbo, ref.elbo, atol=1e-12)
    for name in "abc":
        assert torch.allclose(r.marginals[name], ref.marginals[name], atol=1e-12)
    loss = meanfield_loss(g, {"a": torch.tensor(1)})
    closed = closed_form_gradients(g, loss.free, loss.target)["wide.log_potential"]
    (auto,) = torch.autograd.grad(loss.loss, [wide])
    assert closed.shape == wide.shape and torch.allclose(closed, auto, atol=1e-12)
