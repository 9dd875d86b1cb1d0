"""Loopy belief propagation (the ``bp`` engine): exact on trees against the exact engine
(hypothesis, large log-potentials and -inf entries), loopy graphs, schedules and damping,
evidence, batching and padding, MAP, options and the command line."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_padding_batch import _field  # the padding tests' batched temporal field

from fieldlib import FactorGraph, FieldlibError, Table
from fieldlib.cli import main
from fieldlib.errors import ZeroProbabilityError
from fieldlib.inference import (
    BPNotConvergedWarning,
    NotConvergedWarning,
    engine_options,
    get_engine,
)
from fieldlib.inference.check import gradient_error, marginal_error
from fieldlib.io import TableModel, write_uai

D = torch.float64
INF = float("-inf")


# -- random factor trees --------------------------------------------------------------------
@st.composite
def trees(draw, max_vars: int = 7):
    """``(cards, scopes, seed, scale, zero_prob)`` of a factor tree: each new factor joins
    one variable already placed to one or two new ones; random unaries on top."""
    n = draw(st.integers(1, max_vars))
    cards = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    scopes, i = [], 1
    while i < n:
        parent = draw(st.integers(0, i - 1))
        arity = draw(st.integers(2, min(3, n - i + 1)))
        scopes.append(tuple(draw(st.permutations([parent, *range(i, i + arity - 1)]))))
        i += arity - 1
    scopes += [(u,) for u in draw(st.lists(st.integers(0, n - 1), max_size=n))]
    return (cards, scopes, draw(st.integers(0, 2**16)), draw(st.sampled_from([1.0, 300.0])),
            draw(st.sampled_from([0.0, 0.15, 0.4])))


def build(cards, scopes, seed, scale=1.0, zero_prob=0.0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph(dtype=D)
    vs = [g.variable(f"v{i}", c) for i, c in enumerate(cards)]
    tables = []
    for k, scope in enumerate(scopes):
        shape = ((batch,) if batch else ()) + tuple(cards[i] for i in scope)
        t = torch.randn(shape, generator=gen, dtype=D) * scale
        t = t.masked_fill(torch.rand(shape, generator=gen, dtype=D) < zero_prob, INF)
        tables.append(t)
        g.add(Table([vs[i] for i in scope], t, name=f"f{k}"))
    return g, tables


def joint_scores(cards, scopes, tables) -> torch.Tensor:
    """Every joint configuration's score, flattened in C order (the test's own oracle)."""
    total = torch.zeros(cards, dtype=D)
    for scope, t in zip(scopes, tables):
        order = sorted(range(len(scope)), key=lambda a: scope[a])
        view = [1] * len(cards)
        for a in order:
            view[scope[a]] = cards[scope[a]]
        total = total + t.permute(order).reshape(view)
    return total.flatten()


def assert_same(bp, ex, atol=1e-8):
    assert marginal_error(ex.marginals, bp.marginals) <= atol
    for name, p in ex.marginals.items():
        torch.testing.assert_close(bp.marginals[name], p, atol=atol, rtol=0)
    torch.testing.assert_close(bp.log_z, ex.log_z, atol=atol, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(spec=trees(), schedule=st.sampled_from(["parallel", "sequential"]))
def test_exact_on_random_trees(spec, schedule):
    cards, scopes, seed, scale, zero_prob = spec
    g, tables = build(cards, scopes, seed, scale, zero_prob)
    exact, bp = get_engine("exact"), get_engine("bp", schedule=schedule)
    try:
        ex = exact(g, factor_marginals=True, map=True)
    except ZeroProbabilityError as err:
        with pytest.raises(ZeroProbabilityError) as info:
            bp(g)
        assert str(info.value) == str(err)
        return
    r = bp(g, factor_marginals=True, map=True)
    assert r.info["converged"] and r.info["map_converged"]
    assert_same(r, ex)
    for name, ts in ex.factor_marginals.items():
        for a, b in zip(r.factor_marginals[name], ts):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=0)
    scores = joint_scores(cards, scopes, tables)
    top = torch.topk(scores, min(2, len(scores))).values
    torch.testing.assert_close(r.map_score, ex.map_score, atol=1e-8, rtol=1e-12)
    if len(top) == 1 or float(top[0] - top[1]) > 1e-6:  # a unique MAP
        assert {k: int(v) for k, v in r.map.items()} == {k: int(v) for k, v in ex.map.items()}


def _chain(n=8, card=3):
    return [card] * n, [(i, i + 1) for i in range(n - 1)] + [(i,) for i in range(n)]


def _star(leaves=6):
    return [4] + [2, 3] * (leaves // 2), [(0, i) for i in range(1, leaves + 1)] + [(0,)]


@pytest.mark.parametrize("shape", [_chain, _star])
@pytest.mark.parametrize("scale,zero_prob", [(1.0, 0.0), (400.0, 0.0), (50.0, 0.3)])
def test_chains_and_stars_batched(shape, scale, zero_prob):
    cards, scopes = shape()
    g, _ = build(cards, scopes, seed=7, scale=scale, zero_prob=zero_prob, batch=3)
    ex = get_engine("exact")(g, map=True)
    for schedule in ("parallel", "sequential"):
        r = get_engine("bp", schedule=schedule)(g, map=True)
        assert_same(r, ex)
        assert r.log_z.shape == (3,) and r.info["converged"]
        torch.testing.assert_close(r.map_score, ex.map_score, atol=1e-8, rtol=1e-12)


def test_shapes_are_stacked_into_groups():
    """(2, 3) and (3, 2) tables share one canonical group; every chain link is one group."""
    g = FactorGraph()
    a, b, c = g.variable("a", 2), g.variable("b", 3), g.variable("c", 2)
    g.add(Table([a, b], torch.randn(2, 3, dtype=D)), Table([b, c], torch.randn(3, 2, dtype=D)))
    r = get_engine("bp")(g, factor_marginals=True)
    assert r.info["groups"] == [(3, 2)]
    assert_same(r, get_engine("exact")(g))
    assert r.factor_marginals["table1"][0].shape == (3, 2)
    cards, scopes = _chain(20, 2)
    assert get_engine("bp")(build(cards, scopes, 0)[0]).info["groups"] == [(2, 2)]


def test_bethe_gradient_is_the_exact_gradient_on_trees():
    """d(-F)/dθ = the BP factor marginals: on a tree, autograd of log Z (as `fieldlib
    gradcheck` compares engines)."""
    cards, scopes = _star(4)
    g, tables = build(cards, scopes, seed=3, scale=2.0)
    for t in tables:
        t.requires_grad_(True)
    grads = {}
    for name in ("exact", "bp"):
        r = get_engine(name)(g)
        grads[name] = torch.autograd.grad(r.log_z, tables)
    for ge, gb in zip(grads["exact"], grads["bp"]):
        err, cos = gradient_error(ge, gb)
        assert err < 1e-10 and cos > 1 - 1e-12


def test_all_impossible_rows_give_no_nan():
    """A state ruled out everywhere (an all -inf row) gets probability 0, not NaN."""
    g = FactorGraph()
    a, b, c = g.variable("a", 3), g.variable("b", 2), g.variable("c", 2)
    t = torch.randn(3, 2, dtype=D)
    t[1] = INF
    g.add(Table([a, b], t), Table([b, c], torch.tensor([[0.0, INF], [INF, 0.0]], dtype=D)),
          Table([a], torch.tensor([INF, 0.0, 1.0], dtype=D)))
    r = get_engine("bp")(g, factor_marginals=True, map=True)
    assert_same(r, get_engine("exact")(g))
    assert float(r.marginals["a"][1]) == 0.0 and float(r.marginals["a"][0]) == 0.0
    for m in [*r.marginals.values(), *r.factor_marginals["table0"]]:
        assert not torch.isnan(m).any()


# -- evidence -------------------------------------------------------------------------------
def test_evidence_on_a_tree_and_impossible_evidence():
    cards, scopes = _star(4)
    g, tables = build(cards, scopes, seed=11, scale=3.0, zero_prob=0.2)
    bp, exact = get_engine("bp"), get_engine("exact")
    for evidence in ({"v1": 1}, {"v0": 2, "v3": 0}, {"v2": torch.tensor([0, 1, 1])}):
        try:
            ex = exact(g, evidence, factor_marginals=True)
        except ZeroProbabilityError:
            continue
        r = bp(g, evidence, factor_marginals=True)
        assert_same(r, ex)
        for name, ts in ex.factor_marginals.items():
            for a, b in zip(r.factor_marginals[name], ts):
                torch.testing.assert_close(a, b, atol=1e-8, rtol=0)
    # a state every table rules out, observed: the exact engine's error, word for word
    t = tables[0].detach().clone()
    t[:, 1] = INF
    g2 = FactorGraph()
    vs = [g2.variable(f"v{i}", c) for i, c in enumerate(cards)]
    g2.add(Table([vs[0], vs[1]], t), *[Table([vs[i] for i in s], x)
                                        for s, x in zip(scopes[1:], tables[1:])])
    with pytest.raises(ZeroProbabilityError) as ex_err:
        exact(g2, {"v1": 1})
    with pytest.raises(ZeroProbabilityError) as bp_err:
        bp(g2, {"v1": 1})
    assert str(bp_err.value) == str(ex_err.value) == "the evidence has probability zero"
    with pytest.raises(ZeroProbabilityError, match=r"\(batch element 1\)"):
        bp(g2, {"v1": torch.tensor([0, 1])})


def test_impossible_evidence_on_a_loop_is_proved():
    """x != y on a triangle of binary variables: observing x0 forces x1 and x2 to be equal,
    which their own factor forbids; BP's supports prove it (they are sound on any graph)."""
    g = FactorGraph()
    x = [g.variable(f"x{i}", 2) for i in range(3)]
    neq = torch.tensor([[INF, 0.0], [0.0, INF]], dtype=D)
    g.add(*[Table([x[i], x[(i + 1) % 3]], neq) for i in range(3)])
    for schedule in ("parallel", "sequential"):
        with pytest.raises(ZeroProbabilityError, match="the evidence has probability zero"):
            get_engine("bp", schedule=schedule)(g, {"x0": 0})


# -- loopy graphs ---------------------------------------------------------------------------
def _grid(n=3, coupling=0.1, seed=0, batch=None):
    scopes = [(r * n + c,) for r in range(n) for c in range(n)]
    scopes += [(r * n + c, r * n + c + 1) for r in range(n) for c in range(n - 1)]
    scopes += [(r * n + c, (r + 1) * n + c) for r in range(n - 1) for c in range(n)]
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    vs = [g.variable(f"v{i}", 2) for i in range(n * n)]
    lead = (batch,) if batch else ()
    for s in scopes:
        scale = 1.0 if len(s) == 1 else coupling
        g.add(Table([vs[i] for i in s], scale * torch.randn(*lead, *[2] * len(s),
                                                             generator=gen, dtype=D)))
    return g


def test_loopy_grid_weak_coupling_is_close_to_exact():
    g = _grid(coupling=0.1)
    ex = get_engine("exact")(g)
    fixed = None
    for spec in ("bp", "bp[schedule=sequential]", "bp[damping=0.5]",
                 "bp[schedule=sequential,damping=0.3]"):
        r = get_engine(spec)(g, factor_marginals=True)
        assert r.info["converged"], spec
        for p in r.marginals.values():
            torch.testing.assert_close(p.sum(-1), torch.ones((), dtype=D))
        for ts in r.factor_marginals.values():
            torch.testing.assert_close(ts[0].sum(), torch.ones((), dtype=D))
        assert marginal_error(ex.marginals, r.marginals) < 1e-3
        assert abs(float(r.log_z - ex.log_z)) < 1e-3
        fixed = fixed or r  # every schedule and damping finds the same (unique) fixed point
        assert marginal_error(fixed.marginals, r.marginals) < 1e-6
        assert abs(float(r.log_z - fixed.log_z)) < 1e-6


def reference_bp(cards, scopes, tables, iterations, semiring):
    """Parallel loopy BP written plainly, one message at a time (the test's oracle)."""
    def norm(m):
        s = torch.logsumexp(m, -1) if semiring == "sum" else m.max()
        return m - s if torch.isfinite(s) else m

    theta = [torch.zeros(c, dtype=D) for c in cards]
    factors = []
    for s, t in zip(scopes, tables):
        if len(s) == 1:
            theta[s[0]] = theta[s[0]] + t
        else:
            factors.append((s, t))
    m = {(f, v): norm(torch.zeros(cards[v], dtype=D)) for f, (s, _) in enumerate(factors)
         for v in s}
    for _ in range(iterations):
        mu = {(f, v): norm(theta[v] + sum((m[(g, v)] for g, (s2, _) in enumerate(factors)
                                           if g != f and v in s2), torch.zeros((), dtype=D)))
              for f, (s, _) in enumerate(factors) for v in s}
        new = {}
        for f, (s, t) in enumerate(factors):
            for j, v in enumerate(s):
                x = t.clone()
                for i, u in enumerate(s):
                    if i != j:
                        shape = [1] * len(s)
                        shape[i] = cards[u]
                        x = x + mu[(f, u)].view(shape)
                dims = tuple(a for a in range(len(s)) if a != j)
                new[(f, v)] = norm(torch.logsumexp(x, dims) if semiring == "sum"
                                   else x.amax(dims))
        m = new
    return [torch.softmax(theta[v] + sum((m[(f, v)] for f, (s, _) in enumerate(factors)
                                          if v in s), torch.zeros((), dtype=D)), -1)
            for v in range(len(cards))]


@pytest.mark.parametrize("semiring", ["sum", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loopy_messages_equal_a_plain_implementation(semiring, seed):
    """Mixed arities and cardinalities, cycles, -inf entries: after k parallel iterations
    the stacked messages equal the one-message-at-a-time reference."""
    cards = [2, 3, 2, 4, 2, 3]
    scopes = [(0, 1), (1, 2), (2, 0), (2, 3, 4), (4, 5), (5, 0), (3,), (1, 3), (5, 1), (3, 1)]
    g, tables = build(cards, scopes, seed, scale=2.0, zero_prob=0.15)
    for k in (1, 4):
        ref = reference_bp(cards, scopes, tables, k, semiring)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BPNotConvergedWarning)
            try:
                r = get_engine("bp", max_iter=k, tol=0, semiring=semiring)(g)
            except ZeroProbabilityError:
                assert any(bool((p == 0).all()) or bool(torch.isnan(p).all()) for p in ref)
                continue
        for i, p in enumerate(ref):
            torch.testing.assert_close(r.marginals[f"v{i}"], p, atol=1e-12, rtol=0)


def test_not_converged_warns_and_says_so():
    g = _grid(n=4, coupling=3.0, seed=1)
    with pytest.warns(BPNotConvergedWarning, match="did not converge in 3 iterations"):
        r = get_engine("bp", max_iter=3)(g, map=True)
    assert r.info["converged"] is False and r.info["iterations"] == 3
    assert r.info["max_change"] > 1e-8 and len(r.trace) == 3
    assert issubclass(BPNotConvergedWarning, NotConvergedWarning)
    assert not torch.isnan(r.log_z)


def test_max_semiring_gives_max_marginals_and_map():
    cards, scopes = _chain(6, 3)
    g, tables = build(cards, scopes, seed=5, scale=2.0)
    r = get_engine("bp", semiring="max")(g, map=True)
    ex = get_engine("exact")(g, marginals=False, map=True)
    assert r.log_z is None
    assert {k: int(v) for k, v in r.map.items()} == {k: int(v) for k, v in ex.map.items()}
    torch.testing.assert_close(r.map_score, ex.map_score)
    for p in r.marginals.values():
        torch.testing.assert_close(p.sum(-1), torch.ones((), dtype=D))
    # a max-marginal: the best score with the variable fixed, normalised
    scores = joint_scores(cards, scopes, tables).view(cards)
    best = scores.amax(dim=(1, 2, 3, 4, 5))
    torch.testing.assert_close(r.marginals["v0"], torch.softmax(best, 0))


# -- batching and padding -------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=3), seed=st.integers(0, 999),
       schedule=st.sampled_from(["parallel", "sequential"]))
def test_batch_of_n_equals_n_single_calls_with_padding(lengths, seed, schedule):
    """A loopy temporal field: each element stops on its own, so the batch is its singles."""
    gen = torch.Generator().manual_seed(seed)
    n, t, s, k = len(lengths), 4, 2, 2
    unary = torch.randn(n, t, s, generator=gen, dtype=D)
    psi = 0.5 * torch.randn(n, t, s, k, generator=gen, dtype=D)
    mu = 0.5 * torch.randn(s, s, generator=gen, dtype=D)
    eng = get_engine("bp", schedule=schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BPNotConvergedWarning)
        batch = eng(_field(unary, psi, mu, lengths=torch.tensor(lengths)), map=True)
        for b, length in enumerate(lengths):
            if length == 0:
                assert float(batch.marginals["x"][b].abs().sum()) == 0.0
                assert (batch.map["x"][b] == -1).all()
                torch.testing.assert_close(batch.log_z[b], torch.tensor(k, dtype=D).log())
                continue
            one = eng(_field(unary[b:b + 1, :length], psi[b:b + 1, :length], mu), map=True)
            torch.testing.assert_close(batch.log_z[b], one.log_z[0], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(batch.marginals["x"][b, :length], one.marginals["x"][0],
                                       atol=1e-10, rtol=0)
            torch.testing.assert_close(batch.marginals["I"][b], one.marginals["I"][0],
                                       atol=1e-10, rtol=0)
            assert float(batch.marginals["x"][b, length:].abs().sum()) == 0.0
            assert (batch.map["x"][b, length:] == -1).all()
            assert torch.equal(batch.map["x"][b, :length], one.map["x"][0])
            torch.testing.assert_close(batch.map_score[b], one.map_score[0])


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_padded_chains_are_exact(lengths, seed):
    """A padded chain (a tree): BP equals the exact engine on the padded batch."""
    gen = torch.Generator().manual_seed(seed)
    n, t, s = len(lengths), 5, 3
    g = FactorGraph()
    x = g.array("x", t, s, lengths=torch.tensor(lengths))
    g.add(Table(x, 3 * torch.randn(n, t, s, generator=gen, dtype=D)))
    for i in range(t - 1):
        g.add(Table([x[i], x[i + 1]], 3 * torch.randn(n, s, s, generator=gen, dtype=D)))
    r, ex = get_engine("bp")(g, map=True), get_engine("exact")(g, map=True)
    assert_same(r, ex)
    assert torch.equal(r.map["x"], ex.map["x"])


# -- options and the command line -----------------------------------------------------------
def test_options_are_declared_and_checked():
    names = [o.name for o in engine_options("bp")]
    assert names == ["max_iter", "tol", "damping", "schedule", "semiring"]
    assert all(o.help for o in engine_options("bp"))
    e = get_engine("bp[schedule=sequential,damping=0.5,max_iter=7,tol=1e-6,semiring=max]")
    assert (e.schedule, e.damping, e.max_iter, e.tol, e.semiring) == (
        "sequential", 0.5, 7, 1e-6, "max")
    with pytest.raises(FieldlibError, match=r"no option 'dampin' \(did you mean 'damping'"):
        get_engine("bp[dampin=0.5]")
    for bad, match in ((dict(damping=1.0), "damping must lie in"),
                       (dict(schedule="random"), "unknown schedule"),
                       (dict(semiring="min"), "unknown semiring"),
                       (dict(max_iter=0), "max_iter must be"), (dict(tol=-1.0), "tol must")):
        with pytest.raises(FieldlibError, match=match):
            get_engine("bp", **bad)


@pytest.fixture
def tree_uai(tmp_path):
    rng = np.random.default_rng(0)
    cards = [2, 3, 2, 2]
    scopes = [(0,), (0, 1), (1, 2), (1, 3)]
    tables = [rng.random(tuple(cards[v] for v in s)) + 0.1 for s in scopes]
    path = tmp_path / "m.uai"
    write_uai(path, TableModel(cards, scopes, tables))
    return path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_infer_with_bp(capsys, tree_uai):
    exact = {}
    for task in ("MAR", "PR", "MAP"):
        code, out, err = _cli(capsys, "infer", tree_uai, "--task", task)
        assert code == 0
        exact[task] = out.split()[1:]
    for extra in ([], ["-O", "damping=0.5"], ["-O", "schedule=sequential"]):
        code, out, err = _cli(capsys, "infer", tree_uai, "--task", "MAR", "--engine", "bp",
                              *extra)
        assert code == 0 and err == "" and out.startswith("MAR\n")
        np.testing.assert_allclose([float(v) for v in out.split()[1:]],
                                   [float(v) for v in exact["MAR"]], atol=1e-8)
    code, out, _ = _cli(capsys, "infer", tree_uai, "--task", "PR", "--engine", "bp")
    assert code == 0 and float(out.split()[1]) == pytest.approx(float(exact["PR"][0]),
                                                                 abs=1e-9)
    code, out, _ = _cli(capsys, "infer", tree_uai, "--task", "MAP", "--engine", "bp")
    assert code == 0 and out.split()[1:] == exact["MAP"]
    code, out, err = _cli(capsys, "infer", tree_uai, "--task", "MAR", "--engine", "bp",
                          "-O", "dampin=0.5")
    assert code == 2 and out == "" and len(err.strip().split("\n")) == 1
    assert err.startswith("fieldlib: error: engine 'bp' has no option 'dampin'")
    code, out, err = _cli(capsys, "infer", tree_uai, "--task", "MAR", "--engine",
                          "bp[damping=2]")
    assert code == 2 and err.strip() == "fieldlib: error: damping must lie in [0, 1), got 2.0"


def test_cli_not_converged_is_one_warning_line(capsys, tmp_path):
    g = _grid(n=4, coupling=3.0, seed=1)
    cards = [2] * 16
    scopes = [tuple(int(v.name[1:]) for v in f.variables()) for f in g.factors]
    tables = [np.exp(f.log_potential.numpy()) for f in g.factors]
    path = tmp_path / "grid.uai"
    write_uai(path, TableModel(cards, scopes, tables))
    code, out, err = _cli(capsys, "infer", path, "--task", "MAR", "--engine", "bp",
                          "-O", "max_iter=2")
    assert code == 0 and out.startswith("MAR")
    assert err.startswith("fieldlib: warning: loopy BP") and err.count("\n") == 1
    assert math.isfinite(sum(float(v) for v in out.split()[2:]))


@pytest.mark.parametrize("labelled", [False, True])
def test_gradcheck_style_comparison_against_exact_holds_on_a_tree(labelled):
    """check.compare takes the bp engine (its Bethe log Z and its own NLL): on a tree every
    row must hold; on a loopy grid the estimate row is reported, not required."""
    from fieldlib.inference.check import compare

    cards, scopes = _star()
    g, tables = build(cards, scopes, seed=3)
    for t in tables:
        t.requires_grad_(True)
    params = {f"f{k}.log_potential": t for k, t in enumerate(tables)}
    labels = {"v1": 1, "v2": 0} if labelled else None
    report = compare(g, labels, params=params, engine=get_engine("bp", tol=1e-12),
                     name="bp vs exact", expect_exact=True)
    assert report.ok, report.table()
    assert sum(r.must_hold for r in report.rows) == len(params) + 1
    grid_cards = [2] * 9
    grid = [(i, i + 1) for i in range(9) if i % 3 != 2] + [(i, i + 3) for i in range(6)]
    loopy, _ = build(grid_cards, grid + [(i,) for i in range(9)], seed=4, scale=2.0)
    report = compare(loopy, engine=get_engine("bp", damping=0.5, max_iter=500), params={})
    assert report.rows[0].quantity == "marginals, log Z vs estimate"
    assert not report.rows[0].must_hold and report.rows[0].tv > 0
