"""The stored-message protocol (fieldlib.factors.stored): a user's coupled factor type joins
the ``async`` engine and ``asynchronous_step`` beside KernelTemporal and FrameIntent, and the
intent's own factors get their gradient in the step (MATH.md §4-6)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors import FrameIntent, KernelTemporal, Table
from fieldlib.inference import Coupled, MessageStore, asynchronous_step, get_engine
from fieldlib.inference.asynchronous import frame_potentials
from fieldlib.inference.check import toy_temporal_field
from fieldlib.inference.losses import closed_form_gradients

F64 = torch.float64
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_factor.py"


@functools.cache
def _example():
    """examples/custom_factor.py: PottsChain, a user's factor type with stored messages."""
    spec = importlib.util.spec_from_file_location("custom_factor_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _field(seed, *, potts=0.5, prior=True, weak=True, frames=5):
    """A toy temporal field plus the user's PottsChain and a prior table on the intent."""
    g, params, labels = toy_temporal_field(seed, frames=frames)
    if weak:
        with torch.no_grad():
            params["mu.mu"].mul_(0.3)
            params["phi_xi.table"].mul_(0.3)
    x = g.arrays["x"]
    if potts is not None:
        strength = torch.tensor(potts, dtype=F64, requires_grad=True)
        g.add(_example().PottsChain(x, strength, name="potts"))
        params["potts.strength"] = strength
    if prior:
        fi = next(f for f in g.factors if isinstance(f, FrameIntent))
        gen = torch.Generator().manual_seed(100 + seed)
        log_prior = torch.randn(fi.intent.cardinality, generator=gen, dtype=F64)
        log_prior.requires_grad_(True)
        g.add(Table(fi.intent, log_prior, name="prior"))
        params["prior.log_potential"] = log_prior
    return g, params, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_engine_with_a_users_coupled_type_reaches_the_meanfield_fixed_point(seed, order):
    g, _, labels = _field(seed)
    mf = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    eng = get_engine("async", order=order, tol=1e-13)
    for evidence in (None, labels):
        a, m = eng(g, evidence), mf(g, evidence)
        assert a.info["converged"]
        for k in ("x", "I"):
            assert float((a.marginals[k] - m.marginals[k]).abs().max()) < 1e-10, k
        assert abs(float(a.elbo.detach()) - float(m.elbo.detach())) < 1e-10


def test_the_users_coupling_changes_the_answer():
    """Not a no-op: the Potts factor moves the marginals, in both engines alike."""
    with_potts, _, _ = _field(0, potts=1.5)
    without, _, _ = _field(0, potts=None)
    eng = get_engine("async", tol=1e-13)
    gap = float((eng(with_potts).marginals["x"] - eng(without).marginals["x"]).abs().max())
    assert gap > 1e-2


def _fresh_stores(g, q, labels):
    """One store per coupled factor holding every frame's message from the marginals ``q``
    (capacity T, d = 1, h = the number averaged: the exact sums)."""
    x = g.arrays["x"]
    t = x.size
    stores = []
    for f in g.factors:
        coupling = f.stored_coupling()
        if coupling is None:
            continue
        inputs = f.stored_inputs(1)
        fields = coupling.fields()
        store = MessageStore({k: v[0] for k, v in fields.items()},
                             temporal=[k for k, v in fields.items() if v[1]], capacity=t,
                             kernel=inputs.kernel or 1.0, discount=1.0, scale="count",
                             dtype=F64)
        params = {k: v[0].detach() for k, v in inputs.frame.items()}
        params.update({k: v.detach().expand(t, *v.shape[1:]) for k, v in
                       inputs.sequence.items()})
        times = torch.arange(t, dtype=F64) if inputs.times is None else inputs.times[0]
        with torch.no_grad():
            store.write([0] * t, torch.arange(t), times, coupling.send(q, labels, **params), 0)
        stores.append((f, coupling, store, times))
    return stores


def _grads(scalar, params):
    gs = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), gs)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_with_a_users_coupling_and_a_prior_gives_the_closed_form_rows(seed):
    """Fresh messages (every other frame's current marginals): the step's gradients over a
    sequence's frames equal closed_form_gradients(form="frame") for every parameter: the
    built-in factors', the user's PottsChain strength and the intent prior's (each frame
    carrying 1/T of it through ``sequence_frames``)."""
    g, params, labels = _field(seed, weak=False)
    mf = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    free, target = mf(g).marginals, mf(g, labels).marginals
    closed = closed_form_gradients(g, free, target, form="frame", l2_intent=0.01)
    x = g.arrays["x"]
    t = x.size
    stores = _fresh_stores(g, free["x"], labels["x"])
    kt = next(f for f in g.factors if isinstance(f, KernelTemporal))
    fi = next(f for f in g.factors if isinstance(f, FrameIntent))
    (potts, coupling, potts_store, times), = [e for e in stores if e[0].name == "potts"]
    intent_store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality,
                                               capacity=t, kernel=kt.kernel, discount=1.0,
                                               scale="count", dtype=F64)
    with torch.no_grad():
        m = dict(kt.stored_coupling().send(free["x"], labels["x"]))
        m.update(fi.stored_coupling().send(free["x"], labels["x"], table=fi.table.detach()))
    intent_store.write([0] * t, torch.arange(t), kt.times, m, 0)
    unary, latent = frame_potentials(g)
    user = Coupled(coupling, {"strength": potts.strength.expand(t)}, store=potts_store)
    step = asynchronous_step(intent_store, [0] * t, torch.arange(t), kt.times, unary[0],
                             labels["x"], mu=kt.mu, mu_component=kt.state_component,
                             phi_xi=fi.table, xi_component=fi.state_component,
                             intent_unary=latent["I"].expand(t, -1), sequence_frames=t,
                             couplings=[user], inner_iterations=300, l2_intent=0.01,
                             write=False)
    assert torch.allclose(step.q, free["x"], atol=1e-12)
    got = _grads(step.loss, params)
    for k in params:
        assert k in closed, k
        err = float((closed[k] - got[k]).abs().max())
        assert err < 1e-11, (k, err)
    assert float(got["potts.strength"].abs()) > 1e-3  # a gradient that can fail


def test_a_prior_without_sequence_frames_is_a_constant_of_the_step():
    g, params, labels = _field(0)
    kt = next(f for f in g.factors if isinstance(f, KernelTemporal))
    fi = next(f for f in g.factors if isinstance(f, FrameIntent))
    store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality, capacity=5,
                                        kernel=kt.kernel, dtype=F64)
    unary, latent = frame_potentials(g)
    prior = params["prior.log_potential"]
    step = asynchronous_step(store, [0], [0], kt.times[:1], unary[0, :1], labels["x"][:1],
                             mu=kt.mu, mu_component=kt.state_component, phi_xi=fi.table[:1],
                             xi_component=fi.state_component,
                             intent_unary=latent["I"][:, :].expand(1, -1), write=False)
    (grad,) = torch.autograd.grad(step.loss, [prior], allow_unused=True)
    assert grad is None


def test_two_couplings_sending_one_field_to_one_store_is_refused():
    g, _, labels = _field(0, potts=0.5, prior=False)
    x = g.arrays["x"]
    potts = next(f for f in g.factors if f.name == "potts")
    d = x.cardinality
    store = MessageStore({"P": (d,), "P_star": (d,)}, capacity=5, kernel=1.0, dtype=F64)
    twice = [Coupled(potts.stored_coupling(), {"strength": potts.strength.expand(1)})] * 2
    unary, _ = frame_potentials(g)
    with pytest.raises(FieldlibError, match="own store"):
        asynchronous_step(store, [0], [0], [0.0], unary[0, :1], labels["x"][:1],
                          couplings=twice)
    assert len(store) == 0  # nothing written


def test_engine_refuses_two_coupled_factors_on_one_latent():
    g, params, _ = _field(0, potts=None, prior=False)
    fi = next(f for f in g.factors if isinstance(f, FrameIntent))
    g.add(FrameIntent(g.arrays["x"], fi.intent, fi.table.detach().clone(), component="o",
                      name="again"))
    with pytest.raises(FieldlibError, match="coupled by two factors"):
        get_engine("async")(g)


def test_engine_refuses_a_non_finite_intent_table():
    g, params, _ = _field(0, potts=None, prior=False)
    with torch.no_grad():
        params["phi_xi.table"][0, 0, 0] = float("-inf")
    with pytest.raises(FieldlibError, match="finite"):
        get_engine("async")(g)
