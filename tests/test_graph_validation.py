"""Every bad input gets a clear fieldlib error (a ValueError) naming the problem."""

from __future__ import annotations

import pytest
import torch

from fieldlib import (
    BlockDomain,
    CardinalityError,
    Component,
    EvidenceError,
    FactorGraph,
    FieldlibError,
    FrameIntent,
    InvalidPotentialError,
    KernelTemporal,
    ShapeError,
    SparseTable,
    Table,
    TooLargeError,
    UnknownVariableError,
    Variable,
)
from fieldlib.inference import BruteForce, VariableElimination


def test_errors_are_value_errors():
    for cls in (ShapeError, CardinalityError, UnknownVariableError, InvalidPotentialError,
                EvidenceError, TooLargeError):
        assert issubclass(cls, FieldlibError) and issubclass(cls, ValueError)


def test_wrong_cardinality_names_factor_and_variables():
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 3)
    with pytest.raises(CardinalityError, match=r"'pair'.*\(2, 3\).*\('a', 2\)"):
        g.add(Table((a, b), torch.zeros(2, 2), name="pair"))


def test_wrong_rank_is_a_shape_error():
    a = Variable("a", 2)
    with pytest.raises(ShapeError, match="must have shape"):
        Table(a, torch.zeros(2, 2, 2))


def test_nan_and_plus_inf_are_rejected_with_index():
    a = Variable("a", 3)
    t = torch.zeros(3)
    t[1] = float("nan")
    with pytest.raises(InvalidPotentialError, match=r"NaN at index \(1,\)"):
        Table(a, t, name="u")
    t[1] = float("inf")
    with pytest.raises(InvalidPotentialError, match=r"\+inf"):
        Table(a, t)
    t[1] = float("-inf")
    Table(a, t)  # -inf is allowed: an impossible state


def test_unknown_variable():
    g = FactorGraph()
    g.variable("a", 2)
    stranger = Variable("z", 2)
    with pytest.raises(UnknownVariableError, match="'z', which is not in this graph"):
        g.add(Table(stranger, torch.zeros(2)))
    with pytest.raises(UnknownVariableError, match="unknown variable 'q'"):
        g.resolve("q")


def test_duplicate_names_and_batch_mismatch():
    g = FactorGraph()
    a = g.variable("a", 2)
    with pytest.raises(FieldlibError, match="already has a variable named 'a'"):
        g.variable("a", 3)
    g.add(Table(a, torch.zeros(4, 2)))
    with pytest.raises(ShapeError, match="batch size 5"):
        g.add(Table(a, torch.zeros(5, 2)))


def test_evidence_out_of_range_and_bad_shape():
    g = FactorGraph()
    x = g.array("x", 3, 2)
    g.add(Table(x, torch.zeros(3, 2)))
    with pytest.raises(EvidenceError, match=r"x\[1\]=2 is outside its states 0..1"):
        VariableElimination()(g, {"x": torch.tensor([0, 2, 1])})
    with pytest.raises(EvidenceError, match=r"shape \(3,\)"):
        VariableElimination()(g, {"x": torch.tensor([0, 1])})
    with pytest.raises(UnknownVariableError, match="unknown variable 'y'"):
        VariableElimination()(g, {"y": 0})


def test_sparse_table_validation_and_dense_form():
    a, b = Variable("a", 2), Variable("b", 3)
    with pytest.raises(CardinalityError, match="outside 0..2"):
        SparseTable((a, b), [[0, 3]], torch.zeros(1))
    with pytest.raises(FieldlibError, match="distinct"):
        SparseTable((a, b), [[0, 1], [0, 1]], torch.zeros(2))
    s = SparseTable((a, b), [[0, 1], [1, 2]], torch.tensor([0.5, -1.0]))
    dense = s.dense()
    assert dense[0, 1] == 0.5 and dense[1, 2] == -1.0
    assert torch.isneginf(dense).sum() == 4


def test_block_domain_validation():
    with pytest.raises(ShapeError, match=r"shape \(S, 2\)"):
        BlockDomain({"o": 2, "p": 3}, [[0, 1, 2]])
    with pytest.raises(CardinalityError, match="p=3, outside 0..2"):
        BlockDomain({"o": 2, "p": 3}, [[0, 3]])
    with pytest.raises(FieldlibError, match="distinct"):
        BlockDomain({"o": 2, "p": 3}, [[0, 1], [0, 1]])
    dom = BlockDomain({"o": 2, "p": 3}, [[0, 1], [1, 2]])
    with pytest.raises(FieldlibError, match="no component 'z'"):
        dom.component("z")


def test_component_needs_block_domain():
    g = FactorGraph()
    x = g.array("x", 2, 3)
    with pytest.raises(FieldlibError, match="does not have a BlockDomain"):
        Component(x, ("o",), torch.zeros(2, 3))


def test_kernel_temporal_validation():
    g = FactorGraph()
    x = g.array("x", 3, 2)
    with pytest.raises(ShapeError, match="non-decreasing"):
        KernelTemporal(x, torch.zeros(2, 2), times=torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ShapeError, match=r"mu must have shape \(2, 2\)"):
        KernelTemporal(x, torch.zeros(3, 3))
    with pytest.raises(FieldlibError, match="sigma > 0"):
        KernelTemporal(x, torch.zeros(2, 2), kernel=0.0)


def test_frame_intent_shape():
    g = FactorGraph()
    x, i = g.array("x", 3, 2), g.variable("I", 4)
    with pytest.raises(ShapeError, match=r"\(3, 2, 4\)"):
        FrameIntent(x, i, torch.zeros(3, 2, 3))


def test_dense_refusal_names_the_size():
    g = FactorGraph()
    x = g.array("x", 50, 40)
    g.add(KernelTemporal(x, torch.zeros(40, 40), name="long"))
    with pytest.raises(TooLargeError, match="'long'.*1,960,000 elements"):
        g.terms(max_elements=1_000_000)


def test_oversized_problem_is_refused_with_bytes():
    """A 12 x 12 grid of 4-state variables: the contraction needs far more than 1 MiB."""
    g = FactorGraph()
    n = 12
    v = [[g.variable(f"v{i}_{j}", 4) for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(n):
            if i + 1 < n:
                g.add(Table((v[i][j], v[i + 1][j]), torch.randn(4, 4)))
            if j + 1 < n:
                g.add(Table((v[i][j], v[i][j + 1]), torch.randn(4, 4)))
    with pytest.raises(TooLargeError, match=r"would need about [\d,]+ bytes .*budget is 1,048,576"):
        VariableElimination(memory_budget=2**20, search_effort=0)(g)
    with pytest.raises(TooLargeError, match="joint states"):
        BruteForce()(g)


@pytest.mark.parametrize("name, options, message", [
    ("exact", {"memory_budget": -5}, "memory_budget must be a positive"),
    ("exact", {"order": "bogus"}, "unknown order strategy 'bogus'"),
    ("exact", {"search_time": -1}, "search_time must be >= 0"),
    ("bruteforce", {"max_states": 0}, "max_states must be >= 1"),
    ("meanfield", {"damping": 1.5}, "damping must lie in"),
    ("meanfield", {"schedule": "foo"}, "unknown schedule 'foo'"),
])
def test_bad_engine_options(name, options, message):
    from fieldlib.inference import get_engine

    with pytest.raises(FieldlibError, match=message):
        get_engine(name, **options)


@pytest.mark.parametrize("engine", ["exact", "bruteforce", "meanfield"])
def test_evidence_batch_sizes_must_agree(engine):
    from fieldlib.inference import get_engine

    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 2)
    g.add(Table((a, b), torch.zeros(2, 2)))
    with pytest.raises(FieldlibError, match=r"disagree on the batch size: \[2, 3\]"):
        get_engine(engine)(g, {"a": torch.tensor([0, 1]), "b": torch.tensor([0, 1, 1])})


def test_graph_dtype_argument_applies_without_factors():
    import torch

    from fieldlib import FactorGraph, FieldlibError
    from fieldlib.inference import get_engine

    g = FactorGraph(torch.float64)
    g.variable("x", 3)
    r = get_engine("exact")(g)
    assert r.marginals["x"].dtype == torch.float64 and r.log_z.dtype == torch.float64
    with pytest.raises(FieldlibError, match="floating torch dtype"):
        FactorGraph(torch.int64)
