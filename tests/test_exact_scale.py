"""Exact means exact at any scale (issue 8 §1): the exact engine against the brute-force oracle
on random graphs whose log-potentials are hundreds of nats, as a network's scores are, and
cancel across factors; float64, float32, half precision and huge finite values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_graphs import graph_specs

from fieldlib import FactorGraph, FieldlibError, Table, ZeroProbabilityError
from fieldlib.inference import BruteForce, VariableElimination

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def scaled_graph(spec, scale: float, cancel: bool, dtype=torch.float64) -> FactorGraph:
    """A random graph (``spec`` as random_graphs.graph_specs) whose tables are ``scale``
    times a standard normal; with ``cancel``, every factor gets a partner on the same scope
    holding minus its table plus a unit-scale remainder, so each table spans thousands of
    nats while their sum (the model) is moderate."""
    cards, scopes, seed, zero_prob = spec
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    vs = [g.variable(f"v{i}", c) for i, c in enumerate(cards)]
    for k, scope in enumerate(scopes):
        shape = tuple(cards[i] for i in scope)
        table = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        zeros = torch.rand(shape, generator=gen, dtype=torch.float64) < zero_prob
        table = table.masked_fill(zeros, -math.inf)
        scope_vars = [vs[i] for i in scope]
        g.add(Table(scope_vars, table.to(dtype), name=f"f{k}"))
        if cancel:
            rest = torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0
            partner = torch.where(zeros, torch.zeros_like(table), -table) + rest
            g.add(Table(scope_vars, partner.to(dtype), name=f"g{k}"))
    return g


def _cast(graph: FactorGraph, dtype) -> FactorGraph:
    """The same model with every table in ``dtype`` (the oracle runs on the float64 copy of
    exactly the rounded tables the engine sees)."""
    g = FactorGraph()
    vs = {v.name: g.variable(v.name, v.cardinality) for v in graph.variables.values()}
    for f in graph.factors:
        g.add(Table([vs[v.name] for v in f.scope], f.log_potential.detach().to(dtype),
                    name=f.name))
    return g


def _magnitude(graph) -> float:
    total = 0.0
    for f in graph.factors:
        t = f.log_potential.detach().double()
        finite = t[torch.isfinite(t)]
        total += float(finite.abs().max()) if finite.numel() else 0.0
    return total


def _compare(graph, oracle_graph, atol_log_z, atol_marg):
    bf = BruteForce()(oracle_graph, map=True, factor_marginals=True)
    ve = VariableElimination(search_effort=0)(graph, map=True, factor_marginals=True)
    log_z, truth = float(ve.log_z.detach()), float(bf.log_z.detach())
    assert abs(log_z - truth) <= atol_log_z, (log_z, truth)
    for name, m in bf.marginals.items():
        got = ve.marginals[name].double()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, m, rtol=0, atol=atol_marg)
        assert abs(float(got.sum()) - 1.0) <= atol_marg * got.numel()
    for name, ms in bf.factor_marginals.items():
        for a, b in zip(ve.factor_marginals[name], ms):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=atol_marg)
    # MAP: the same optimal score (ties may pick other states)
    assert abs(float(ve.map_score) - float(bf.map_score)) <= atol_log_z


def _feasible(graph, oracle) -> bool:
    """Whether the model has a configuration of positive probability; when it has none, the
    exact engine must say so as brute force does (checked here)."""
    try:
        BruteForce()(oracle, marginals=False)
    except ZeroProbabilityError:
        with pytest.raises(ZeroProbabilityError):
            VariableElimination(search_effort=0)(graph)
        return False
    return True


@SETTINGS
@given(graph_specs(), st.sampled_from([30.0, 300.0, 1000.0]), st.booleans())
def test_float64_large_log_potentials_equal_brute_force(spec, scale, cancel):
    graph = scaled_graph(spec, scale, cancel)
    if not _feasible(graph, graph):
        return
    tol = 1e-12 * (1.0 + _magnitude(graph))
    _compare(graph, graph, tol, 1e-9)


@SETTINGS
@given(graph_specs(), st.sampled_from([10.0, 60.0, 100.0]), st.booleans())
def test_float32_large_log_potentials_equal_brute_force(spec, scale, cancel):
    graph = scaled_graph(spec, scale, cancel, dtype=torch.float32)
    oracle = _cast(graph, torch.float64)
    if not _feasible(graph, oracle):
        return
    # float32 rounds each sum of scores at ~6e-8 relative
    tol = 2e-6 * (1.0 + _magnitude(graph))
    _compare(graph, oracle, tol, 4 * tol)


def _three_vars(dtype=torch.float64, big=600.0, low=-800.0):
    g = FactorGraph()
    x, y, z = (g.variable(n, 3) for n in "xyz")
    pair = torch.zeros(3, 3, dtype=dtype)
    pair[1, 0] = big
    g.add(Table(x, torch.tensor([0.0, low, 0.0], dtype=dtype)), Table([x, y], pair),
          Table([x, z], pair.clone()))
    return g


@pytest.mark.parametrize("dtype,big,low", [(torch.float64, 600.0, -800.0),
                                           (torch.float32, 70.0, -100.0)])
def test_issue_example_far_below_the_max_is_not_impossible(dtype, big, low):
    """unary(x) = [0, low, 0], pair(x,y) = pair(x,z) = big at (1, 0): log Z = 2 big + low and
    P(x=1) ~ 1 (the engine used to return log Z = log 18 and P(x=1) = 0)."""
    g = _three_vars(dtype, big, low)
    r = VariableElimination()(g, map=True)
    truth = BruteForce()(_cast(g, torch.float64))
    assert math.isclose(float(r.log_z), float(truth.log_z), rel_tol=1e-6)
    torch.testing.assert_close(r.marginals["x"].double(), truth.marginals["x"], rtol=0,
                               atol=1e-6)
    assert int(r.map["x"]) == 1


def test_chain_with_scores_of_std_300_and_1000():
    gen = torch.Generator().manual_seed(0)
    for std in (300.0, 1000.0):
        g = FactorGraph()
        xs = [g.variable(f"x{i}", 5) for i in range(5)]
        for i in range(4):
            g.add(Table([xs[i], xs[i + 1]], torch.randn(5, 5, generator=gen,
                                                          dtype=torch.float64) * std))
        r = VariableElimination()(g)
        truth = BruteForce()(g)
        assert math.isclose(float(r.log_z), float(truth.log_z), rel_tol=1e-13)
        for name, m in truth.marginals.items():
            torch.testing.assert_close(r.marginals[name], m, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    g = _three_vars(dtype, big=6.0, low=-8.0)
    truth = BruteForce()(_cast(g, torch.float64))
    for engine in (VariableElimination(), BruteForce()):
        r = engine(g)
        assert r.log_z.dtype == torch.float32
        assert r.info["compute_dtype"] == "float32"
        assert math.isclose(float(r.log_z), float(truth.log_z), rel_tol=1e-6)
        m = r.marginals["x"]
        assert abs(float(m.sum()) - 1.0) < 1e-6
        torch.testing.assert_close(m.double(), truth.marginals["x"], rtol=0, atol=1e-6)


def test_half_precision_feasible_model_is_not_called_impossible():
    g = FactorGraph()
    x, y = g.variable("x", 4), g.variable("y", 4)
    g.add(Table([x, y], torch.tensor([[-60000.0, 0, 0, 0]] * 4, dtype=torch.float16)),
          Table(x, torch.tensor([0.0, -30.0, -30.0, -30.0], dtype=torch.float16)))
    r = VariableElimination()(g)
    truth = BruteForce()(_cast(g, torch.float64))
    assert math.isclose(float(r.log_z), float(truth.log_z), rel_tol=1e-6)


@pytest.mark.parametrize("engine", [VariableElimination(), BruteForce()])
def test_huge_finite_single_factor_is_exact(engine):
    g = FactorGraph()
    x, y = g.variable("x", 2), g.variable("y", 3)
    g.add(Table([x, y], torch.tensor([[1e308, 0.0, -1e308], [0.0, 5.0, -math.inf]],
                                     dtype=torch.float64)))
    r = engine(g, map=True)
    assert float(r.log_z) == 1e308
    torch.testing.assert_close(r.marginals["x"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r.marginals["y"],
                               torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert int(r.map["y"]) == 0


@pytest.mark.parametrize("engine", [VariableElimination(), BruteForce()])
def test_log_z_beyond_the_dtype_is_refused_not_nan(engine):
    g = FactorGraph()
    x, y = g.variable("x", 2), g.variable("y", 2)
    g.add(Table(x, torch.tensor([1e308, 0.0], dtype=torch.float64)),
          Table([x, y], torch.tensor([[1e308, -math.inf], [0.0, 1.0]], dtype=torch.float64)))
    with pytest.raises(FieldlibError, match="range of float64"):
        engine(g)


def test_exact_pair_in_chunks_equals_one_piece_with_gradients():
    """The exact log-space step materialises its broadcast in chunks (checkpointed for
    backward); chunking changes neither the values nor the gradients."""
    from fieldlib.inference.contract import _exact_pair

    gen = torch.Generator().manual_seed(3)
    a0 = torch.randn(2, 5, 7, 3, generator=gen, dtype=torch.float64) * 400
    b0 = torch.randn(2, 7, 3, 4, generator=gen, dtype=torch.float64) * 400
    a0[0, 1] = -math.inf                      # an all-impossible row: zero gradient, not NaN
    la, lb, out = (-1, 0, 1, 2), (-1, 1, 2, 3), (-1, 0, 3)
    results = []
    for limit in (10**9, 7, 1):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        r = _exact_pair(a, la, b, lb, out, [1, 2], limit)
        w = torch.randn(r.shape, generator=torch.Generator().manual_seed(1), dtype=r.dtype)
        (torch.where(torch.isfinite(r), r, torch.zeros_like(r)) * w).sum().backward()
        results.append((r.detach(), a.grad, b.grad))
    truth = torch.logsumexp(a0[..., None] + b0[:, None], dim=(2, 3))
    torch.testing.assert_close(results[0][0], truth)
    for r, ga, gb in results[1:]:
        torch.testing.assert_close(r, results[0][0])
        torch.testing.assert_close(ga, results[0][1])
        torch.testing.assert_close(gb, results[0][2])
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
