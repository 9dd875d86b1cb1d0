"""Bad input gets a clear FieldlibError naming the problem, and loses nothing (issue 8, part 4).

Each test here failed on the code before the fix: a raw TypeError / RuntimeError / KeyError /
OverflowError, a silent coercion (2.7 frames, "3" states, 0.5 -> 0), or NaN marginals.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

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
    GaussianKernel,
    InvalidPotentialError,
    KernelSum,
    KernelTemporal,
    ShapeError,
    SparseTable,
    Table,
    UnknownVariableError,
)
from fieldlib.inference import get_engine

D = torch.float64
ENGINES = ["exact", "bruteforce", "meanfield"]


def _chain(n=None, t=3, s=2, seed=0, lengths=None):
    """A pairwise chain over an array x of t positions: unary + transition tables."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    g = FactorGraph()
    x = g.array("x", t, s, lengths=lengths)
    g.add(Table(x, torch.randn(*lead, t, s, generator=gen, dtype=D), name="unary"))
    for i in range(t - 1):
        g.add(Table([x[i], x[i + 1]], torch.randn(*lead, s, s, generator=gen, dtype=D),
                    name=f"step{i}"))
    return g


def _temporal(times=None, kernel=1.0, seed=1, dtype=D):
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    x = g.array("x", 3, 2)
    g.add(Table(x, torch.randn(3, 2, generator=gen, dtype=D).to(dtype)))
    g.add(KernelTemporal(x, torch.randn(2, 2, generator=gen, dtype=D).to(dtype), times=times,
                         kernel=kernel))
    return g


def _run(engine, graph, evidence=None, **kw):
    return get_engine(engine)(graph, evidence, **kw)


# -- exact engine: factor marginals, copies of a graph --------------------------------------
@pytest.mark.parametrize("engine", ["exact", "bruteforce"])
def test_factor_marginals_without_variable_marginals(engine):
    g = _chain()
    r = _run(engine, g, factor_marginals=True, marginals=False)
    both = _run(engine, g, factor_marginals=True)
    assert r.marginals is None
    for name, tables in both.factor_marginals.items():
        for a, b in zip(r.factor_marginals[name], tables):
            torch.testing.assert_close(a, b)


def _copies(g):
    buf = io.BytesIO()
    torch.save(g, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(g), "pickle": pickle.loads(pickle.dumps(g)),
            "torch.save": torch.load(buf, weights_only=False)}


def test_graph_copies_run_every_engine():
    g = _chain(seed=3)
    for how, h in _copies(g).items():
        for engine in ENGINES:
            a = _run(engine, g, {"x[1]": 1})
            b = _run(engine, h, {"x[1]": 1})
            for k in a.marginals:
                torch.testing.assert_close(a.marginals[k], b.marginals[k], msg=how)
        a = _run("exact", g, factor_marginals=True, map=True)
        b = _run("exact", h, factor_marginals=True, map=True)
        torch.testing.assert_close(a.log_z, b.log_z)
        torch.testing.assert_close(a.map["x"], b.map["x"])
        torch.testing.assert_close(a.factor_marginals["step0"], b.factor_marginals["step0"])
        # the copy's index is its own: the original's variables are foreign to it
        with pytest.raises(UnknownVariableError, match="not in this graph"):
            h.index(g.variables["x[0]"])


@pytest.mark.parametrize("engine", ["exact", "bruteforce"])
def test_factor_marginals_are_zero_on_padding(engine):
    """A chain of 4 with length 2 has one real transition, not 3."""
    g = _chain(n=2, t=4, lengths=[2, 4], seed=5)
    r = _run(engine, g, factor_marginals=True)
    expected = [sum(float(r.factor_marginals[f"step{i}"][0][b].sum()) for i in range(3))
                for b in range(2)]
    assert expected == pytest.approx([1.0, 3.0])
    single = _run(engine, _chain(n=2, t=4, seed=5), factor_marginals=True)
    torch.testing.assert_close(r.factor_marginals["step2"][0][1],
                               single.factor_marginals["step2"][0][1])
    assert float(r.factor_marginals["step1"][0][0].abs().sum()) == 0.0  # touches x[2]
    unary = r.factor_marginals["unary"]  # one term per position
    assert [float(unary[t][0].sum()) for t in range(4)] == pytest.approx([1, 1, 0, 0])


def test_kernel_factor_marginals_on_padding():
    gen = torch.Generator().manual_seed(2)
    g = FactorGraph()
    x = g.array("x", 4, 2, lengths=[2])
    g.add(KernelTemporal(x, torch.randn(1, 2, 2, generator=gen, dtype=D), kernel=1.0,
                         name="k"))
    r = _run("exact", g, factor_marginals=True, marginals=False)
    assert sum(float(t.sum()) for t in r.factor_marginals["k"]) == pytest.approx(1.0)


# -- KernelTemporal ---------------------------------------------------------------------------
@pytest.mark.parametrize("times", [[0.0, 1.0, math.inf], [0.0, math.inf, math.inf],
                                   [-math.inf, 0.0, 1.0], [0.0, math.nan, 1.0]])
def test_kernel_times_must_be_finite(times):
    with pytest.raises(ShapeError, match="finite"):
        _temporal(torch.tensor(times, dtype=D))


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_kernel_weights_must_be_finite(weight):
    with pytest.raises(FieldlibError, match="weight 1 is .*must be finite"):
        KernelSum([GaussianKernel(1.0), GaussianKernel(2.0)], torch.tensor([1.0, weight]))
    with pytest.raises(FieldlibError, match="real numbers"):
        KernelSum([GaussianKernel(1.0)], torch.tensor([1j]))
    with pytest.raises(FieldlibError, match="not callable"):
        KernelSum([GaussianKernel(1.0), 2.0])


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf, "3", True, None])
def test_kernel_sigma_must_be_finite_positive(sigma):
    with pytest.raises(FieldlibError):
        GaussianKernel(sigma)
    with pytest.raises(FieldlibError):
        _temporal(kernel=sigma)


def test_callable_kernel_must_be_finite():
    with pytest.raises(FieldlibError, match="kernel is inf at time difference 0"):
        _temporal(torch.tensor([0.0, 0.0, 1.0], dtype=D), kernel=lambda d: 1.0 / d.abs())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_sigmas_are_their_limits(engine, dtype):
    """σ = 1e-200 on equal times is the kernel [Δ = 0]; σ = 1e200 is 1: no 0/0, no overflow."""
    equal = torch.zeros(3, dtype=dtype)
    cases = [(equal, 1e-200, lambda d: (d == 0).to(d.dtype)),
             (None, 1e-200, lambda d: (d == 0).to(d.dtype)),
             (None, 1e200, lambda d: torch.ones_like(d))]
    for times, sigma, limit in cases:
        got = _run(engine, _temporal(times, sigma, dtype=dtype)).marginals["x"]
        want = _run(engine, _temporal(times, limit, dtype=dtype)).marginals["x"]
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want)


# -- evidence on padding: one rule for every engine --------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_evidence_on_padding_is_an_error(engine):
    g = _chain(n=2, t=3, lengths=[2, 3])
    with pytest.raises(EvidenceError, match=r"x\[2\]=1 in batch element 0.*padding"):
        _run(engine, g, {"x[2]": 1})
    with pytest.raises(EvidenceError, match=r"x\[2\]=1 in batch element 0.*padding"):
        _run(engine, g, {"x": torch.tensor([[0, 1, 1], [0, 1, 1]])})
    # -1 (what MAP reports there) and 0 (the clamp) mean padding: they change nothing
    observed = torch.tensor([[0, 1, 1], [0, 1, 1]])
    ref = _run(engine, g, {"x[0]": 0, "x[1]": 1, "x[2]": torch.tensor([0, 1])})
    for pad in (-1, 0):
        observed[0, 2] = pad
        r = _run(engine, g, {"x": observed})
        torch.testing.assert_close(r.marginals["x"], ref.marginals["x"])
        assert float(r.marginals["x"][0, 2].abs().sum()) == 0.0
    with pytest.raises(EvidenceError, match="outside its states"):
        _run(engine, g, {"x[2]": -1})  # -1 on a real position is no state
    if engine != "meanfield":  # a MAP result fed back as evidence
        best = _run(engine, g, map=True)
        assert int(best.map["x"][0, 2]) == -1
        again = _run(engine, g, {"x": best.map["x"]}, marginals=False)
        torch.testing.assert_close(again.log_z, best.map_score)


# -- API inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("card", [2.5, "3", True, math.nan, math.inf, None, 0, -2, [],
                                  torch.tensor([2, 3])])
def test_bad_cardinality(card):
    with pytest.raises(CardinalityError):
        FactorGraph().variable("v", card)
    with pytest.raises(CardinalityError):
        FactorGraph().array("x", 2, card)


def test_integral_cardinalities_and_labels():
    g = FactorGraph()
    assert g.variable("a", 3.0).cardinality == 3
    assert g.variable("b", torch.tensor(4)).cardinality == 4
    assert g.variable("c", ["lo", "hi"]).domain.labels == ["lo", "hi"]
    with pytest.raises(CardinalityError, match="distinct"):
        g.variable("d", ["lo", "lo"])
    with pytest.raises(ShapeError, match="size must be an integer"):
        g.array("x", True, 2)
    with pytest.raises(ShapeError, match="size must be an integer"):
        g.array("y", 2.5, 2)


@pytest.mark.parametrize("lengths", [[math.nan], [2.7], [], [True], [[1, 2]], [-1], [4],
                                     ["2"]])
def test_bad_lengths(lengths):
    with pytest.raises(ShapeError, match="lengths"):
        FactorGraph().array("x", 3, 2, lengths=lengths)


def test_integral_float_lengths_are_kept_exactly():
    a = FactorGraph().array("x", 3, 2, lengths=[2.0, 0.0])
    assert a.lengths.tolist() == [2, 0] and a.lengths.dtype == torch.long


@pytest.mark.parametrize("value, message", [
    ("1", "has no labels"),
    (None, "is None"),
    (2**70, "outside its states 0..1"),
    ([0, 2**70], "outside its states 0..1"),
    (torch.tensor([]), "is empty"),
    (torch.zeros(0, dtype=torch.long), "is empty"),
    (0.5, "must be integers"),
    (math.inf, "must be integers"),
    (True, "must be integers"),
    (torch.tensor([True, False]), "must be integers"),
    (1j, "must be integers"),
    (-1, "outside its states"),
    (2, "outside its states"),
])
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_evidence_values(engine, value, message):
    with pytest.raises(EvidenceError, match=message):
        _run(engine, _chain(), {"x[0]": value})


def test_bad_evidence_containers():
    g = _chain()
    with pytest.raises(EvidenceError, match="mapping"):
        g.evidence([("x[0]", 1)])
    with pytest.raises(UnknownVariableError, match="expected a Variable"):
        g.evidence({0: 1})
    with pytest.raises(EvidenceError, match="must be integers"):
        g.evidence({"x": [0, 1.5, 1]})


def _weather(n=None):
    g = FactorGraph()
    w = g.variable("w", ["sun", "rain", "snow"])
    days = g.array("days", 2, ["sun", "rain", "snow"])
    gen = torch.Generator().manual_seed(4)
    g.add(Table([w, days[0]], torch.randn(3, 3, generator=gen, dtype=D)),
          Table(days, torch.randn(2, 3, generator=gen, dtype=D)))
    return g


@pytest.mark.parametrize("engine", ENGINES)
def test_evidence_by_state_label(engine):
    g = _weather()
    by_label = _run(engine, g, {"w": "rain", "days": ["snow", "sun"]})
    by_index = _run(engine, g, {"w": 1, "days": [2, 0]})
    for k in by_index.marginals:
        torch.testing.assert_close(by_label.marginals[k], by_index.marginals[k])
    batch = _run(engine, g, {"w": ["rain", "sun"]})  # one label per batch element
    torch.testing.assert_close(batch.marginals["w"][:, 1], torch.tensor([1.0, 0.0], dtype=D))
    with pytest.raises(EvidenceError, match=r"'hail': not a state label of 'w'.*'sun', 'rain'"):
        _run(engine, g, {"w": "hail"})
    with pytest.raises(EvidenceError, match=r"not a state label of 'days\[1\]'|of 'days'"):
        _run(engine, g, {"days": ["sun", "fog"]})


@pytest.mark.parametrize("engine", ENGINES)
def test_conflicting_evidence(engine):
    g = _chain()
    with pytest.raises(EvidenceError, match=r"conflicting evidence for 'x\[1\]'.*'x'.*'x\[1\]'"):
        _run(engine, g, {"x": [0, 1, 1], "x[1]": 0})
    with pytest.raises(EvidenceError, match="conflicting"):
        _run(engine, g, {"x[1]": 1, g.variables["x[1]"]: 0})
    agree = _run(engine, g, {"x": [0, 1, 1], "x[1]": 1})
    once = _run(engine, g, {"x": [0, 1, 1]})
    torch.testing.assert_close(agree.marginals["x"], once.marginals["x"])


def _pair():
    g = FactorGraph()
    return g, g.variable("a", 3), g.variable("b", 3)


def test_sparse_table_configs():
    _, a, b = _pair()
    with pytest.raises(FieldlibError, match="configs must be integers, got 0.5"):
        SparseTable([a, b], [[0.5, 1.0]], torch.zeros(1, dtype=D))
    with pytest.raises(FieldlibError, match="no configurations"):
        SparseTable([a, b], torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=D))
    with pytest.raises(FieldlibError, match="no configurations"):
        SparseTable([a, b], [], torch.zeros(0, dtype=D))
    with pytest.raises(FieldlibError, match="must be integers"):
        SparseTable([a, b], [[True, False]], torch.zeros(1, dtype=D))
    with pytest.raises(FieldlibError, match="must be integers"):
        SparseTable([a, b], [["0", "1"]], torch.zeros(1, dtype=D))
    exact = SparseTable([a, b], [[0.0, 2.0]], torch.zeros(1, dtype=D))
    assert exact.configs.tolist() == [[0, 2]]


@pytest.mark.parametrize("make", [
    lambda a, b: Table(a, torch.zeros(3, dtype=torch.complex128)),
    lambda a, b: SparseTable([a, b], [[0, 1]], torch.zeros(1, dtype=torch.complex128)),
    lambda a, b: Table(a, torch.tensor([True, False, True])),
    lambda a, b: Table(a, None),
    lambda a, b: Table(a, "abc"),
])
def test_potentials_must_be_real(make):
    _, a, b = _pair()
    with pytest.raises(InvalidPotentialError, match="real"):
        make(a, b)


def test_complex_potentials_in_temporal_factors():
    g = FactorGraph()
    x, i = g.array("x", 2, 2), g.variable("I", 2)
    with pytest.raises(InvalidPotentialError, match="real"):
        FrameIntent(x, i, torch.zeros(2, 2, 2, dtype=torch.complex128))
    with pytest.raises(InvalidPotentialError, match="real"):
        KernelTemporal(x, torch.zeros(2, 2, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="real numbers"):
        KernelTemporal(x, torch.zeros(2, 2, dtype=D), times=torch.zeros(2, dtype=torch.cfloat))


def _block():
    g = FactorGraph()
    dom = BlockDomain({"c": 2, "o": 3}, [[0, 0], [1, 2], [0, 1]])
    return g.variable("f", dom)


@pytest.mark.parametrize("configs, error, message", [
    ([[5]], CardinalityError, r"configuration 0 has value 5 for component 'o', outside 0..2"),
    ([[1], [-1]], CardinalityError, r"configuration 1 has value -1"),
    ([[0.5]], FieldlibError, "must be integers"),
    (torch.zeros(0, 1, dtype=torch.long), FieldlibError, "no configurations"),
    ([[1], [1]], FieldlibError, "distinct"),
    ([[0, 1]], ShapeError, r"shape \(K, 1\)"),
])
def test_component_configs(configs, error, message):
    f = _block()
    k = len(configs)
    with pytest.raises(error, match=message):
        Component(f, ("o",), torch.zeros(k, dtype=D), configs=configs)


def test_component_configs_out_of_range_no_longer_collide():
    """o = 3 with c = 0 used to encode as (c=1, o=0): a silently wrong table."""
    g = FactorGraph()
    f = g.variable("f", BlockDomain({"c": 2, "o": 3}, [[0, 0], [1, 0]]))
    with pytest.raises(CardinalityError, match="outside 0..2"):
        Component(f, ("c", "o"), torch.zeros(1, dtype=D), configs=[[0, 3]])
    ok = Component(f, "o", torch.tensor([0.5, 1.0, 2.0], dtype=D))  # one name as a string
    assert ok.block_table().tolist() == [0.5, 0.5]


def test_block_tuples_are_not_rounded():
    with pytest.raises(FieldlibError, match="block tuples must be integers, got 0.5"):
        BlockDomain({"c": 2, "o": 3}, [[0.5, 1]])


# -- an empty video in a batch ------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_empty_sequence_in_a_batch(engine):
    gen = torch.Generator().manual_seed(7)
    unary = torch.randn(3, 3, 2, generator=gen, dtype=D)
    mu = torch.randn(2, 2, generator=gen, dtype=D)

    def field(u, lengths=None):
        g = FactorGraph()
        x = g.array("x", u.shape[1], 2, lengths=lengths)
        g.add(Table(x, u), KernelTemporal(x, mu, kernel=1.5))
        return g

    kw = {} if engine == "meanfield" else {"map": True}
    r = _run(engine, field(unary, lengths=[2, 0, 3]), **kw)
    z = r.log_z if r.log_z is not None else r.elbo
    assert float(z[1]) == 0.0
    assert float(r.marginals["x"][1].abs().sum()) == 0.0
    if engine != "meanfield":
        assert r.map["x"][1].tolist() == [-1, -1, -1]
        assert float(r.map_score[1]) == 0.0
    for b, length in ((0, 2), (2, 3)):
        single = _run(engine, field(unary[b:b + 1, :length]), **kw)
        zs = single.log_z if single.log_z is not None else single.elbo
        torch.testing.assert_close(z[b], zs[0])
        torch.testing.assert_close(r.marginals["x"][b, :length], single.marginals["x"][0])


@pytest.mark.parametrize("engine", ["exact", "bruteforce"])
def test_empty_sequence_with_an_intent(engine):
    """The intent stays a variable of the empty element: log Z is its own log-sum-exp."""
    gen = torch.Generator().manual_seed(8)
    g = FactorGraph()
    x = g.array("x", 2, 2, lengths=[0, 2])
    i = g.variable("I", 3)
    prior = torch.randn(3, generator=gen, dtype=D)
    g.add(Table(i, prior), FrameIntent(x, i, torch.randn(2, 2, 2, 3, generator=gen, dtype=D)))
    r = _run(engine, g)
    torch.testing.assert_close(r.log_z[0], torch.logsumexp(prior, 0))
    torch.testing.assert_close(r.marginals["I"][0], torch.softmax(prior, 0))
