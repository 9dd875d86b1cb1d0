"""VariableElimination against the BruteForce oracle on random small graphs (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_graphs import build_graph, graph_specs

from fieldlib import ZeroProbabilityError
from fieldlib.inference import BruteForce, VariableElimination, get_engine

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _score(graph, assignment):
    """log-score of a full assignment {name: state}, straight from the factor tables."""
    total = 0.0
    for f in graph.factors:
        index = tuple(int(assignment[v.name]) for v in f.scope)
        total += float(f.log_potential[index])
    return total


def _solve_both(graph, evidence=None):
    bf = BruteForce()(graph, evidence, map=True, factor_marginals=True)
    ve = VariableElimination(search_effort=0)(graph, evidence, map=True, factor_marginals=True)
    return bf, ve


@SETTINGS
@given(graph_specs())
def test_log_z_marginals_and_map_agree(spec):
    graph = build_graph(spec)
    try:
        bf, ve = _solve_both(graph)
    except ZeroProbabilityError:
        with pytest.raises(ZeroProbabilityError):
            VariableElimination(search_effort=0)(graph)
        return
    torch.testing.assert_close(ve.log_z, bf.log_z, rtol=1e-10, atol=1e-10)
    for name, m in bf.marginals.items():
        torch.testing.assert_close(ve.marginals[name], m, rtol=0, atol=1e-10)
        assert abs(float(m.sum()) - 1.0) < 1e-10
    for name, ms in bf.factor_marginals.items():
        for a, b in zip(ve.factor_marginals[name], ms):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # MAP: same optimal score (assignments may differ on ties), and the score is real
    torch.testing.assert_close(ve.map_score, bf.map_score, rtol=1e-10, atol=1e-10)
    for result in (bf, ve):
        assert math.isclose(_score(graph, result.map), float(result.map_score), abs_tol=1e-9)


@SETTINGS
@given(graph_specs(), st.data())
def test_evidence_agrees(spec, data):
    graph = build_graph(spec)
    names = list(graph.variables)
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    evidence = {n: data.draw(st.integers(0, graph.variables[n].cardinality - 1)) for n in chosen}
    try:
        bf, ve = _solve_both(graph, evidence)
    except ZeroProbabilityError as exc:
        assert "probability zero" in str(exc)
        with pytest.raises(ZeroProbabilityError):
            VariableElimination(search_effort=0)(graph, evidence)
        return
    torch.testing.assert_close(ve.log_z, bf.log_z, rtol=1e-10, atol=1e-10)
    for name, m in bf.marginals.items():
        torch.testing.assert_close(ve.marginals[name], m, rtol=0, atol=1e-10)
    for n, s in evidence.items():
        assert int(ve.map[n]) == s and float(ve.marginals[n][s]) == 1.0
    torch.testing.assert_close(ve.map_score, bf.map_score, rtol=1e-10, atol=1e-10)


def test_log_z_by_hand():
    """Two binary variables, one pairwise table: Z = Σ exp(table)."""
    spec = ([2, 2], [(0, 1)], 3, 0.0)
    graph = build_graph(spec)
    table = graph.factors[0].log_potential
    for engine in ("exact", "bruteforce"):
        r = get_engine(engine)(graph)
        assert math.isclose(float(r.log_z), math.log(float(table.exp().sum())), rel_tol=1e-12)
        torch.testing.assert_close(r.marginals["v0"], table.exp().sum(1) / table.exp().sum())
        assert float(get_engine(engine).log_partition(graph)) == float(r.log_z)


def test_gradcheck_log_z():
    """torch.autograd.gradcheck of log Z (VE) w.r.t. the log-potentials, float64."""
    spec = ([2, 3, 2, 2], [(0, 1), (1, 2, 3), (3,), (0, 2)], 7, 0.0)
    graph = build_graph(spec)
    tables = [f.log_potential.clone().requires_grad_(True) for f in graph.factors]

    def log_z(*ts):
        for f, t in zip(graph.factors, ts):
            f.log_potential = t
        return VariableElimination(search_effort=0)(graph, marginals=False).log_z

    assert torch.autograd.gradcheck(log_z, tables)


def test_log_z_gradient_is_the_marginal():
    spec = ([3, 2, 2], [(0, 1), (1, 2)], 11, 0.0)
    graph = build_graph(spec)
    graph.factors[0].log_potential.requires_grad_(True)
    r = VariableElimination()(graph, factor_marginals=True)
    (grad,) = torch.autograd.grad(r.log_z, graph.factors[0].log_potential)
    torch.testing.assert_close(grad, r.factor_marginals["f0"][0])


def test_all_minus_inf_gives_clear_error_and_no_nan():
    spec = ([2, 2], [(0, 1)], 0, 0.0)
    graph = build_graph(spec)
    graph.factors[0].log_potential = torch.full((2, 2), float("-inf"), dtype=torch.float64)
    for engine in ("exact", "bruteforce"):
        with pytest.raises(ZeroProbabilityError, match="probability zero"):
            get_engine(engine)(graph)


def test_minus_inf_rows_keep_gradients_finite():
    """A table with an all -inf row (an impossible state) must give finite gradients."""
    spec = ([3, 2], [(0, 1), (0,)], 0, 0.0)
    graph = build_graph(spec)
    t = graph.factors[0].log_potential.clone()
    t[1] = float("-inf")
    t.requires_grad_(True)
    graph.factors[0].log_potential = t
    r = VariableElimination()(graph)
    (g,) = torch.autograd.grad(r.log_z, t)
    assert torch.isfinite(g).all() and float(g[1].abs().sum()) == 0.0
    assert float(r.marginals["v0"][1]) == 0.0


def test_opt_einsum_path_and_cost_agree_with_opt_einsum():
    """The engine's largest-intermediate figure is opt_einsum's for the same path."""
    import opt_einsum

    from fieldlib.inference.contract import BATCH, path_cost, plan_path
    from fieldlib.inference.prepare import prepare

    spec = ([3, 2, 4, 2, 3], [(0, 1), (1, 2), (2, 3, 4), (0, 4), (3,)], 5, 0.0)
    graph = build_graph(spec)
    prep = prepare(graph, probes=False)
    engine = VariableElimination(order="opt_einsum:greedy")
    free = [graph.index(v) for v in prep.free]
    plan, cost, _ = engine.plan(prep.labels, prep.cards, free)
    path = plan.path
    sym = {x: opt_einsum.get_symbol(i) for i, x in enumerate(sorted(prep.cards))}
    eq = ",".join("".join(sym[x] for x in lab) for lab in prep.labels) + "->" + sym[BATCH]
    shapes = [tuple(prep.cards[x] for x in lab) for lab in prep.labels]
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=path)
    assert cost.largest_intermediate == info.largest_intermediate
    assert path_cost(plan_path(prep.labels, path, prep.cards)).flops == cost.flops
    r = engine(graph)
    torch.testing.assert_close(r.log_z, BruteForce()(graph).log_z)


def test_unknown_engine_and_option():
    from fieldlib import FieldlibError

    with pytest.raises(FieldlibError, match="unknown engine"):
        get_engine("nope")
    with pytest.raises(FieldlibError, match="exact"):
        get_engine("exact", bogus=1)
