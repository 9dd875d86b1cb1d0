"""FieldDistribution: the field as a torch distribution, checked against enumeration.

The oracle here is independent of the engines: every joint configuration is scored from the
graph's dense terms (padding clamps included) and normalised by logsumexp. Samples are
checked with a chi-square test at a fixed seed (tolerance: the 1 - 1e-4 quantile of the
chi-square distribution), entropy, log_prob, marginal log_prob, KL and MAP against the
enumeration, and the approximate engines for saying what they return.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings

from fieldlib import FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.errors import (
    EvidenceError,
    FieldlibError,
    TooLargeError,
    UnsupportedQueryError,
    ZeroProbabilityError,
)
from fieldlib.inference import (
    ApproximateFieldWarning,
    FieldDistribution,
    VariableElimination,
    exact_nll,
    get_engine,
)
from tests.random_graphs import build_graph, graph_specs

D = torch.float64
FEW = settings(max_examples=12, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))


# -- the oracle -------------------------------------------------------------------------
def enumerate_joint(graph, evidence=None):
    """``(configs (K, V), log_p (N, K))`` over every joint state of every variable (graph
    order), from the dense terms alone; -inf off the evidence."""
    vs = list(graph.variables.values())
    configs = torch.tensor(list(itertools.product(*[range(v.cardinality) for v in vs])),
                           dtype=torch.long).reshape(-1, len(vs))
    ev = graph.evidence(evidence)
    n, _ = graph.batch_of(ev)
    score = torch.zeros(n, len(configs), dtype=D)
    for term in graph.terms():
        idx = tuple(configs[:, graph.index(v)] for v in term.variables)
        table = term.table if term.batched else term.table.expand(n, *term.table.shape)
        score = score + table[(slice(None), *idx)]
    for v, s in ev.items():
        score = score.masked_fill(configs[:, graph.index(v)] != s.expand(n)[:, None],
                                  -math.inf)
    return configs, score - torch.logsumexp(score, -1, keepdim=True)


def padded_as_zero(x):
    return x.clamp_min(0)


def config_index(x, graph):
    """Mixed-radix index of full assignments (..., V) in enumerate_joint's order."""
    cards = [v.cardinality for v in graph.variables.values()]
    idx = torch.zeros(x.shape[:-1], dtype=torch.long)
    for j, c in enumerate(cards):
        idx = idx * c + x[..., j]
    return idx


def chi_square_ok(samples_idx, log_p, k):
    """Chi-square goodness of fit of the sampled indices to exp(log_p); impossible states
    must never appear. Cells with expected count < 5 are pooled."""
    counts = torch.bincount(samples_idx, minlength=k).double()
    p = log_p.exp()
    assert counts[p == 0].sum() == 0, "a state of probability zero was sampled"
    expected = p * len(samples_idx)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (p > 0)].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big & (p > 0)].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(len(obs) - 1, 1)
    limit = scipy.stats.chi2.ppf(1 - 1e-4, df)
    assert stat < limit, f"chi-square {stat:.1f} above {limit:.1f} (df {df})"


def temporal_field(lengths=(4, 2, 3), t=4, s=3, k=2, seed=0, grad=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    unary = torch.randn(n, t, s, generator=gen, dtype=D)
    unary[0, 1, 2] = -math.inf                           # an impossible frame state
    unary = unary.to(device).requires_grad_(grad)
    psi = torch.randn(t, s, k, generator=gen, dtype=D).to(device)
    mu = torch.randn(s, s, generator=gen, dtype=D).to(device)
    g = FactorGraph()
    x = g.array("x", t, s, lengths=torch.tensor(lengths))
    intent = g.variable("I", k)
    g.add(Table(x, unary), FrameIntent(x, intent, psi), KernelTemporal(x, mu, kernel=2.0))
    return g, unary


# -- torch's contract ---------------------------------------------------------------------
def test_shapes_constraints_and_validation():
    g, _ = temporal_field()
    d = FieldDistribution(g, validate_args=True)
    assert isinstance(d, torch.distributions.Distribution)
    assert d.batch_shape == (3,) and d.event_shape == (5,)
    assert set(d.arg_constraints) == {"log_potentials"}
    assert d.support.is_discrete and d.support.event_dim == 1
    x = d.sample((7,))
    assert x.shape == (7, 3, 5) and x.dtype == torch.long
    assert bool(d.support.check(x).all())
    assert d.log_prob(x).shape == (7, 3)
    bad = x.clone()
    bad[0, 0, 0] = 3                                      # outside 0..2
    with pytest.raises(ValueError):
        d.log_prob(bad)
    loose = FieldDistribution(g, validate_args=False)
    assert torch.isneginf(loose.log_prob(bad)[0, 0])     # without validation: -inf
    nan = FactorGraph()
    v = nan.variable("v", 2)
    nan.add(Table(v, torch.tensor([0.0, 1.0], dtype=D)))
    nan.factors[0].log_potential = torch.tensor([0.0, math.nan], dtype=D)
    with pytest.raises(ValueError, match="log_potential"):
        FieldDistribution(nan, validate_args=True)
    plain = FactorGraph()
    w = plain.variable("w", 3)
    plain.add(Table(w, torch.tensor([0.0, -math.inf, 1.0], dtype=D)))
    p = FieldDistribution(plain)
    assert p.batch_shape == () and p.event_shape == (1,)
    assert p.sample((4,)).shape == (4, 1) and p.log_prob(torch.tensor([1])).isneginf()


@FEW
@given(graph_specs(max_vars=4, max_card=3, max_factors=5))
def test_log_prob_entropy_mode_equal_enumeration(spec):
    g = build_graph(spec)
    configs, log_p = enumerate_joint(g)
    if not torch.isfinite(torch.logsumexp(log_p, -1)).all():
        return
    d = FieldDistribution(g)
    lp = d.log_prob(configs)
    torch.testing.assert_close(lp, log_p[0])
    assert not torch.isnan(lp).any()
    p = log_p[0].exp()
    torch.testing.assert_close(d.entropy(), -(torch.special.xlogy(p, p)).sum())
    assert float(lp[config_index(d.mode, g)]) == pytest.approx(float(lp.max()), abs=1e-12)
    torch.testing.assert_close(d.log_partition, get_engine("bruteforce").log_partition(g))
    support = d.enumerate_support()
    assert len(support) == len(configs)
    torch.testing.assert_close(torch.logsumexp(d.log_prob(support), 0),
                               torch.zeros((), dtype=D), atol=1e-12, rtol=0)


def test_batch_evidence_padding_against_enumeration():
    g, _ = temporal_field()
    evidence = {"x[0]": torch.tensor([1, 2, 0])}
    configs, log_p = enumerate_joint(g, evidence)
    d = FieldDistribution(g, evidence)
    lp = d.log_prob(configs[:, None, :])                  # (K, N): padded entries read 0
    torch.testing.assert_close(lp, log_p.t())
    p = log_p.exp()
    torch.testing.assert_close(d.entropy(), -(torch.special.xlogy(p, p)).sum(-1))
    for b in range(3):                                    # batch of N == N single fields
        single = FieldDistribution(_element(g, b), {"x[0]": int(evidence["x[0]"][b])})
        torch.testing.assert_close(single.entropy(), d.entropy()[b])


def _element(g, b):
    """Batch element b of temporal_field's graph as an unbatched graph of its own length."""
    f_unary, f_psi, f_mu = g.factors
    length = int(g.arrays["x"].lengths[b])
    h = FactorGraph()
    x = h.array("x", length, 3)
    intent = h.variable("I", 2)
    h.add(Table(x, f_unary.log_potential[b, :length]),
          FrameIntent(x, intent, f_psi.table[:length]),
          KernelTemporal(x, f_mu.mu, kernel=2.0))
    return h


# -- sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["auto", "opt_einsum:greedy"])
def test_sample_frequencies_chi_square(order):
    g, _ = temporal_field()
    evidence = {"x[2]": torch.tensor([0, -1, 1])}         # -1: padding in element 1
    configs, log_p = enumerate_joint(g, evidence)
    d = FieldDistribution(g, evidence, engine=VariableElimination(order=order))
    torch.manual_seed(1234)
    x = d.sample((20000,))
    assert x.shape == (20000, 3, 5)
    assert torch.equal(x[..., 2], torch.tensor([0, -1, 1]).expand(20000, 3))  # evidence
    lengths = g.arrays["x"].lengths
    for b in range(3):                                    # padding reads -1, and only it
        assert bool((x[:, b, int(lengths[b]):4] == -1).all())
        assert bool((x[:, b, : int(lengths[b])] >= 0).all())
        chi_square_ok(config_index(padded_as_zero(x[:, b]), g), log_p[b], len(configs))
    assert torch.isfinite(d.log_prob(x)).all()            # never an impossible state


SPEC = ([2, 3, 2, 3], [(0, 1), (1, 2, 3), (3, 0), (2,)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_random_graphs_with_zeros(seed):
    g = build_graph((*SPEC, seed, 0.1))                  # 15-36 of 36 states possible
    configs, log_p = enumerate_joint(g)
    torch.manual_seed(seed)
    x = FieldDistribution(g).sample((8000,))
    chi_square_ok(config_index(x, g), log_p[0], len(configs))


def test_chi_square_has_power():
    """The same test rejects draws from a slightly different field (its tolerance is not
    so loose that anything passes): the ternary table moved by 0.3 N(0, 1) nats."""
    g, moved = build_graph((*SPEC, 0, 0.1)), build_graph((*SPEC, 0, 0.1))
    t = moved.factors[1].log_potential
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    moved.factors[1].log_potential = t + 0.3 * noise
    configs, log_p = enumerate_joint(g)
    torch.manual_seed(0)
    x = FieldDistribution(moved).sample((8000,))
    with pytest.raises(AssertionError, match="chi-square"):
        chi_square_ok(config_index(x, g), log_p[0], len(configs))


def test_partial_evidence_leaves_elements_free():
    """Evidence with -1 in some batch elements (unobserved there): those elements are
    free, the others conditioned."""
    g, _ = temporal_field()
    evidence = {"x[0]": torch.tensor([1, -1, 0])}
    try:
        g.evidence(evidence)
    except EvidenceError:
        pytest.skip("this graph takes no partial evidence")
    d = FieldDistribution(g, evidence)
    free, cond = FieldDistribution(g), FieldDistribution(g, {"x[0]": torch.tensor([1, 0, 0])})
    torch.testing.assert_close(d.entropy()[1], free.entropy()[1])
    torch.testing.assert_close(d.entropy()[[0, 2]], cond.entropy()[[0, 2]])
    torch.manual_seed(0)
    x = d.sample((3000,))
    assert bool((x[:, 0, 0] == 1).all() and (x[:, 2, 0] == 0).all())
    configs, log_p = enumerate_joint(g)
    chi_square_ok(config_index(padded_as_zero(x[:, 1]), g), log_p[1], len(configs))
    lp = d.log_prob(configs[:, None, :])
    torch.testing.assert_close(torch.logsumexp(lp, 0), torch.zeros(3, dtype=D),
                               atol=1e-12, rtol=0)


def test_uncovered_observed_and_bruteforce():
    g = FactorGraph()
    g.variable("a", 3)                                    # a: in no factor
    b = g.variable("b", 2)
    g.add(Table(b, torch.tensor([0.0, 1.0], dtype=D)))
    torch.manual_seed(0)
    x = FieldDistribution(g).sample((6000,))
    configs, log_p = enumerate_joint(g)
    chi_square_ok(config_index(x, g), log_p[0], len(configs))
    fixed = FieldDistribution(g, {"a": 1, "b": 0})        # nothing left to draw
    assert torch.equal(fixed.sample((2,)), torch.tensor([[1, 0], [1, 0]]))
    assert float(fixed.entropy()) == 0.0
    brute = FieldDistribution(g, engine="bruteforce")
    torch.testing.assert_close(brute.log_prob(configs), log_p[0])


def test_large_cancelling_potentials_sample_exactly():
    """Potentials of hundreds of nats that cancel across factors: log space keeps them."""
    g = FactorGraph()
    a, b, c = g.variable("a", 3), g.variable("b", 3), g.variable("c", 2)
    big = 600.0 * torch.eye(3, dtype=D)
    g.add(Table([a, b], big + 0.3 * torch.randn(3, 3, dtype=D)),
          Table([b, a], -big.t()), Table([b, c], torch.randn(3, 2, dtype=D)))
    configs, log_p = enumerate_joint(g)
    torch.manual_seed(7)
    x = FieldDistribution(g).sample((10000,))
    chi_square_ok(config_index(x, g), log_p[0], len(configs))


def test_long_chain_batched_sampling_matches_marginals():
    """A 60-step chain, batch 4, padded: samples' frequencies agree with exact marginals."""
    n, t, s = 4, 60, 3
    gen = torch.Generator().manual_seed(5)
    g = FactorGraph()
    x = g.array("x", t, s, lengths=torch.tensor([60, 41, 7, 0]))
    g.add(Table(x, torch.randn(n, t, s, generator=gen, dtype=D)))
    trans = torch.randn(s, s, generator=gen, dtype=D)
    trans[0, 2] = -math.inf
    for i in range(t - 1):
        g.add(Table([x[i], x[i + 1]], trans))
    d = FieldDistribution(g)
    torch.manual_seed(0)
    draws = d.sample((4000,))
    freq = torch.nn.functional.one_hot(draws.clamp_min(0), s).double().mean(0)
    freq = freq * (draws[0] >= 0)[..., None]
    assert (freq - d.marginals["x"]).abs().max() < 0.05
    pairs = (draws[..., :-1] == 0) & (draws[..., 1:] == 2)
    assert not bool(pairs.any())                          # the -inf transition never
    assert bool((draws[:, 3] == -1).all())                # an empty sequence: all padding


def test_impossible_and_refusals():
    g = FactorGraph()
    a, b = g.variable("a", 2), g.variable("b", 2)
    g.add(Table([a, b], torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=D)))
    d = FieldDistribution(g)
    lp = d.log_prob(torch.tensor([[0, 1], [1, 1]]))
    assert torch.isneginf(lp[0]) and torch.isfinite(lp[1]) and not torch.isnan(lp).any()
    dead = FieldDistribution(g, {"a": 0, "b": 1})
    with pytest.raises(ZeroProbabilityError, match="evidence has probability zero"):
        dead.sample()
    with pytest.raises(ZeroProbabilityError):
        dead.entropy()
    tiny = FieldDistribution(g, engine=VariableElimination(memory_budget=1024))
    with pytest.raises(TooLargeError, match="bytes"):
        tiny.sample((10,))
    small = FieldDistribution(g, max_support=3)
    with pytest.raises(TooLargeError, match="max_support"):
        small.enumerate_support()


def test_gradients_flow_and_stay_finite():
    g, unary = temporal_field(grad=True)
    d = FieldDistribution(g)
    x = d.sample((5,))
    lp = d.log_prob(x).sum()
    (grad,) = torch.autograd.grad(lp, unary)
    assert torch.isfinite(grad).all()
    # entropy: autograd through the marginals (double backward) == enumeration's gradient
    (g_h,) = torch.autograd.grad(FieldDistribution(g).entropy().sum(), unary)
    _, log_p = enumerate_joint(g)
    m = torch.isfinite(log_p)
    (g_ref,) = torch.autograd.grad(-(log_p[m].exp() * log_p[m]).sum(), unary)
    torch.testing.assert_close(g_h, g_ref)


# -- marginal log-probabilities and latent variables ---------------------------------------
def test_latent_variables_give_the_marginal_likelihood():
    g, _ = temporal_field()
    labels = torch.tensor([[0, 1, 2, 1], [2, 1, -1, -1], [0, 0, 1, -1]])
    d = FieldDistribution(g, variables="x")               # the intent is latent
    assert d.event_shape == (4,)
    torch.testing.assert_close(d.log_prob(labels), -exact_nll(g, {"x": labels}))
    configs, log_p = enumerate_joint(g)
    torch.testing.assert_close(torch.logsumexp(d.log_prob(d.enumerate_support()), 0),
                               torch.zeros(3, dtype=D), atol=1e-12, rtol=0)
    full = FieldDistribution(g)
    torch.testing.assert_close(full.log_prob({"x": labels}), d.log_prob(labels))
    # a dict naming a subset: its marginal, over sample dims too
    x0 = torch.tensor([[0, 1, 2], [2, 0, 1]])             # (S=2, N=3)
    i0 = torch.tensor([[0, 1, 1], [1, 0, 0]])
    got = full.log_prob({"x[0]": x0, "I": i0})
    sel = (configs[:, 0] == x0[..., None]) & (configs[:, 4] == i0[..., None])
    want = torch.logsumexp(log_p[None].expand(2, 3, -1).masked_fill(~sel, -math.inf), -1)
    torch.testing.assert_close(got, want)
    s = d.sample((3,))
    assert s.shape == (3, 3, 4) and torch.isfinite(d.log_prob(s)).all()
    with pytest.raises(UnsupportedQueryError):
        d.entropy()
    with pytest.raises(UnsupportedQueryError):
        d.mode  # noqa: B018


# -- KL divergence ------------------------------------------------------------------------
def test_kl_divergence_registered_and_exact():
    gen = torch.Generator().manual_seed(2)
    def field(scale):
        g = FactorGraph()
        a, b, c = g.variable("a", 2), g.variable("b", 3), g.variable("c", 2)
        t = torch.randn(2, 3, generator=gen, dtype=D) * scale
        g.add(Table([a, b], t), Table([b, c], torch.randn(3, 2, generator=gen, dtype=D)))
        return g
    gp, gq = field(1.0), field(2.0)
    gq.add(Table(gq.variables["a"], torch.tensor([0.0, 0.5], dtype=D)))   # another scope
    p, q = FieldDistribution(gp), FieldDistribution(gq)
    _, lp = enumerate_joint(gp)
    _, lq = enumerate_joint(gq)
    want = (lp.exp() * (lp - lq)).sum()
    kl = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(torch.distributions.kl_divergence(p, p),
                               torch.zeros((), dtype=D), atol=1e-12, rtol=0)
    cond = FieldDistribution(gq, {"b": 1})                # q forbids b != 1: KL(p||q) = inf
    assert torch.isposinf(torch.distributions.kl_divergence(p, cond))
    pc = FieldDistribution(gp, {"b": 1})
    _, lpc = enumerate_joint(gp, {"b": 1})
    _, lqc = enumerate_joint(gq, {"b": 1})
    m = lpc.exp() > 0
    want = (lpc.exp()[m] * (lpc[m] - lqc[m])).sum()
    torch.testing.assert_close(torch.distributions.kl_divergence(pc, cond), want)
    with pytest.raises(UnsupportedQueryError):
        torch.distributions.kl_divergence(p, FieldDistribution(gq, engine="meanfield"))
    other = FactorGraph()
    other.variable("a", 2)
    with pytest.raises(FieldlibError, match="same variables"):
        torch.distributions.kl_divergence(p, FieldDistribution(other))


# -- approximate engines say what they give ---------------------------------------------------
def test_meanfield_is_an_honest_approximation():
    g, _ = temporal_field()
    exact = FieldDistribution(g)
    mf = FieldDistribution(g, engine="meanfield")
    assert not mf.exact and exact.exact
    assert mf.log_partition_kind == "lower bound (ELBO)"
    assert mf.log_prob_kind.startswith("upper bound")
    assert mf.sample_kind.startswith("approximate")
    assert bool((mf.log_partition <= exact.log_partition + 1e-9).all())
    x = exact.sample((50,))
    with pytest.warns(ApproximateFieldWarning, match="upper bound"):
        bound = mf.log_prob(x)
    assert bool((bound >= exact.log_prob(x) - 1e-9).all())
    q = {k: v for k, v in mf.marginals.items()}
    with pytest.warns(ApproximateFieldWarning, match="product"):
        torch.manual_seed(3)
        draws = mf.sample((20000,))
    freq = torch.nn.functional.one_hot(draws[..., :4].clamp_min(0), 3).double().mean(0)
    assert (freq * (draws[0, :, :4] >= 0)[..., None] - q["x"]).abs().max() < 0.02
    assert (torch.nn.functional.one_hot(draws[..., 4], 2).double().mean(0)
            - q["I"]).abs().max() < 0.02
    with pytest.warns(ApproximateFieldWarning, match="H\\(Q\\)"):
        h = mf.entropy()
    hq = -(torch.special.xlogy(q["x"], q["x"]).sum((-1, -2))
           + torch.special.xlogy(q["I"], q["I"]).sum(-1))
    torch.testing.assert_close(h, hq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateFieldWarning)
        mode = mf.mode
    assert torch.equal(mode[..., 4], q["I"].argmax(-1))
    with pytest.raises(UnsupportedQueryError, match="exact engine"):
        FieldDistribution(g, engine="meanfield", variables="x")
    with pytest.raises(UnsupportedQueryError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ApproximateFieldWarning)
            mf.log_prob({"x[0]": torch.tensor([0, 0, 0])})


def test_to_dict_and_enumerate_shapes():
    g, _ = temporal_field(lengths=(4, 4))
    d = FieldDistribution(g)
    x = d.sample((2,))
    parts = d.to_dict(x)
    assert parts["x"].shape == (2, 2, 4) and parts["I"].shape == (2, 2)
    torch.testing.assert_close(d.log_prob(parts), d.log_prob(x))
    assert d.enumerate_support(expand=False).shape == (3**4 * 2, 1, 5)
    assert d.enumerate_support().shape == (3**4 * 2, 2, 5)
    padded, _ = temporal_field(lengths=(4, 2))
    pd = FieldDistribution(padded, validate_args=True)
    support = pd.enumerate_support()                      # lock-step over the batch
    assert support.shape == (3**4 * 2, 2, 5)
    lp = pd.log_prob(support)
    torch.testing.assert_close(torch.logsumexp(lp, 0), torch.zeros(2, dtype=D),
                               atol=1e-12, rtol=0)
    assert int(torch.isfinite(lp[:, 1]).sum()) <= 3**2 * 2   # padding: only its clamp


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sampling_on_the_tensors_device():
    g, _ = temporal_field(device="cuda")
    d = FieldDistribution(g)
    x = d.sample((1000,))
    assert x.device.type == "cuda"
    assert torch.isfinite(d.log_prob(x)).all()
