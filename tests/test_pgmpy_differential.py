"""Differential tests against pgmpy: random Markov networks and pgmpy's bundled example
Bayesian networks. fieldlib's exact engine (float64) must agree with pgmpy's
VariableElimination on every marginal and on the partition function."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch

from fieldlib import FactorGraph, Table
from fieldlib.inference import get_engine

pgmpy = pytest.importorskip("pgmpy", reason="pgmpy is a test dependency (pip install .[test])")

from pgmpy.factors.discrete import DiscreteFactor  # noqa: E402
from pgmpy.inference import VariableElimination as PgmpyVE  # noqa: E402

try:  # pgmpy >= 1.0 renamed the class; keep both spellings working
    from pgmpy.models import DiscreteMarkovNetwork as MarkovNetwork  # noqa: E402
except ImportError:  # pragma: no cover
    from pgmpy.models import MarkovNetwork  # noqa: E402


def random_network(seed: int, n: int, max_card: int, factors: int, zero_prob: float = 0.0):
    """``(cards, scopes, potentials)``: a random Markov network with positive potentials
    (some exact zeros with ``zero_prob``); every variable is in at least one factor."""
    rng = np.random.default_rng(seed)
    cards = [int(c) for c in rng.integers(2, max_card + 1, size=n)]
    scopes = [(i,) for i in range(n)]
    for _ in range(factors):
        arity = int(rng.integers(2, 4))
        scopes.append(tuple(int(v) for v in rng.choice(n, size=min(arity, n), replace=False)))
    tables = []
    for scope in scopes:
        shape = tuple(cards[v] for v in scope)
        t = np.exp(rng.normal(scale=1.0, size=shape))
        t[rng.random(shape) < zero_prob] = 0.0
        tables.append(t)
    return cards, scopes, tables


def fieldlib_graph(cards, scopes, tables) -> FactorGraph:
    g = FactorGraph()
    vs = [g.variable(f"v{i}", c) for i, c in enumerate(cards)]
    with np.errstate(divide="ignore"):
        for k, (scope, t) in enumerate(zip(scopes, tables)):
            g.add(Table([vs[v] for v in scope], torch.from_numpy(np.log(t)), name=f"f{k}"))
    return g


def pgmpy_network(cards, scopes, tables):
    net = MarkovNetwork()
    net.add_nodes_from([f"v{i}" for i in range(len(cards))])
    factors = []
    for scope, t in zip(scopes, tables):
        names = [f"v{v}" for v in scope]
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                net.add_edge(names[a], names[b])
        factors.append(DiscreteFactor(names, [cards[v] for v in scope], t.ravel()))
    net.add_factors(*factors)
    return net


def pgmpy_marginals(model, variables, evidence=None):
    ve = PgmpyVE(model)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in variables:
            if evidence and v in evidence:
                continue
            q = ve.query([v], evidence=evidence, show_progress=False, joint=True)
            out[v] = q.values / q.values.sum()
    return out


@pytest.mark.parametrize("seed", range(4))
def test_random_markov_networks_agree_with_pgmpy(seed):
    cards, scopes, tables = random_network(seed, n=7, max_card=3, factors=6,
                                           zero_prob=0.1 if seed % 2 else 0.0)
    graph = fieldlib_graph(cards, scopes, tables)
    net = pgmpy_network(cards, scopes, tables)
    result = get_engine("exact")(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = net.get_partition_function()
    assert math.isclose(float(result.log_z), math.log(z), rel_tol=1e-10, abs_tol=1e-10)
    theirs = pgmpy_marginals(net, list(graph.variables))
    for name, p in theirs.items():
        np.testing.assert_allclose(result.marginal(name).numpy(), p, atol=1e-10)


@pytest.mark.parametrize("seed", range(2))
def test_random_networks_with_evidence_agree_with_pgmpy(seed):
    cards, scopes, tables = random_network(100 + seed, n=8, max_card=3, factors=7)
    graph = fieldlib_graph(cards, scopes, tables)
    net = pgmpy_network(cards, scopes, tables)
    evidence = {"v0": 1, "v3": 0}
    result = get_engine("exact")(graph, evidence)
    theirs = pgmpy_marginals(net, list(graph.variables), evidence)
    for name, p in theirs.items():
        np.testing.assert_allclose(result.marginal(name).numpy(), p, atol=1e-10)


@functools.cache
def _example_model(name: str):
    """pgmpy's bundled example network (its BIF reader is slow: read each once)."""
    from pgmpy.utils import get_example_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = get_example_model(name)
        except Exception as exc:  # a pgmpy without the bundled file would download it
            pytest.skip(f"pgmpy example model {name!r} unavailable offline: {exc}")
    return model


def _example_graph(name: str):
    """``(pgmpy model, fieldlib graph)``; each CPD becomes one Table over
    (child, parents...) in pgmpy's axis order."""
    model = _example_model(name)
    g = FactorGraph()
    vs = {node: g.variable(node, model.get_cardinality(node)) for node in model.nodes()}
    with np.errstate(divide="ignore"):
        for cpd in model.get_cpds():
            f = cpd.to_factor()
            g.add(Table([vs[v] for v in f.variables], torch.from_numpy(np.log(f.values)),
                        name=f"P({cpd.variable})"))
    return model, g


@pytest.mark.parametrize("name", ["asia", "sachs"])
def test_example_bayesian_networks_agree_with_pgmpy(name):
    model, graph = _example_graph(name)
    result = get_engine("exact")(graph)
    # a Bayesian network's CPDs multiply to a normalised joint: log Z = 0 (up to the
    # rounding of the CPD values stored in the files)
    assert abs(float(result.log_z)) < 1e-6
    theirs = pgmpy_marginals(model, list(graph.variables))
    for var, p in theirs.items():
        np.testing.assert_allclose(result.marginal(var).numpy(), p, atol=1e-10)


def test_example_network_with_evidence_agrees_with_pgmpy():
    model, graph = _example_graph("asia")
    states = {v: model.get_cpds(v).state_names[v] for v in model.nodes()}
    evidence = {"smoke": states["smoke"][0], "xray": states["xray"][1]}
    index = {v: states[v].index(s) for v, s in evidence.items()}
    result = get_engine("exact")(graph, index)
    theirs = pgmpy_marginals(model, list(graph.variables), evidence)
    for var, p in theirs.items():
        np.testing.assert_allclose(result.marginal(var).numpy(), p, atol=1e-10)
    # log Z with evidence = log P(evidence), pgmpy's joint query gives it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = PgmpyVE(model).query(list(evidence), show_progress=False, joint=True)
    p_e = float(joint.get_value(**evidence))
    assert math.isclose(float(result.log_z), math.log(p_e), rel_tol=1e-10)
