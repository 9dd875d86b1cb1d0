"""Random small factor graphs for differential tests (hypothesis strategies and builders)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fieldlib import FactorGraph, Table


def build_graph(spec, dtype=torch.float64) -> FactorGraph:
    """Build a graph from ``spec = (cards, factors, seed, zero_prob)``: ``factors`` is a list
    of scopes (tuples of variable indices); tables are random log-potentials with some
    entries -inf (zeros of the potential)."""
    cards, scopes, seed, zero_prob = spec
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    vs = [g.variable(f"v{i}", c) for i, c in enumerate(cards)]
    for k, scope in enumerate(scopes):
        shape = tuple(cards[i] for i in scope)
        table = torch.randn(shape, generator=gen, dtype=dtype) * 1.5
        zeros = torch.rand(shape, generator=gen, dtype=dtype) < zero_prob
        table = table.masked_fill(zeros, float("-inf"))
        g.add(Table([vs[i] for i in scope], table, name=f"f{k}"))
    return g


@st.composite
def graph_specs(draw, max_vars: int = 5, max_card: int = 4, max_factors: int = 6):
    n = draw(st.integers(1, max_vars))
    cards = draw(st.lists(st.integers(1, max_card), min_size=n, max_size=n))
    k = draw(st.integers(1, max_factors))
    scopes = []
    for _ in range(k):
        arity = draw(st.integers(1, min(3, n)))
        scope = draw(st.permutations(range(n)))[:arity]
        scopes.append(tuple(scope))
    seed = draw(st.integers(0, 2**16))
    zero_prob = draw(st.sampled_from([0.0, 0.0, 0.2]))
    return cards, scopes, seed, zero_prob
