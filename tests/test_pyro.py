"""pyro takes a FieldDistribution: as a likelihood trained with SVI (equal, step for step, to
training on fieldlib's exact NLL), with a prior on a potential fitted by an autoguide, and
as an enumerated latent site under TraceEnum_ELBO; infer_discrete through ``enumerated()``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate, infer_discrete
from pyro.infer.autoguide import AutoNormal
from pyro.nn.module import to_pyro_module_
from pyro.ops.indexing import Vindex

from fieldlib import FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.inference import FieldDistribution, exact_nll, get_engine

D = torch.float64
N, T, S, F, K = 5, 6, 3, 4, 2
ENGINE = get_engine("exact")


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(N, T, F, generator=gen, dtype=D)
    lengths = torch.tensor([6, 4, 5, 6, 2])
    labels = torch.randint(0, S, (N, T), generator=gen)
    labels[torch.arange(T) >= lengths[:, None]] = -1      # padding reads -1
    return feats, lengths, labels


class Potentials(torch.nn.Module):
    """Frame unaries from features, a transition table, frame-intent tables (the intent
    is latent: never labelled)."""

    def __init__(self):
        super().__init__()
        self.unary = torch.nn.Linear(F, S).double()
        self.trans = torch.nn.Parameter(torch.zeros(S, S, dtype=D))
        self.psi = torch.nn.Parameter(0.1 * torch.ones(S, K, dtype=D))

    def forward(self, feats, lengths):
        """The field's graph (a PyroModule registers its parameters inside ``__call__``)."""
        g = FactorGraph()
        x = g.array("x", T, S, lengths=lengths)
        intent = g.variable("I", K)
        g.add(Table(x, self.unary(feats)), FrameIntent(x, intent, self.psi.expand(T, S, K)))
        for t in range(T - 1):
            g.add(Table([x[t], x[t + 1]], self.trans))
        return g


def _svi_run(net, feats, lengths, labels, steps, register):
    def model(feats, lengths, labels):
        module = pyro.module("crf", net) if register else net
        field = FieldDistribution(module(feats, lengths), engine=ENGINE, variables="x")
        with pyro.plate("sequences", N):
            pyro.sample("y", field, obs=labels)

    def guide(feats, lengths, labels):
        pass

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    return [svi.step(feats, lengths, labels) for _ in range(steps)]


@pytest.mark.parametrize("style", ["pyro.module", "PyroModule"])
def test_svi_equals_training_on_the_exact_nll(style):
    feats, lengths, labels = data()
    torch.manual_seed(1)
    net = Potentials()
    if style == "PyroModule":        # its parameters become pyro params, named by attribute
        to_pyro_module_(net)
    torch.manual_seed(1)
    ref = Potentials()
    torch.manual_seed(2)
    losses = _svi_run(net, feats, lengths, labels, 6, register=style == "pyro.module")
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    direct = []
    for _ in range(6):
        opt.zero_grad()
        loss = exact_nll(ref(feats, lengths), {"x": labels}, engine=ENGINE).sum()
        loss.backward()
        opt.step()
        direct.append(float(loss.detach()))
    assert losses == pytest.approx(direct, rel=1e-12)
    assert losses[-1] < losses[0]
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12, msg=name)
    names = set(pyro.get_param_store().keys())
    assert len(names) == len(list(ref.parameters()))     # every potential trained by pyro


def test_bayesian_mu_with_an_autoguide():
    """µ ~ N(0, 1) on the kernel coupling; AutoNormal fits its posterior from labelled
    sequences sampled from a field with a known µ."""
    gen = torch.Generator().manual_seed(4)
    n, t, s = 40, 5, 2
    unary = torch.randn(n, t, s, generator=gen, dtype=D)
    mu_true = torch.tensor([[1.5, -1.5], [-1.5, 1.5]], dtype=D)

    def field(mu):
        g = FactorGraph()
        x = g.array("x", t, s)
        g.add(Table(x, unary), KernelTemporal(x, mu, kernel=1.5))
        return FieldDistribution(g, engine=ENGINE)

    torch.manual_seed(0)
    labels = field(mu_true).sample()

    def model(labels):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(s, s, dtype=D), 1.0).to_event(2))
        with pyro.plate("sequences", n):
            pyro.sample("y", field(mu), obs=labels)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    pyro.set_rng_seed(0)
    losses = [svi.step(labels) for _ in range(150)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    post = guide.median()["mu"]
    # the diagonal (agreement) is credited, the off-diagonal penalised, as in mu_true
    assert float(post.diagonal().mean()) > float(post.fliplr().diagonal().mean()) + 0.5


def _latent_field(batch=None):
    gen = torch.Generator().manual_seed(3)
    g = FactorGraph()
    x = g.array("x", 3, 2)
    shape = (batch, 3, 2) if batch else (3, 2)
    g.add(Table(x, torch.randn(shape, generator=gen, dtype=D)),
          Table([x[0], x[1]], torch.randn(2, 2, generator=gen, dtype=D)),
          Table([x[1], x[2]], torch.tensor([[0.0, -math.inf], [0.3, 0.0]], dtype=D)))
    return g


MEANS = torch.tensor([-1.0, 1.0], dtype=D)


def test_trace_enum_elbo_sums_a_latent_field():
    """The field as a latent site, enumerated in parallel over its joint support; the
    loss is the exact -log p(obs) (enumeration of K = 2^3 states, so small fields only)."""
    g = _latent_field(batch=4)
    obs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=D)

    @config_enumerate
    def model():
        with pyro.plate("n", 4):
            z = pyro.sample("z", FieldDistribution(g, engine=ENGINE))
            pyro.sample("obs", dist.Normal(MEANS[z], 1.0).to_event(1), obs=obs)

    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    field = FieldDistribution(g)
    support = field.enumerate_support()                   # (8, 4, 3)
    joint = field.log_prob(support) + dist.Normal(MEANS[support], 1.0).log_prob(obs).sum(-1)
    assert loss == pytest.approx(float(-torch.logsumexp(joint, 0).sum()), rel=1e-12)


def test_infer_discrete_through_the_enumerated_categorical():
    """infer_discrete handles only scalar discrete sites (a field's event is a vector: its
    backward pass fails as it does for OneHotCategorical); ``enumerated()`` gives the
    field as one Categorical over its support, which it takes."""
    g = _latent_field()
    obs = torch.tensor([0.8, -0.3, 1.2], dtype=D)
    field = FieldDistribution(g)

    @config_enumerate
    def direct():
        z = pyro.sample("z", field)
        pyro.sample("obs", dist.Normal(MEANS[z], 1.0).to_event(1), obs=obs)

    @config_enumerate
    def one_hot():                                        # pyro's own vector-event site
        z = pyro.sample("z", dist.OneHotCategorical(torch.ones(3, dtype=D) / 3))
        pyro.sample("obs", dist.Normal(z @ torch.arange(3.0, dtype=D), 1.0), obs=obs[0])

    for fails in (direct, one_hot):
        with pytest.raises(ValueError, match="Invalid tensor shape"):
            pyro.poutine.trace(infer_discrete(fails, first_available_dim=-1,
                                              temperature=0)).get_trace()
    support, categorical = field.enumerated()

    @config_enumerate
    def model():
        k = pyro.sample("k", categorical)
        z = Vindex(support)[k]
        pyro.sample("obs", dist.Normal(MEANS[z], 1.0).to_event(1), obs=obs)
        return z

    best = infer_discrete(model, first_available_dim=-1, temperature=0)()
    joint = field.log_prob(support) + dist.Normal(MEANS[support], 1.0).log_prob(obs).sum(-1)
    assert torch.equal(best, support[joint.argmax()])
    torch.manual_seed(0)
    draws = torch.stack([infer_discrete(model, first_available_dim=-1)() for _ in range(300)])
    assert torch.isfinite(field.log_prob(draws)).all()   # posterior draws: possible states


def test_a_field_site_samples_in_a_model():
    g = _latent_field(batch=4)

    def model():
        with pyro.plate("n", 4):
            return pyro.sample("z", FieldDistribution(g, engine=ENGINE))

    trace = pyro.poutine.trace(model).get_trace()
    z = trace.nodes["z"]["value"]
    assert z.shape == (4, 3)
    trace.compute_log_prob()
    assert torch.isfinite(trace.nodes["z"]["log_prob"]).all()
    assert not bool(((z[:, 1] == 0) & (z[:, 2] == 1)).any())   # the -inf pair never
