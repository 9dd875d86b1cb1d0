"""Learning: exact NLL, the mean-field surrogate and its closed-form gradients (MATH.md §6)."""

from __future__ import annotations

import pytest
import torch

from fieldlib.inference import get_engine
from fieldlib.inference.check import gradient_error, toy_temporal_field
from fieldlib.inference.losses import (
    closed_form_gradients,
    exact_nll,
    factor_parameters,
    meanfield_loss,
    per_frame_mu_gradient,
)

F64 = torch.float64


def _grads(scalar, params):
    names = list(params)
    gs = torch.autograd.grad(scalar, [params[k] for k in names], allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(names, gs)}


def test_exact_nll_is_minus_log_sum_over_intent_by_brute_force():
    g, params, labels = toy_temporal_field(0)
    nll = exact_nll(g, labels)
    bf = get_engine("bruteforce")
    log_z = bf(g, marginals=False).log_z
    scores = torch.stack([bf(g, {"x": labels["x"], "I": i}, marginals=False).log_z
                          for i in range(g.variables["I"].cardinality)])
    assert torch.allclose(nll, log_z - torch.logsumexp(scores, 0), atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["sequence", "frame"])
def test_closed_forms_equal_autograd_of_the_surrogate(seed, form):
    g, params, labels = toy_temporal_field(seed)
    loss = meanfield_loss(g, labels, form=form, l2_intent=0.01)
    auto = _grads(loss.loss, params)
    closed = closed_form_gradients(g, loss.free, loss.target, form=form, l2_intent=0.01)
    assert set(closed) == set(params)
    for k in params:
        err, cos = gradient_error(closed[k], auto[k])
        assert err < 1e-12, k


def test_frame_form_counts_mu_twice():
    g, params, labels = toy_temporal_field(4)
    seq = meanfield_loss(g, labels)
    frame = meanfield_loss(g, labels, form="frame", free=seq.free, target=seq.target)
    gs, gf = _grads(seq.loss, params), _grads(frame.loss, params)
    assert torch.allclose(gf["mu.mu"], 2 * gs["mu.mu"], atol=1e-12)
    for k in params:
        if k != "mu.mu":
            assert torch.allclose(gf[k], gs[k], atol=1e-12)
    rows = per_frame_mu_gradient(g.factors[-1], seq.free, 1)
    closed = closed_form_gradients(g, seq.free, seq.target)["mu.mu"]
    target_rows = per_frame_mu_gradient(g.factors[-1], seq.target, 1)
    assert torch.allclose((rows - target_rows).sum(1)[0], 2 * closed, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_no_coupling_surrogate_gradient_equals_exact(seed):
    g, params, labels = toy_temporal_field(seed, coupling=False)
    exact = _grads(exact_nll(g, labels).sum(), params)
    approx = _grads(meanfield_loss(g, labels).loss, params)
    for k in params:
        assert torch.allclose(exact[k], approx[k], atol=1e-10), k


def test_coupling_on_differs_from_exact():
    g, params, labels = toy_temporal_field(1)
    exact = _grads(exact_nll(g, labels).sum(), params)
    approx = _grads(meanfield_loss(g, labels).loss, params)
    assert max(float((exact[k] - approx[k]).abs().max()) for k in params) > 1e-4


def test_gradcheck_of_the_surrogate_in_float64():
    g, params, labels = toy_temporal_field(2)
    base = meanfield_loss(g, labels)
    names = list(params)

    def fn(*tensors):
        from fieldlib.inference.check import toy_temporal_field as build

        graph, p, _ = build(2)
        for f in graph.factors:  # swap the leaves in place of the random ones
            attr = "mu" if hasattr(f, "mu") else "table"
            setattr(f, attr, tensors[names.index(f"{f.name}.{attr}")])
        return meanfield_loss(graph, labels, free=base.free, target=base.target,
                              l2_intent=0.1).loss

    inputs = tuple(params[k].detach().clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_l2_pull_of_phi_xi():
    g, params, labels = toy_temporal_field(0)
    base = meanfield_loss(g, labels)
    with_l2 = meanfield_loss(g, labels, free=base.free, target=base.target, l2_intent=0.5)
    g0 = _grads(base.loss, params)["phi_xi.table"]
    g1 = _grads(with_l2.loss, params)["phi_xi.table"]
    assert torch.allclose(g1 - g0, 0.5 * params["phi_xi.table"].detach(), atol=1e-12)
    expected = 0.25 * float((params["phi_xi.table"].detach() ** 2).sum())
    assert float(with_l2.penalty.detach()) == pytest.approx(expected)


def test_batched_padded_surrogate_matches_closed_forms():
    """Batch of 2 with padding: closed forms and autograd agree; padded frames get zero."""
    from test_meanfield import _toy

    g, tens, dom, b = _toy(n=2, t=4, lengths=torch.tensor([2, 4]), seed=3)
    for t in tens.values():
        t.requires_grad_(True)
    labels = {"x": torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6]])}
    params = factor_parameters(g)
    loss = meanfield_loss(g, labels, l2_intent=0.01)
    auto = _grads(loss.loss, params)
    closed = closed_form_gradients(g, loss.free, loss.target, l2_intent=0.01)
    for k in params:
        assert torch.allclose(auto[k], closed[k], atol=1e-12), k
    op = next(k for k in params if k.startswith("component0"))
    assert float(auto[op][0, 2:].abs().max()) == 0.0
    # padding labels are ignored: the NLL does not depend on them
    other = {"x": torch.tensor([[1, 2, 9, 3], [3, 4, 5, 6]])}
    assert torch.allclose(exact_nll(g, labels), exact_nll(g, other))
