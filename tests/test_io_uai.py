"""UAI format: reading (layout, BAYES, exponents, evidence), every malformed input's error
(file, line, entry, what was expected), and writer round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fieldlib import FormatError
from fieldlib.inference import get_engine
from fieldlib.io import (
    TableModel,
    format_uai,
    load_model,
    parse_evidence,
    parse_uai,
    read_evidence,
    read_uai,
    write_evidence,
    write_uai,
)

SMALL = """MARKOV
3
2 2 3
3
1 0
2 0 1
2 1 2

2
 0.4 0.6
4
 1 2
 3 4
6
 1 2.5e-1 0
 1E+1 2 3
"""


def write(tmp_path, text, name="model.uai"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_preamble_scopes_and_last_variable_fastest(tmp_path):
    m = read_uai(write(tmp_path, SMALL))
    assert m.kind == "MARKOV" and m.cards == [2, 2, 3]
    assert m.scopes == [(0,), (0, 1), (1, 2)]
    # last variable of the scope changes fastest: entry (x1=0, x2=1) is the 2nd value
    assert m.tables[1][0, 1] == 2.0 and m.tables[1][1, 0] == 3.0
    np.testing.assert_array_equal(m.tables[2], [[1, 0.25, 0], [10, 2, 3]])  # exponents
    assert m.names == ["v0", "v1", "v2"]


def test_bayes_preamble_reads_cpts_with_the_same_layout():
    text = "BAYES\n2\n2 2\n2\n1 0\n2 0 1\n2 0.3 0.7\n4 0.9 0.1 0.2 0.8\n"
    m = parse_uai(text, "bn.uai")
    assert m.kind == "BAYES"
    g = m.to_graph()
    # CPT rows P(x1 | x0) sum to one: log Z of the Bayesian network is 0
    assert abs(float(get_engine("exact")(g, marginals=False).log_z)) < 1e-12
    np.testing.assert_allclose(m.tables[1], [[0.9, 0.1], [0.2, 0.8]])


def test_zero_potentials_become_minus_inf_and_graph_is_float64(tmp_path):
    _, graph, _ = load_model(write(tmp_path, SMALL))
    table = graph.factors[2].log_potential
    assert table.dtype == torch.float64 and math.isinf(float(table[0, 2]))
    r = get_engine("exact")(graph)
    b = get_engine("bruteforce")(graph)
    torch.testing.assert_close(r.log_z, b.log_z)
    assert float(r.marginal("v2")[0]) > 0


def test_log_z_of_the_small_model_by_hand(tmp_path):
    m = read_uai(write(tmp_path, SMALL))
    z = 0.0
    for a in range(2):
        for b in range(2):
            for c in range(3):
                z += m.tables[0][a] * m.tables[1][a, b] * m.tables[2][b, c]
    log_z = float(get_engine("exact")(m.to_graph(), marginals=False).log_z)
    assert math.isclose(log_z, math.log(z), rel_tol=1e-12)


# -- malformed models: each names the file, the line and what was expected ----------------
BAD = [
    ("", "empty"),
    ("MARKOW\n1\n2\n0\n", r":1: expected MARKOV or BAYES"),
    ("MARKOV\nx\n", r":2: expected the number of variables \(an integer\), got 'x'"),
    ("MARKOV\n2\n2 0\n0\n", r":3: expected the domain size of variable 1 in 1\.\., got 0"),
    ("MARKOV\n2\n2 2\n1\n2 0 5\n", r":5: expected variable 1 of factor 0's scope \(a variable "
                                   r"index\) in 0\.\.1, got 5"),
    ("MARKOV\n2\n2 2\n1\n2 1 1\n4 1 1 1 1\n", r":5: factor 0's scope lists variable 1 twice"),
    ("MARKOV\n2\n2 2\n1\n2 0 1\n5\n1 1 1 1 1\n",
     r":6: factor 0's table declares 5 entries; expected 4 \(the product of its scope's "
     r"domain sizes 2 x 2\)"),
    ("MARKOV\n2\n2 2\n1\n2 0 1\n4\n1 1\n1\n", r"ends \(after line 8\) while reading factor 0's "
                                              r"table \(3 of 4 values present\); it is truncated"),
    ("MARKOV\n2\n2 2\n1\n2 0 1\n4\n1 1\n1 -2\n",
     r":8: factor 0's table, entry 3 of 4: the value -2 is negative; expected a finite "
     r"non-negative potential"),
    ("MARKOV\n1\n2\n1\n1 0\n2\nnan 1\n", r":7: factor 0's table, entry 0 of 2: the value nan "
                                         r"is NaN"),
    ("MARKOV\n1\n2\n1\n1 0\n2\n1 inf\n", r":7: factor 0's table, entry 1 of 2: the value inf "
                                         r"is infinite"),
    ("MARKOV\n1\n2\n1\n1 0\n2\n1 abc\n", r":7: factor 0's table, entry 1 of 2: expected a "
                                         r"number, got 'abc'"),
    ("MARKOV\n1\n2\n1\n1 0\n2\n1 1\n7\n", r":8: unexpected '7' after the 1 factor tables"),
    ("MARKOV\n3\n2 2\n", r"ends \(after line 3\) while reading the domain size of variable 2"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_malformed_model_error_names_file_line_and_expectation(tmp_path, text, message):
    path = write(tmp_path, text, "bad.uai")
    with pytest.raises(FormatError, match=message) as info:
        read_uai(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_format_error_naming_it(tmp_path):
    with pytest.raises(FormatError, match="nope.uai: cannot read"):
        read_uai(tmp_path / "nope.uai")


# -- evidence ------------------------------------------------------------------------------
def test_evidence_formats():
    m = parse_uai(SMALL)
    assert parse_evidence("2 0 1 2 2", model=m) == {0: 1, 2: 2}
    assert parse_evidence("1\n2 0 1 2 2\n", model=m) == {0: 1, 2: 2}  # older: 1 sample
    assert parse_evidence("0") == {} and parse_evidence("") == {}


BAD_EVIDENCE = [
    ("2 0 1 2", r":1: the evidence declares 2 observations, so expected 4 numbers"),
    ("1 0 2", r":1: expected the state of variable 0 \(observation 0\) in 0\.\.1, got 2"),
    ("1 7 0", r":1: observation 0 names variable 7, which the model does not have \(its "
              r"variables are 0\.\.2\)"),
    ("2 0 1\n0 0", r":2: variable 0 is observed twice, as 1 and 0"),
    ("1 -1 0", r"expected the variable index of observation 0 in 0\.\., got -1"),
]


@pytest.mark.parametrize("text, message", BAD_EVIDENCE)
def test_bad_evidence_errors(tmp_path, text, message):
    m = parse_uai(SMALL)
    path = write(tmp_path, text, "bad.evid")
    with pytest.raises(FormatError, match=message) as info:
        read_evidence(path, m)
    assert str(path) in str(info.value)


def test_evidence_applies_and_round_trips(tmp_path):
    write(tmp_path, SMALL)
    write_evidence(tmp_path / "e.evid", {2: 1, 0: 1})
    assert (tmp_path / "e.evid").read_text() == "2 0 1 2 1\n"
    _, graph, evidence = load_model(tmp_path / "model.uai", tmp_path / "e.evid")
    assert evidence == {"v0": 1, "v2": 1}
    r = get_engine("exact")(graph, evidence)
    assert float(r.marginal("v0")[1]) == 1.0
    torch.testing.assert_close(r.log_z, get_engine("bruteforce")(graph, evidence).log_z)


# -- writer --------------------------------------------------------------------------------
def random_model(seed: int, n: int = 6) -> TableModel:
    rng = np.random.default_rng(seed)
    cards = [int(c) for c in rng.integers(1, 4, size=n)]
    scopes, tables = [], []
    for _ in range(7):
        k = int(rng.integers(1, 4))
        scope = tuple(int(v) for v in rng.choice(n, size=k, replace=False))
        t = rng.random(tuple(cards[v] for v in scope)) * 10 ** rng.uniform(-30, 30)
        t[rng.random(t.shape) < 0.1] = 0.0
        scopes.append(scope)
        tables.append(t)
    return TableModel(cards, scopes, tables)


@pytest.mark.parametrize("seed", range(4))
def test_writer_round_trips_exactly(tmp_path, seed):
    m = random_model(seed)
    write_uai(tmp_path / "m.uai", m)
    back = read_uai(tmp_path / "m.uai")
    assert back.cards == m.cards and back.scopes == m.scopes
    for a, b in zip(m.tables, back.tables):
        np.testing.assert_array_equal(a, b)  # repr floats read back bit for bit


def test_graph_round_trip_keeps_log_z(tmp_path):
    m = random_model(7)
    graph = m.to_graph()
    write_uai(tmp_path / "g.uai", graph)  # from a FactorGraph
    again = read_uai(tmp_path / "g.uai").to_graph()
    engine = get_engine("exact")
    a = engine(graph, marginals=False).log_z
    b = engine(again, marginals=False).log_z
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_format_uai_of_a_batched_graph_is_refused():
    from fieldlib import FactorGraph, FieldlibError, Table

    g = FactorGraph()
    x = g.variable("x", 2)
    g.add(Table(x, torch.zeros(3, 2)))
    with pytest.raises(FieldlibError, match="batched"):
        format_uai(g)


def test_constant_factor_with_empty_scope_round_trips():
    from fieldlib.io import format_fg, parse_fg

    m = parse_uai("MARKOV\n1\n2\n2\n0\n1 0\n1 5\n2 1 3\n")
    assert m.scopes == [(), (0,)] and float(m.tables[0]) == 5.0
    engine = get_engine("exact")
    expected = math.log(5 * (1 + 3))
    for again in (m, parse_uai(format_uai(m.to_graph())), parse_fg(format_fg(m))):
        log_z = float(engine(again.to_graph(), marginals=False).log_z)
        assert math.isclose(log_z, expected, rel_tol=1e-12)


def test_model_without_factors_is_solved_in_float64(tmp_path):
    """A file with variables only used to give a float32 graph (torch's default dtype)."""
    _, graph, _ = load_model(write(tmp_path, "MARKOV\n2\n2 3\n0\n"))
    assert graph.dtype == torch.float64
    r = get_engine("exact")(graph)
    assert r.log_z.dtype == torch.float64 and r.marginal("v1").dtype == torch.float64
    assert math.isclose(float(r.log_z), math.log(6), rel_tol=1e-15)
    torch.testing.assert_close(r.marginal("v1"), torch.full((3,), 1 / 3, dtype=torch.float64))
    # factors added later decide the dtype as in any graph
    from fieldlib import Table

    graph.add(Table(graph.variables["v0"], torch.zeros(2, dtype=torch.float32)))
    assert graph.dtype == torch.float32


def test_declared_sizes_are_checked_against_the_memory_budget(tmp_path):
    """Sizes are checked as they are declared, before tables are allocated or read."""
    from fieldlib import TooLargeError

    path = write(tmp_path, "MARKOV\n2\n1000 1000\n1\n2 0 1\n1000000\n1 2\n")
    with pytest.raises(TooLargeError, match=r"model\.uai:5: factor 0's table over variables "
                       r"\(0, 1\) has 1,000,000 entries.*memory budget of 1,048,576 bytes"):
        read_uai(path, memory_budget=2**20)
    with pytest.raises(TooLargeError, match="above the limit of 999,999 entries per table"):
        read_uai(path, max_table_elements=999_999)
    with pytest.raises(FormatError, match="2 of 1000000 values present"):  # budget allows it
        read_uai(path, memory_budget=2**30)
