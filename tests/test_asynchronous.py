"""Asynchronous mean-field (MATH.md §5): Algorithm 2's step and Algorithm 1's engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldlib.cli import main
from fieldlib.errors import FieldlibError
from fieldlib.factors import Component, FrameIntent, KernelTemporal
from fieldlib.factors.stored import stored_coupling
from fieldlib.inference import MessageStore, asynchronous_step, get_engine
from fieldlib.inference.check import toy_temporal_field
from fieldlib.inference.losses import closed_form_gradients, per_frame_mu_gradient
from fieldlib.io import TableModel, write_fg, write_uai

F64 = torch.float64


def _parts(g):
    kt = next(f for f in g.factors if isinstance(f, KernelTemporal))
    fi = next(f for f in g.factors if isinstance(f, FrameIntent))
    unary = sum(torch.stack([t.table for t in f.terms()]) for f in g.factors
                if isinstance(f, Component))  # (T, S) φX of each frame
    return kt, fi, unary


def _fresh_store(g, free, labels, capacity=None, **options):
    """A store holding every frame's message from the CURRENT marginals (d = 1, h = n)."""
    kt, fi, _ = _parts(g)
    t = kt.frames.size
    options = options or {"scale": "count"}
    store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality,
                                        capacity=capacity or t, kernel=kt.kernel,
                                        discount=1.0, dtype=F64, **options)
    with torch.no_grad():
        m = dict(stored_coupling(kt).send(free["x"], labels["x"]))
        m.update(stored_coupling(fi).send(free["x"], labels["x"], table=fi.table.detach()))
    store.write([0] * t, torch.arange(t), kt.times, m, 0)
    return store


def _grads(scalar, params):
    names = list(params)
    gs = torch.autograd.grad(scalar, [params[k] for k in names], allow_unused=True,
                             retain_graph=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, gs)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_messages_give_the_closed_form_rows_of_each_frame(seed):
    g, params, labels = toy_temporal_field(seed, frames=4)
    mf = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    free, target = mf(g).marginals, mf(g, labels).marginals
    kt, fi, unary = _parts(g)
    store = _fresh_store(g, free, labels)
    closed = closed_form_gradients(g, free, target, form="frame", l2_intent=0.01)
    mu_rows = (per_frame_mu_gradient(kt, free, 1) - per_frame_mu_gradient(kt, target, 1))[0]
    x = labels["x"]
    for i in range(kt.frames.size):
        step = asynchronous_step(store, [0], [i], kt.times[i:i + 1], unary[i:i + 1],
                                 x[i:i + 1], mu=kt.mu, mu_component=kt.state_component,
                                 phi_xi=fi.table[i:i + 1], xi_component=fi.state_component,
                                 inner_iterations=200, l2_intent=0.01, write=False)
        assert torch.allclose(step.q[0], free["x"][i], atol=1e-12)
        assert torch.allclose(step.q_intent[0], free["I"], atol=1e-12)
        got = _grads(step.loss, params)
        for k in params:
            if k == "mu.mu":
                ref, mine = mu_rows[i], got[k]
            else:
                ref, mine = closed[k][i], got[k][i]
                other = torch.cat([got[k][:i], got[k][i + 1:]])
                assert float(other.abs().max()) == 0.0, k  # only frame i's rows
            assert float((ref - mine).abs().max()) < 1e-12, (i, k)
    # the whole sequence as one batch: the sum of the rows, i.e. form="frame"
    t = kt.frames.size
    step = asynchronous_step(store, [0] * t, torch.arange(t), kt.times, unary, x, mu=kt.mu,
                             mu_component=kt.state_component, phi_xi=fi.table,
                             xi_component=fi.state_component, inner_iterations=200,
                             l2_intent=0.01, write=False)
    got = _grads(step.loss, params)
    for k in params:
        assert float((closed[k] - got[k]).abs().max()) < 1e-12, k


def test_fresh_messages_as_a_plain_sum_without_normalisation():
    g, params, labels = toy_temporal_field(5, frames=3)
    mf = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    free, target = mf(g).marginals, mf(g, labels).marginals
    kt, fi, unary = _parts(g)
    store = _fresh_store(g, free, labels, normalize=False, scale=1.0)
    step = asynchronous_step(store, [0] * 3, torch.arange(3), kt.times, unary, labels["x"],
                             mu=kt.mu, mu_component=kt.state_component, phi_xi=fi.table,
                             xi_component=fi.state_component, inner_iterations=200,
                             write=False)
    closed = closed_form_gradients(g, free, target, form="frame")
    got = _grads(step.loss, params)
    for k in params:
        assert float((closed[k] - got[k]).abs().max()) < 1e-12, k


def test_step_writes_its_outgoing_messages_after_reading():
    g, params, labels = toy_temporal_field(0, frames=3)
    kt, fi, unary = _parts(g)
    store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality,
                                        kernel=kt.kernel, dtype=F64)
    step = asynchronous_step(store, ["v", "v"], [0, 2], kt.times[[0, 2]], unary[[0, 2]],
                             labels["x"][[0, 2]], mu=kt.mu, mu_component=kt.state_component,
                             phi_xi=fi.table[[0, 2]], xi_component=fi.state_component)
    assert int(step.incoming.n_total.sum()) == 0  # first pass: nothing stored yet
    assert step.iteration == 0 and store.iteration == 0
    stored = store.messages("v")
    assert stored["frame"].tolist() == [2, 0]
    assert not any(t.requires_grad for t in step.messages.values())
    assert torch.allclose(stored["K"][1], step.messages["K"][0])
    step.loss.backward()
    assert all(p.grad is not None for p in params.values())
    again = asynchronous_step(store, ["v"], [1], kt.times[1:2], unary[1:2], labels["x"][1:2],
                              mu=kt.mu, mu_component=kt.state_component, phi_xi=fi.table[1:2],
                              xi_component=fi.state_component)
    assert int(again.incoming.n_past[0]) == 1 and int(again.incoming.n_future[0]) == 1
    assert again.iteration == 1
    assert set(again.timings) == {"read", "update", "loss", "write"}


def _weak(seed, frames=5):
    g, params, labels = toy_temporal_field(seed, frames=frames)
    with torch.no_grad():  # weak coupling: one fixed point
        params["mu.mu"].mul_(0.3)
        params["phi_xi.table"].mul_(0.3)
    return g, params, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("order", ["forward", "random"])
def test_engine_reaches_the_meanfield_fixed_point(seed, order):
    g, _, labels = _weak(seed)
    mf = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    eng = get_engine("async", order=order, tol=1e-12)
    for evidence in (None, labels):
        a, m = eng(g, evidence), mf(g, evidence)
        assert a.info["converged"]
        for k in m.marginals:
            assert float((a.marginals[k] - m.marginals[k]).abs().max()) < 1e-10, k
        assert abs(float(a.elbo.detach()) - float(m.elbo.detach())) < 1e-10


def test_engine_with_discount_is_an_approximation_and_runs():
    g, _, _ = _weak(0)
    r = get_engine("async[discount=0.9,capacity=3,passes=5]")(g)
    assert torch.allclose(r.marginals["x"].sum(-1), torch.ones(5, dtype=F64))
    assert r.info["passes"] == 5 or r.info["converged"]


def test_engine_refuses_a_graph_without_sequences():
    from fieldlib.graph import FactorGraph

    g = FactorGraph(dtype=F64)
    a, b = g.variable("a", 2), g.variable("b", 2)
    from fieldlib.factors import Table

    g.add(Table((a, b), torch.zeros(2, 2, dtype=F64)))
    with pytest.raises(FieldlibError, match="meanfield, exact or bruteforce"):
        get_engine("async")(g)


@pytest.mark.parametrize("suffix", ["uai", "fg"])
def test_cli_async_on_a_model_file_is_one_line(capsys, tmp_path, suffix):
    rng = np.random.default_rng(0)
    cards, scopes = [2, 3], [(0,), (0, 1)]
    model = TableModel(cards, scopes, [rng.random(tuple(cards[v] for v in s)) + 0.1
                                       for s in scopes])
    path = tmp_path / f"m.{suffix}"
    (write_uai if suffix == "uai" else write_fg)(path, model)
    code = main(["infer", str(path), "--task", "MAR", "--engine", "async"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().split("\n")
    assert len(lines) == 1 and "async" in lines[0] and "meanfield" in lines[0], err


# -- learning: asynchronous steps vs synchronous whole-sequence steps ---------------------------
_N, _T, _D, _P, _NI, _F, _SIGMA = 16, 4, 3, 2, 2, 4, 2.0


class _Net(torch.nn.Module):
    """Per-frame features (F) -> φX over (o, p), φXI over (o, I); µ a parameter."""

    def __init__(self):
        super().__init__()
        self.phi_x = torch.nn.Linear(_F, _D * _P).double()
        self.phi_xi = torch.nn.Linear(_F, _D * _NI).double()
        self.mu = torch.nn.Parameter(torch.zeros(_D, _D, dtype=F64))

    def forward(self, feats):
        return (self.phi_x(feats).unflatten(-1, (_D, _P)),
                self.phi_xi(feats).unflatten(-1, (_D, _NI)))


def _domain():
    from fieldlib.variables import BlockDomain

    return BlockDomain({"o": _D, "p": _P},
                       torch.cartesian_prod(torch.arange(_D), torch.arange(_P)))


def _graph(net, feats, times):
    from fieldlib.graph import FactorGraph

    px, pxi = net(feats)
    g = FactorGraph()
    x = g.array("x", _T, _domain())
    intent = g.variable("I", _NI)
    g.add(Component(x, ("o", "p"), px, name="phi_x"),
          FrameIntent(x, intent, pxi, component="o", name="phi_xi"),
          KernelTemporal(x, net.mu, times=times, kernel=_SIGMA, component="o", name="mu"))
    return g


def _learning_data():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(_N, _T, _F, generator=gen, dtype=F64)
    times = torch.arange(_T, dtype=F64).expand(_N, _T)
    truth = _Net()
    with torch.no_grad():
        for p in truth.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 1.5)
        q = get_engine("meanfield")(_graph(truth, feats, times)).marginals["x"]
    labels = torch.multinomial(q.reshape(-1, _D * _P), 1, generator=gen).reshape(_N, _T)
    return feats, times, labels


def _optimiser(net, steps):
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)


def _train_sync(feats, times, labels, steps=150):
    from fieldlib.inference import meanfield_loss

    torch.manual_seed(0)
    net = _Net()
    opt, sched = _optimiser(net, steps)
    eng = get_engine("meanfield[schedule=sequential,tol=1e-6,max_iter=50]")
    for _ in range(steps):
        opt.zero_grad()
        loss = meanfield_loss(_graph(net, feats, times), {"x": labels}, engine=eng,
                              form="frame").loss
        (loss / (_N * _T)).backward()
        opt.step()
        sched.step()
    return net


def _train_async(feats, times, labels, steps=1500, batch=16):
    torch.manual_seed(0)
    net = _Net()
    opt, sched = _optimiser(net, steps)
    domain = _domain()
    flat, _ = domain.flat_index(("o", "p"))
    obj = domain.component("o")
    store = MessageStore.temporal_field(_D, _NI, capacity=_T, kernel=_SIGMA, discount=0.9,
                                        scale="count", dtype=F64)
    gen = torch.Generator().manual_seed(1)
    for it in range(steps):  # frames sampled across the 16 sequences
        seq = torch.randint(_N, (batch,), generator=gen)
        fr = torch.randint(_T, (batch,), generator=gen)
        px, pxi = net(feats[seq, fr])
        opt.zero_grad()
        step = asynchronous_step(store, seq, fr, times[seq, fr], px.flatten(-2)[:, flat],
                                 labels[seq, fr], mu=net.mu, mu_component=obj, phi_xi=pxi,
                                 xi_component=obj, iteration=it)
        (step.loss / batch).backward()
        opt.step()
        sched.step()
    return net


def test_asynchronous_training_reaches_the_synchronous_marginals():
    """Tolerance: the mean-field marginals of the two trained models differ by a mean
    total-variation distance below 0.15 over the 64 frames (the untrained model is ~0.7
    away), and their argmax accuracies on the labels by at most 0.1. A few frames may flip
    (a coupled field's mean-field can have several fixed points), so no max is asserted."""
    torch.set_num_threads(1)
    feats, times, labels = _learning_data()
    mf = get_engine("meanfield[schedule=sequential,tol=1e-10,max_iter=500]")
    nets = [_train_sync(feats, times, labels), _train_async(feats, times, labels), _Net()]
    with torch.no_grad():
        q_sync, q_async, q_init = (mf(_graph(n, feats, times)).marginals["x"] for n in nets)
    tv = 0.5 * (q_sync - q_async).abs().sum(-1)
    tv_init = 0.5 * (q_sync - q_init).abs().sum(-1)
    assert float(tv.mean()) < 0.15 and float(tv_init.mean()) > 0.5
    acc = [float((q.argmax(-1) == labels).double().mean()) for q in (q_sync, q_async)]
    assert abs(acc[0] - acc[1]) <= 0.1 and min(acc) > 0.8


def test_gradcheck_rows_for_the_asynchronous_step(capsys):
    from fieldlib.inference.check import compare_asynchronous

    g, params, labels = toy_temporal_field(3)
    report = compare_asynchronous(g, labels, params=params, l2_intent=4e-4, steps_old=(2,))
    fresh = [r for r in report.rows if r.must_hold]
    stale = [r for r in report.rows if not r.must_hold]
    assert len(fresh) == len(stale) == len(params) and report.ok
    assert all(r.max_abs < 1e-12 for r in fresh)
    assert all(r.max_abs > 1e-8 for r in stale)  # an approximation: reported, not exact
    assert main(["gradcheck", "--trials", "1", "--async-steps-old", "3"]) == 0
    out = capsys.readouterr().out
    assert "async step vs closed form (frame), fresh, d=1" in out
    assert "async step, d=0.9, messages 3 steps old" in out


def test_engine_on_a_padded_batch_equals_meanfield_and_single_sequences():
    from test_meanfield import _toy

    g, _, _, _ = _toy(n=3, t=5, lengths=[5, 3, 4], coupling=0.3, seed=2)
    a = get_engine("async", tol=1e-12)(g)
    m = get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)(g)
    assert a.marginals["x"].shape == (3, 5, 10) and a.elbo.shape == (3,)
    assert float(a.marginals["x"][1, 3:].abs().max()) == 0.0  # padding: zero rows
    for k in ("x", "I"):
        assert float((a.marginals[k] - m.marginals[k]).abs().max()) < 1e-6, k
    assert float((a.elbo - m.elbo).abs().max()) < 1e-6
    one, _, _, _ = _toy(n=None, t=5, coupling=0.3, seed=2)
    assert get_engine("async", tol=1e-12)(one).marginals["x"].shape == (5, 10)


def test_step_with_float64_potentials_writes_to_a_float32_store():
    g, params, labels = toy_temporal_field(1, frames=3)
    kt, fi, unary = _parts(g)
    store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality,
                                        kernel=kt.kernel)  # float32
    step = asynchronous_step(store, [7, 7, 7], [0, 1, 2], kt.times, unary, labels["x"],
                             mu=kt.mu, mu_component=kt.state_component, phi_xi=fi.table,
                             xi_component=fi.state_component)
    assert step.loss.dtype == F64 and store.messages(7)["K"].dtype == torch.float32


def test_engine_scale_frames_equals_count_when_each_frame_has_one_message():
    """The engine writes one message a frame per pass, so h by distinct frames is h by
    count: the same marginals."""
    from fieldlib.inference.check import toy_temporal_field

    graph, _, _ = toy_temporal_field(0, dtype=torch.float64)
    a = get_engine("async[scale=count]")(graph)
    b = get_engine("async[scale=frames]")(graph)
    for name, m in a.marginals.items():
        torch.testing.assert_close(b.marginals[name], m, rtol=0, atol=1e-12)
