"""libDAI .fg format: first variable fastest, omitted zeros, labels, errors, and round trips
UAI -> graph -> .fg -> graph -> UAI with the same log Z."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fieldlib import FormatError
from fieldlib.inference import get_engine
from fieldlib.io import (
    TableModel,
    format_fg,
    load_model,
    parse_fg,
    parse_uai,
    read_fg,
    read_uai,
    write_fg,
    write_uai,
)

UAI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uai"

# factor over (x4, x7) with cards (2, 3): index = x4 + 2 * x7 (FIRST variable fastest)
FG = """# a comment line
2

1
4
2
2
0 0.25
1 0.75

2
4 7
2 3
4
0 1.0
1 2.0
3 4e-1
5 5
"""


def test_first_variable_changes_fastest_and_zeros_may_be_omitted():
    m = parse_fg(FG, "two.fg")
    assert m.labels == [4, 7] and m.names == ["v4", "v7"] and m.cards == [2, 3]
    assert m.scopes == [(0,), (0, 1)]
    t = m.tables[1]  # C order over (x4, x7)
    assert t.shape == (2, 3)
    assert t[0, 0] == 1.0 and t[1, 0] == 2.0 and t[1, 1] == 0.4 and t[1, 2] == 5.0
    assert t[0, 1] == 0.0 and t[0, 2] == 0.0  # omitted entries are zero


def test_same_model_as_uai_text_gives_same_tables():
    uai = "MARKOV\n2\n2 3\n1\n2 0 1\n6\n1 0 0\n2 0.4 5\n"
    fg = "1\n\n2\n0 1\n2 3\n4\n0 1\n1 2\n3 0.4\n5 5\n"
    np.testing.assert_array_equal(parse_uai(uai).tables[0], parse_fg(fg).tables[0])


def test_evidence_refers_to_fg_labels(tmp_path):
    (tmp_path / "m.fg").write_text(FG)
    (tmp_path / "e.evid").write_text("1 7 2\n")
    _, graph, evidence = load_model(tmp_path / "m.fg", tmp_path / "e.evid")
    assert evidence == {"v7": 2}
    r = get_engine("exact")(graph, evidence)
    torch.testing.assert_close(r.log_z, get_engine("bruteforce")(graph, evidence).log_z)
    (tmp_path / "bad.evid").write_text("1 5 0\n")
    with pytest.raises(FormatError, match=r"names variable 5, which the model does not have "
                                          r"\(its variable labels are 4, 7\)"):
        load_model(tmp_path / "m.fg", tmp_path / "bad.evid")


BAD = [
    ("x\n", r":1: expected the number of factors \(an integer\), got 'x'"),
    ("1\n\n1\n0\n2\n3\n0 1\n1 1\n2 1\n", r":6: expected the number of listed entries of factor "
                                         r"0 in 0\.\.2, got 3"),
    ("1\n\n1\n0\n2\n2\n0 1\n2 1\n", r":8: expected the index of entry 1 of factor 0 in 0\.\.1, "
                                     r"got 2"),
    ("1\n\n1\n0\n2\n2\n0 1\n0 1\n", r":8: factor 0 lists index 0 twice \(entry 1\)"),
    ("1\n\n1\n0\n2\n2\n0 1\n1 -1\n", r":8: factor 0, entry 1 \(index 1\): the value -1 is not a "
                                      r"finite non-negative potential"),
    ("1\n\n1\n0\n2\n2\n0 1\n1 nan\n", r":8: factor 0, entry 1 \(index 1\): the value nan"),
    ("1\n\n1\n0\n2\n2\n0 1\n", r"ends \(after line 7\) while reading the index of entry 1 of "
                               r"factor 0"),
    ("2\n\n1\n0\n2\n0\n\n1\n0\n3\n0\n", r":10: variable 0 has domain size 3 in factor 1 but 2 "
                                        r"in factor 0"),
    ("1\n\n2\n3 3\n2 2\n0\n", r":4: factor 0 lists variable 3 twice"),
    ("1\n\n1\n0\n2\n1\n0 1\n1 1\n", r":8: unexpected '1' after the 1 factors"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_malformed_fg_error_names_file_line_and_expectation(tmp_path, text, message):
    path = tmp_path / "bad.fg"
    path.write_text(text)
    with pytest.raises(FormatError, match=message) as info:
        read_fg(path)
    assert str(path) in str(info.value)


def test_writer_omits_zeros_and_keeps_isolated_variables(tmp_path):
    m = TableModel([2, 3, 2], [(1, 0)], [np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.5]])])
    text = format_fg(m)
    # factor over (x1, x0): first listed variable x1 fastest; zeros omitted
    assert "\n2\n1 0\n3 2\n4\n" in text
    assert "\n2 3.0\n" in text  # (x1=2, x0=0) -> index 2
    write_fg(tmp_path / "m.fg", m)
    back = read_fg(tmp_path / "m.fg")
    assert back.cards == [2, 3, 2]  # the isolated x2 survives as a unary factor of ones
    engine = get_engine("exact")
    torch.testing.assert_close(engine(m.to_graph(), marginals=False).log_z,
                               engine(back.to_graph(), marginals=False).log_z)


def _round_trip(tmp_path, model: TableModel):
    """UAI model -> graph -> .fg -> graph -> UAI: log Z at every stage."""
    engine = get_engine("exact")
    g1 = model.to_graph()
    write_fg(tmp_path / "a.fg", g1)
    g2 = read_fg(tmp_path / "a.fg").to_graph()
    write_uai(tmp_path / "b.uai", g2)
    g3 = read_uai(tmp_path / "b.uai").to_graph()
    return [float(engine(g, marginals=False).log_z) for g in (g1, g2, g3)]


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_uai_fg_uai_keeps_log_z_on_random_models(tmp_path, seed):
    rng = np.random.default_rng(seed)
    cards = [int(c) for c in rng.integers(2, 4, size=6)]
    scopes = [tuple(int(v) for v in rng.choice(6, size=int(rng.integers(1, 4)), replace=False))
              for _ in range(8)]
    tables = [rng.random(tuple(cards[v] for v in s)) * (rng.random(
        tuple(cards[v] for v in s)) > 0.1) for s in scopes]
    a, b, c = _round_trip(tmp_path, TableModel(cards, scopes, tables))
    assert a == pytest.approx(b, rel=1e-12) and b == pytest.approx(c, rel=1e-12)


@pytest.mark.parametrize("name", ["Grids_12", "Promedus_15"])
def test_round_trip_on_shared_problems(tmp_path, name):
    path = UAI / f"{name}.uai"
    if not path.is_file():
        pytest.skip(f"UAI reference problem not found at {path} (a clone without ../shared)")
    a, b, c = _round_trip(tmp_path, read_uai(path))
    assert a == pytest.approx(b, rel=1e-10) and b == pytest.approx(c, rel=1e-10)


def test_constant_factor_is_a_scalar_and_the_graph_stays_unbatched(tmp_path, capsys):
    """A factor over no variables is a () table (it used to be (1,): a batched graph, and
    `fieldlib infer --task MAR` died with a TypeError)."""
    from fieldlib.cli import main

    text = "2\n\n0\n\n\n1\n0 5\n\n2\n0 3\n2 3\n3\n0 1\n1 3\n5 7\n"
    m = parse_fg(text)
    assert m.scopes == [(), (0, 1)] and m.tables[0].shape == ()
    assert float(m.tables[0]) == 5.0
    np.testing.assert_array_equal(m.tables[1], [[1, 0, 0], [3, 0, 7]])
    graph = m.to_graph()
    assert graph.batch_size is None
    r = get_engine("exact")(graph)
    assert np.isclose(float(r.log_z), np.log(5 * 11))
    path = tmp_path / "c.fg"
    path.write_text(text)
    assert main(["infer", str(path), "--task", "MAR"]) == 0
    out = capsys.readouterr().out.split("\n")
    fields = out[1].split()
    assert out[0] == "MAR" and fields[:2] == ["2", "2"] and len(fields) == 2 + 2 + 1 + 3
    np.testing.assert_allclose([float(x) for x in fields[2:4]], [1 / 11, 10 / 11], rtol=1e-9)
    # an omitted constant entry is a zero constant
    assert float(parse_fg("1\n0\n\n\n0\n").tables[0]) == 0.0


def test_declared_fg_sizes_are_checked_before_allocating():
    from fieldlib import TooLargeError

    text = "1\n2\n0 1\n3000 4000\n1\n0 1\n"
    with pytest.raises(TooLargeError, match=r"x\.fg:4: factor 0's table over variables "
                       r"\(0, 1\) has 12,000,000 entries"):
        parse_fg(text, "x.fg", memory_budget=2**20)
    with pytest.raises(TooLargeError, match=r"x\.fg:4: variable 1 has 4,000 states"):
        parse_fg(text, "x.fg", memory_budget=100_000)
    assert parse_fg(text, memory_budget=2**30).tables[0].shape == (3000, 4000)
