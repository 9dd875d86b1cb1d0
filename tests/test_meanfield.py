"""Mean-field engine: bounds, schedules, exactness without coupling, batching, padding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from random_graphs import build_graph, graph_specs

from fieldlib import (
    BlockDomain,
    Component,
    Factor,
    FactorGraph,
    FrameIntent,
    KernelTemporal,
    Table,
    Term,
    register_factor,
)
from fieldlib.errors import FieldlibError, UnsupportedQueryError, ZeroProbabilityError
from fieldlib.inference import MeanField, get_engine

F64 = torch.float64
SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _exact(graph, evidence=None):
    return get_engine("exact", search_effort=0)(graph, evidence)


def _toy(n=None, t=4, lengths=None, coupling=1.0, seed=0, dtype=F64):
    """A batched temporal field (block frames, intent, kernel) from explicit tensors."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1], [1, 2, 1, 1], [0, 2, 0, 0]])
    tuples = torch.cat([torch.cat([b, torch.full((5, 1), s)], 1) for s in range(2)])
    dom = BlockDomain({"c": 2, "o": 3, "a": 2, "p": 2, "s": 2}, tuples)
    lead = (n,) if n else ()

    def r(*shape, scale=1.0):
        return torch.randn(*lead, *shape, generator=gen, dtype=dtype) * scale

    tensors = {"op": r(t, 3, 2), "coap": r(t, 5), "xi": r(t, 3, 3, scale=coupling),
               "mu": r(3, 3, scale=coupling)}
    return _build(dom, b, tensors, t, lengths), tensors, dom, b


def _build(dom, b, tensors, t, lengths=None):
    g = FactorGraph()
    x = g.array("x", t, dom, lengths=lengths)
    i = g.variable("I", 3)
    g.add(Component(x, ("o", "p"), tensors["op"]),
          Component(x, ("c", "o", "a", "p"), tensors["coap"], configs=b),
          FrameIntent(x, i, tensors["xi"], component="o"),
          KernelTemporal(x, tensors["mu"], kernel=2.0, component="o"))
    return g


def _tv(p, q):
    return float(0.5 * (p - q).abs().sum(-1).max())


@SETTINGS
@given(graph_specs(max_vars=5, max_card=3, max_factors=5))
def test_marginals_normalised_and_elbo_below_log_z(spec):
    g = build_graph(spec)
    try:
        log_z = _exact(g).log_z
    except ZeroProbabilityError:
        assume(False)
    for schedule in ("sequential", "synchronous"):
        r = get_engine("meanfield", schedule=schedule, damping=0.3, max_iter=50)(g)
        assert float(r.elbo) <= float(log_z) + 1e-9
        for v in g.variables.values():
            assert torch.allclose(r.marginals[v.name].sum(), torch.tensor(1.0, dtype=F64))
            assert bool((r.marginals[v.name] >= 0).all())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph_specs(max_vars=5, max_card=3, max_factors=6))
def test_sequential_elbo_never_decreases(spec):
    g = build_graph(spec)
    for space in ("prob", "log"):
        try:
            r = get_engine("meanfield", schedule="sequential", damping=0.4,
                           damping_space=space, max_iter=8, tol=0.0)(g)
        except ZeroProbabilityError:  # a variable whose own tables are all -inf
            assume(False)
        elbos = [float(e["elbo"]) for e in r.trace]
        finite = [e for e in elbos if math.isfinite(e)]
        assert all(b >= a - 1e-9 for a, b in zip(finite, finite[1:])), elbos


def test_sequential_elbo_monotone_on_temporal_field():
    g, *_ = _toy(t=5, coupling=2.0)
    r = get_engine("meanfield", schedule="sequential", max_iter=30, tol=0.0)(g)
    elbos = [float(e["elbo"]) for e in r.trace]
    assert all(b >= a - 1e-12 for a, b in zip(elbos, elbos[1:]))
    assert elbos[-1] <= float(_exact(g).log_z) + 1e-9


@pytest.mark.parametrize("schedule", ["sequential", "synchronous"])
def test_no_coupling_mean_field_is_exact(schedule):
    g, *_ = _toy(t=4, coupling=0.0)
    ex = _exact(g)
    mf = get_engine("meanfield", schedule=schedule)(g)
    assert torch.allclose(mf.elbo, ex.log_z, atol=1e-12)
    for name, p in ex.marginals.items():
        assert torch.allclose(mf.marginals[name], p, atol=1e-12), name


def test_unary_only_random_graph_is_exact():
    gen = torch.Generator().manual_seed(3)
    g = FactorGraph()
    for k in range(4):
        v = g.variable(f"v{k}", 3)
        g.add(Table(v, torch.randn(3, generator=gen, dtype=F64)))
    ex, mf = _exact(g), get_engine("meanfield")(g)
    assert torch.allclose(mf.elbo, ex.log_z, atol=1e-12)


def test_coupling_makes_the_bound_strict():
    g, *_ = _toy(t=4, coupling=1.5)
    ex = _exact(g)
    mf = get_engine("meanfield", tol=1e-10, max_iter=500)(g)
    assert float(mf.elbo) < float(ex.log_z) - 1e-6
    assert _tv(mf.marginals["I"], ex.marginals["I"]) > 1e-6


def test_synchronous_first_pass_follows_eq5_eq6():
    """One synchronous iteration = every Q_i from the initial Q (Eq. 5), then Q_I (Eq. 6)."""
    g, tens, dom, b = _toy(t=3, coupling=1.0)
    r = get_engine("meanfield", schedule="synchronous", max_iter=1, tol=0.0)(g)
    obj = dom.component("o")
    flat, _ = dom.flat_index(("o", "p"))
    unary = tens["op"].reshape(3, -1)[:, flat]
    code = dom.flat_index(("c", "o", "a", "p"))[0]
    bcode = (((b[:, 0] * 3 + b[:, 1]) * 2 + b[:, 2]) * 2 + b[:, 3])
    coap = tens["coap"][:, [int((bcode == c).nonzero()[0, 0]) for c in code]]
    unary = unary + coap
    q0 = torch.softmax(unary, -1)  # init: unary only
    qi0 = torch.full((3,), 1 / 3, dtype=F64)  # the intent has no unary: uniform
    k = torch.exp(-(torch.arange(3.0)[None, :] - torch.arange(3.0)[:, None]) ** 2 / 8).triu(1)
    mu = tens["mu"][obj][:, obj]
    xi = tens["xi"][:, obj]  # (T, S, I)
    fa = k.to(F64) @ q0 @ mu.T  # Σ_{j>i} k(i,j) Σ_u Q_j(u) µ(x, u)
    fb = k.T.to(F64) @ q0 @ mu  # Σ_{j<i} k(j,i) Σ_u Q_j(u) µ(u, x)
    q1 = torch.softmax(unary + xi @ qi0 + fa + fb, -1)
    qi1 = torch.softmax(torch.einsum("ts,tsi->i", q1, xi), -1)
    assert torch.allclose(r.marginals["x"], q1, atol=1e-12)
    assert torch.allclose(r.marginals["I"], qi1, atol=1e-12)


def test_batch_equals_single_calls_with_padding():
    n, t = 3, 5
    lengths = torch.tensor([3, 5, 2])
    g, tens, dom, b = _toy(n=n, t=t, lengths=lengths, coupling=1.0, seed=1)
    eng = get_engine("meanfield", schedule="synchronous", damping=0.2, tol=1e-12, max_iter=300)
    batch = eng(g)
    assert batch.elbo.shape == (n,)
    for k in range(n):
        length = int(lengths[k])
        single = {"op": tens["op"][k, :length], "coap": tens["coap"][k, :length],
                  "xi": tens["xi"][k, :length], "mu": tens["mu"][k]}
        r = eng(_build(dom, b, single, length))
        assert torch.allclose(batch.elbo[k], r.elbo, atol=1e-10)
        assert torch.allclose(batch.marginals["x"][k, :length], r.marginals["x"], atol=1e-9)
        assert bool((batch.marginals["x"][k, length:] == 0).all())  # padding: zero rows
        assert torch.allclose(batch.marginals["I"][k], r.marginals["I"], atol=1e-9)


def test_padding_values_change_nothing():
    lengths = torch.tensor([2, 4])
    g1, tens, dom, b = _toy(n=2, t=4, lengths=lengths, seed=2)
    junk = {k: v.clone() for k, v in tens.items()}
    junk["op"][0, 2:] = 50.0
    junk["xi"][0, 2:] = -30.0
    g2 = _build(dom, b, junk, 4, lengths)
    e = get_engine("meanfield", tol=1e-12)
    r1, r2 = e(g1), e(g2)
    assert torch.allclose(r1.elbo, r2.elbo, atol=1e-12)
    assert torch.allclose(r1.marginals["x"], r2.marginals["x"], atol=1e-12)


def test_evidence_leaves_one_latent_exact():
    g, *_ = _toy(t=3, coupling=1.0)
    ev = {"x": torch.tensor([1, 4, 7])}
    ex = _exact(g, ev)
    mf = get_engine("meanfield")(g, ev)
    assert torch.allclose(mf.elbo, ex.log_z, atol=1e-12)
    assert torch.allclose(mf.marginals["I"], ex.marginals["I"], atol=1e-12)
    assert torch.equal(mf.marginals["x"].argmax(-1), ev["x"])


def test_generic_fallback_for_a_user_factor():
    @register_factor("test_user_pair")
    class UserPair(Factor):  # only terms(): the engine must fall back to them
        def __init__(self, a, b, table):
            super().__init__([a, b])
            self.table = table

        def tensors(self):
            return [self.table]

        def dense_size(self):
            return self.table.numel()

        def terms(self):
            return [Term(tuple(self.scope), self.table, False, self)]

    gen = torch.Generator().manual_seed(5)
    tab = torch.randn(3, 2, generator=gen, dtype=F64)
    un = torch.randn(3, generator=gen, dtype=F64)
    graphs = []
    for cls in (UserPair, None):
        g = FactorGraph()
        a, c = g.variable("a", 3), g.variable("c", 2)
        g.add(Table(a, un))
        g.add(UserPair(a, c, tab) if cls else Table([a, c], tab))
        graphs.append(g)
    e = get_engine("meanfield", tol=1e-12)
    r1, r2 = e(graphs[0]), e(graphs[1])
    assert torch.allclose(r1.elbo, r2.elbo, atol=1e-12)
    assert torch.allclose(r1.marginals["a"], r2.marginals["a"], atol=1e-12)


def test_queries_and_options():
    g, *_ = _toy(t=2)
    with pytest.raises(UnsupportedQueryError):
        get_engine("meanfield")(g, map=True)
    with pytest.raises(UnsupportedQueryError):
        get_engine("meanfield")(g, factor_marginals=True)
    for bad in ({"schedule": "random"}, {"damping": 1.0}, {"damping_space": "x"},
                {"max_iter": 0}, {"init": "zeros"}):
        with pytest.raises(FieldlibError):
            get_engine("meanfield", **bad)
    assert isinstance(get_engine("meanfield", schedule="synchronous", damping=0.5), MeanField)


def test_impossible_states_and_evidence():
    g = FactorGraph()
    a = g.variable("a", 2)
    g.add(Table(a, torch.tensor([0.0, float("-inf")], dtype=F64)))
    with pytest.raises(ZeroProbabilityError):
        get_engine("meanfield")(g, {"a": 1})
    g.add(Table(a, torch.tensor([float("-inf"), 0.0], dtype=F64)))
    with pytest.raises(ZeroProbabilityError):
        get_engine("meanfield")(g)


def test_trace_and_result_fields():
    g, *_ = _toy(t=3)
    r = get_engine("meanfield", schedule="synchronous", max_iter=4, tol=0.0)(g)
    assert r.log_z is None and r.elbo is not None
    assert [e["iteration"] for e in r.trace] == [1, 2, 3, 4]
    assert all({"elbo", "max_change"} <= set(e) for e in r.trace)
    assert r.info["iterations"] == 4 and r.info["schedule"] == "synchronous"


def test_float32_and_elbo_gradient_is_the_marginal():
    g, tens, dom, b = _toy(t=3, coupling=0.0, dtype=torch.float32)
    op = tens["op"].clone().requires_grad_(True)
    g = _build(dom, b, {**tens, "op": op}, 3)
    r = get_engine("meanfield")(g)
    assert r.elbo.dtype == torch.float32
    (grad,) = torch.autograd.grad(r.elbo, op)
    ex = get_engine("exact")(g)
    (ref,) = torch.autograd.grad(ex.log_z, op)
    assert torch.allclose(grad, ref, atol=1e-5)


def test_long_sequence_runs_without_t_by_t_memory():
    """100,000 frames, σ = 150 frames: kernel sums by FFT, memory linear in T."""
    t = 100_000
    dom = BlockDomain({"o": 3, "p": 2}, torch.cartesian_prod(torch.arange(3), torch.arange(2)))
    g = FactorGraph()
    x = g.array("x", t, dom)
    i = g.variable("I", 2)
    gen = torch.Generator().manual_seed(0)
    g.add(Component(x, ("o", "p"), torch.randn(t, 3, 2, generator=gen)),
          FrameIntent(x, i, 0.01 * torch.randn(t, 3, 2, generator=gen), component="o"),
          KernelTemporal(x, 0.001 * torch.randn(3, 3, generator=gen), kernel=150.0,
                         component="o"))
    r = get_engine("meanfield", schedule="synchronous", max_iter=2, tol=0.0,
                   track_elbo=False)(g)
    assert r.marginals["x"].shape == (t, 6)
    assert torch.isfinite(r.elbo)
    assert torch.allclose(r.marginals["x"].sum(-1), torch.ones(t), atol=1e-5)


def test_stacked_tables_match_per_factor_messages(monkeypatch):
    """The stacked path for many small tables equals the factors' own messages."""
    import fieldlib.inference.meanfield as mf_module

    spec = ([2, 3, 2, 3], [(0, 1), (1, 2), (2, 3), (0,), (3, 0), (1, 3, 2)], 7, 0.2)
    g = build_graph(spec)
    eng = get_engine("meanfield", schedule="sequential", tol=1e-12)
    stacked = eng(g)
    monkeypatch.setattr(mf_module, "stack_tables", lambda factors, layout: ([], factors))
    plain = eng(g)
    assert torch.allclose(stacked.elbo, plain.elbo, atol=1e-12)
    for v in g.variables:
        assert torch.allclose(stacked.marginals[v], plain.marginals[v], atol=1e-12)
