"""Mean-field never returns a silent -inf, and never crashes where exact inference works:
hard zeros (a feasible start, a clear flag when none is found), proofs of probability zero,
synchronous non-convergence, mixed dtypes, constant factors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_graphs import build_graph

from fieldlib import Component, FactorGraph, FrameIntent, KernelTemporal, SparseTable, Table
from fieldlib.cli import main
from fieldlib.errors import ZeroProbabilityError
from fieldlib.inference import get_engine
from fieldlib.inference.meanfield import (
    InfeasibleWarning,
    MeanFieldWarning,
    NotConvergedWarning,
)

F64 = torch.float64
SCHEDULES = ("sequential", "synchronous")


def _meanfield(graph, evidence=None, **options):
    """Mean-field with every MeanFieldWarning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeanFieldWarning)
        return get_engine("meanfield", **options)(graph, evidence)


def _not_equal(card=2, unary=None):
    g = FactorGraph()
    a, b = g.variable("a", card), g.variable("b", card)
    configs = torch.tensor([(i, j) for i in range(card) for j in range(card) if i != j])
    g.add(SparseTable([a, b], configs, torch.zeros(len(configs), dtype=F64)))
    if unary is not None:
        g.add(Table(a, unary))
    return g


def _impossible_mass(r) -> float:
    """Q's probability that a == b (impossible under a != b)."""
    return float((r.marginals["a"] * r.marginals["b"]).sum())


# -- hard zeros: a finite ELBO from a feasible start --------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("init", ["unary", "uniform"])
@pytest.mark.parametrize("damping,space", [(0.0, "prob"), (0.5, "prob"), (0.5, "log")])
def test_not_equal_has_a_finite_elbo(schedule, init, damping, space):
    g = _not_equal()
    r = _meanfield(g, schedule=schedule, init=init, damping=damping, damping_space=space)
    assert math.isfinite(float(r.elbo))
    assert float(r.elbo) <= math.log(2) + 1e-12
    assert r.info["feasible"] and r.info["restarted"]
    assert _impossible_mass(r) == 0.0
    assert all(math.isfinite(float(e["elbo"])) for e in r.trace)


def test_restart_point_follows_the_scores():
    # a prefers state 1, so the feasible point (and Q) is a = 1, b = 0: ELBO = 3
    g = _not_equal(unary=torch.tensor([0.0, 3.0], dtype=F64))
    r = _meanfield(g)
    assert float(r.elbo) == pytest.approx(3.0, abs=1e-12)
    assert r.marginals["a"].tolist() == [0.0, 1.0]


def _constrained_chain(seed, n=6, card=3):
    """A chain x_0 != x_1 != ... with random scores on every pair and state."""
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    xs = [g.variable(f"x{i}", card) for i in range(n)]
    for x in xs:
        g.add(Table(x, torch.randn(card, generator=gen, dtype=F64)))
    for u, v in zip(xs, xs[1:]):
        table = torch.randn(card, card, generator=gen, dtype=F64)
        g.add(Table([u, v], table.fill_diagonal_(float("-inf"))))
    return g


@pytest.mark.parametrize("seed", range(3))
def test_sequential_elbo_never_decreases_after_a_restart(seed):
    g = _constrained_chain(seed)
    log_z = float(get_engine("exact")(g).log_z)
    for space in ("prob", "log"):
        r = _meanfield(g, schedule="sequential", damping=0.3, damping_space=space, tol=0.0,
                       max_iter=10)
        elbos = [float(e["elbo"]) for e in r.trace]
        assert all(math.isfinite(e) for e in elbos), elbos
        assert all(b >= a - 1e-12 for a, b in zip(elbos, elbos[1:])), elbos
        assert elbos[-1] <= log_z + 1e-9


def test_synchronous_step_into_an_impossible_configuration_is_replaced():
    # "not both 1": a Jacobi step from a = b = 0 moves both to {0, 1}, giving (1, 1) mass
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 2)
    g.add(Table([a, b], torch.tensor([[0.0, 0.0], [0.0, float("-inf")]], dtype=F64)))
    r = _meanfield(g, schedule="synchronous")
    assert r.info["feasible"] and r.info["replaced_steps"] > 0
    assert all(math.isfinite(float(e["elbo"])) for e in r.trace)
    assert float(r.marginals["a"][1] * r.marginals["b"][1]) == 0.0


def test_batch_of_n_equals_n_single_calls_with_hard_zeros():
    g = _not_equal(card=3, unary=torch.tensor([0.5, 0.0, 1.0], dtype=F64))
    ev = {"b": torch.tensor([0, 2, 1])}
    batch = _meanfield(g, ev)
    assert batch.info["feasible"] and bool(torch.isfinite(batch.elbo).all())
    for i in range(3):
        one = _meanfield(g, {"b": int(ev["b"][i])})
        assert torch.allclose(batch.elbo[i], one.elbo, atol=1e-12)
        assert torch.allclose(batch.marginals["a"][i], one.marginals["a"], atol=1e-12)
        assert float(batch.marginals["a"][i, ev["b"][i]]) == 0.0


def test_hard_zeros_between_padded_arrays():
    """Two batched, padded sequences whose frames must differ position-wise, one of them
    coupled in time by a kernel."""
    gen = torch.Generator().manual_seed(4)
    g = FactorGraph()
    lengths = torch.tensor([4, 2])
    x, y = g.array("x", 4, 3, lengths=lengths), g.array("y", 4, 3, lengths=lengths)
    configs = torch.tensor([(i, j) for i in range(3) for j in range(3) if i != j])
    g.add(Table(x, torch.randn(2, 4, 3, generator=gen, dtype=F64)),
          Table(y, torch.randn(2, 4, 3, generator=gen, dtype=F64)),
          SparseTable([x, y], configs, torch.randn(4, len(configs), generator=gen, dtype=F64)),
          KernelTemporal(x, torch.randn(3, 3, generator=gen, dtype=F64), kernel=1.0))
    log_z = get_engine("exact")(g).log_z
    for schedule in SCHEDULES:
        r = _meanfield(g, schedule=schedule)
        assert r.info["feasible"] and bool(torch.isfinite(r.elbo).all())
        assert bool((r.elbo <= log_z + 1e-9).all())
        assert float((r.marginals["x"] * r.marginals["y"]).sum()) == 0.0
        assert float(r.marginals["x"][1, 2:].abs().sum()) == 0.0  # padding stays empty


def test_pedigree_has_a_finite_elbo(shared_data):
    from fieldlib.io import load_model

    uai = shared_data / "uai"
    _, graph, evidence = load_model(uai / "Pedigree_12.uai", uai / "Pedigree_12.uai.evid")
    log_z = float((uai / "Pedigree_12.uai.PR").read_text().split()[1]) * math.log(10)
    r = _meanfield(graph, evidence, schedule="sequential", max_iter=25, tol=1e-5)
    assert r.info["feasible"]
    assert -math.inf < float(r.elbo) <= log_z + 1e-3 * (1 + abs(log_z))


def test_cli_pedigree_meanfield_prints_a_finite_bound(shared_data, capsys):
    uai = shared_data / "uai"
    code = main(["infer", str(uai / "Pedigree_12.uai"), "--evid",
                 str(uai / "Pedigree_12.uai.evid"), "--engine", "meanfield", "--task", "PR"])
    out = capsys.readouterr().out.split()
    assert code == 0 and out[0] == "PR"
    assert -math.inf < float(out[1]) <= -11.4554 + 1e-4


# -- no feasible point found: a flag, a warning, exit 2 -----------------------------------------
def test_no_feasible_point_found_warns_and_flags():
    g = _not_equal()
    with pytest.warns(InfeasibleWarning, match="no configuration of positive probability"):
        r = get_engine("meanfield", search_nodes=0)(g)
    assert r.info["feasible"] is False
    assert math.isinf(float(r.elbo))


def _write_not_equal_uai(path):
    path.write_text("MARKOV\n2\n2 2\n1\n2 0 1\n\n4\n0 1 1 0\n")
    return str(path)


def test_cli_exits_2_with_one_line_when_meanfield_finds_no_feasible_point(tmp_path, capsys):
    model = _write_not_equal_uai(tmp_path / "neq.uai")
    code = main(["infer", model, "--engine", "meanfield[search_nodes=0]", "--task", "PR"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no configuration of positive probability" in lines[0]
    assert main(["infer", model, "--engine", "meanfield", "--task", "PR"]) == 0
    assert capsys.readouterr().out.split() == ["PR", "0"]


# -- probability zero: the same error from every engine -----------------------------------------
def _all_inf():
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 3)
    g.add(Table(a, torch.zeros(2, dtype=F64)),
          Table([a, b], torch.full((2, 3), float("-inf"), dtype=F64)))
    return g


def _contradiction():
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 2)
    g.add(SparseTable([a, b], [[0, 1]], torch.zeros(1, dtype=F64)),
          SparseTable([a, b], [[1, 0]], torch.zeros(1, dtype=F64)))
    return g


def _k4_three_colouring():
    g = FactorGraph()
    vs = [g.variable(f"v{i}", 3) for i in range(4)]
    differ = torch.zeros(3, 3, dtype=F64).fill_diagonal_(float("-inf"))
    for i in range(4):
        for j in range(i + 1, 4):
            g.add(Table([vs[i], vs[j]], differ))
    return g


def _impossible_constant():
    g = FactorGraph()
    a = g.variable("a", 2)
    g.add(Table(a, torch.zeros(2, dtype=F64)), Table([], torch.tensor(float("-inf"), dtype=F64)))
    return g


@pytest.mark.parametrize("build,evidence,message", [
    (_all_inf, None, "the model gives every configuration probability zero"),
    (_contradiction, None, "the model gives every configuration probability zero"),
    (_k4_three_colouring, None, "the model gives every configuration probability zero"),
    (_impossible_constant, None, "the model gives every configuration probability zero"),
    (_not_equal, {"a": 1, "b": 1}, "the evidence has probability zero"),
])
def test_probability_zero_is_the_same_error_from_every_engine(build, evidence, message):
    g = build()
    engines = [get_engine("exact"), get_engine("bruteforce"),
               *(get_engine("meanfield", schedule=s) for s in SCHEDULES)]
    for engine in engines:
        with pytest.raises(ZeroProbabilityError, match=message):
            engine(g, evidence)


# -- random small graphs: exact finite <=> mean-field finite ------------------------------------
@st.composite
def _hard_specs(draw):
    n = draw(st.integers(1, 5))
    cards = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    scopes = []
    for _ in range(draw(st.integers(1, 6))):
        arity = draw(st.integers(1, min(3, n)))
        scopes.append(tuple(draw(st.permutations(range(n)))[:arity]))
    return cards, scopes, draw(st.integers(0, 2**16)), draw(st.sampled_from([0.3, 0.5, 0.7]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_hard_specs())
def test_meanfield_is_finite_exactly_where_log_z_is(spec):
    g = build_graph(spec)
    try:
        log_z = float(get_engine("bruteforce")(g).log_z)
    except ZeroProbabilityError:
        log_z = None
    for schedule in SCHEDULES:
        if log_z is None:
            with pytest.raises(ZeroProbabilityError):
                get_engine("meanfield", schedule=schedule)(g)
            continue
        r = _meanfield(g, schedule=schedule, damping=0.2, max_iter=20, tol=0.0)
        assert -math.inf < float(r.elbo) <= log_z + 1e-9
        elbos = [float(e["elbo"]) for e in r.trace]
        assert all(math.isfinite(e) for e in elbos)
        if schedule == "sequential":
            assert all(b >= a - 1e-9 for a, b in zip(elbos, elbos[1:])), elbos


# -- synchronous non-convergence -----------------------------------------------------------------
def _antiferromagnetic_grid(n=4, coupling=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    x = [[g.variable(f"x{i}_{j}", 2) for j in range(n)] for i in range(n)]
    pair = torch.tensor([[0.0, coupling], [coupling, 0.0]], dtype=F64)  # neighbours differ
    for i in range(n):
        for j in range(n):
            g.add(Table(x[i][j], 0.1 * torch.randn(2, generator=gen, dtype=F64)))
            if i + 1 < n:
                g.add(Table([x[i][j], x[i + 1][j]], pair))
            if j + 1 < n:
                g.add(Table([x[i][j], x[i][j + 1]], pair))
    return g


def test_oscillating_synchronous_schedule_warns():
    g = _antiferromagnetic_grid()
    with pytest.warns(NotConvergedWarning, match="did not converge"):
        sync = get_engine("meanfield", schedule="synchronous")(g)
    seq = _meanfield(g, schedule="sequential")  # converges: no warning
    assert sync.info["converged"] is False and seq.info["converged"] is True
    assert float(sync.elbo) < float(seq.elbo) - 10
    # a fixed number of sweeps (tol = 0, the paper's test time) asks for no convergence
    _meanfield(g, schedule="synchronous", tol=0.0, max_iter=10)


# -- dtypes and constant factors -------------------------------------------------------------------
def _mixed(dtype_unary, dtype_pair, dtype_sparse):
    gen = torch.Generator().manual_seed(1)
    g = FactorGraph()
    a, b, c = g.variable("a", 2), g.variable("b", 3), g.variable("c", 2)
    g.add(Table(a, torch.randn(2, generator=gen, dtype=F64).to(dtype_unary)),
          Table([a, b], torch.randn(2, 3, generator=gen, dtype=F64).to(dtype_pair)),
          SparseTable([b, c], [[0, 0], [1, 1], [2, 0]],
                      torch.randn(3, generator=gen, dtype=F64).to(dtype_sparse)))
    return g


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mixed_float32_float64_tables(schedule):
    g = _mixed(torch.float32, F64, torch.float32)
    ref = _mixed(torch.float32, F64, torch.float32)  # the same values, all in float64
    for f in ref.factors:
        if isinstance(f, Table):
            f.log_potential = f.log_potential.double()
        else:
            f.values = f.values.double()
    r = _meanfield(g, schedule=schedule)
    expected = _meanfield(ref, schedule=schedule)
    assert r.elbo.dtype == F64
    assert torch.allclose(r.elbo, expected.elbo, atol=1e-12)
    for name, p in expected.marginals.items():
        assert torch.allclose(r.marginals[name], p, atol=1e-12)
    assert float(r.elbo) <= float(get_engine("exact")(g).log_z) + 1e-9


def test_mixed_dtypes_keep_gradients_of_the_float32_tensor():
    g = _mixed(torch.float32, F64, F64)
    unary = g.factors[0].log_potential.requires_grad_(True)
    get_engine("meanfield")(g).elbo.backward()
    assert unary.grad is not None and unary.grad.dtype == torch.float32


def test_mixed_dtypes_in_a_temporal_field():
    from fieldlib import BlockDomain

    gen = torch.Generator().manual_seed(2)
    tuples = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 0]])
    dom = BlockDomain({"c": 2, "o": 3}, tuples)
    g = FactorGraph()
    x = g.array("x", 4, dom)
    i = g.variable("I", 3)
    g.add(Component(x, ("o",), torch.randn(4, 3, generator=gen, dtype=F64)),
          FrameIntent(x, i, torch.randn(4, 3, 3, generator=gen, dtype=torch.float32),
                      component="o"),
          KernelTemporal(x, torch.randn(3, 3, generator=gen, dtype=torch.float32), kernel=2.0,
                         component="o"))
    for schedule in SCHEDULES:
        r = _meanfield(g, schedule=schedule, max_iter=50, damping=0.3)
        assert r.elbo.dtype == F64
        assert float(r.elbo) <= float(get_engine("exact")(g).log_z) + 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_constant_table_over_no_variable_adds_to_the_elbo(schedule):
    gen = torch.Generator().manual_seed(3)
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 3)
    g.add(Table(a, torch.randn(2, generator=gen, dtype=F64)),
          Table(b, torch.randn(3, generator=gen, dtype=F64)))
    without = _meanfield(g, schedule=schedule)
    g.add(Table([], torch.tensor(0.7, dtype=F64)))
    r = _meanfield(g, schedule=schedule)
    assert torch.allclose(r.elbo, without.elbo + 0.7, atol=1e-12)
    assert torch.allclose(r.elbo, get_engine("exact")(g).log_z, atol=1e-12)  # no coupling
    assert float(r.trace[-1]["elbo"]) == pytest.approx(float(r.elbo), abs=1e-12)


def test_batched_constant_table_over_no_variable():
    g = FactorGraph()
    a = g.variable("a", 2)
    g.add(Table(a, torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=F64)),
          Table([], torch.tensor([0.5, -1.0], dtype=F64)))
    r = _meanfield(g)
    assert torch.allclose(r.elbo, get_engine("exact")(g).log_z, atol=1e-12)


def test_half_precision_tables_are_computed_in_float32():
    """As the exact engines: float16 / bfloat16 tables are upcast, and say so."""
    import torch

    from fieldlib import FactorGraph, Table
    from fieldlib.inference import get_engine

    for dtype in (torch.float16, torch.bfloat16):
        g = FactorGraph()
        x, y = g.variable("x", 3), g.variable("y", 3)
        g.add(Table(x, torch.tensor([0.0, 2.0, -1.0], dtype=dtype)),
              Table([x, y], torch.tensor([[1.0, 0, 0], [0, 1.5, 0], [0, 0, 1]], dtype=dtype)))
        r = get_engine("meanfield")(g)
        exact = get_engine("exact")(g)
        assert r.info["compute_dtype"] == "float32" and r.elbo.dtype == torch.float32
        assert float(r.elbo) <= float(exact.log_z) + 1e-5
        assert abs(float(r.marginals["x"].sum()) - 1.0) < 1e-6
