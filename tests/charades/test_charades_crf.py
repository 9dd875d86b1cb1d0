"""The Charades CRF assembly (models/charades/crf.py): head outputs -> fieldlib factors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors import Component
from fieldlib.inference import MessageStore, asynchronous_step, get_engine, meanfield_loss
from fieldlib.inference.asynchronous import frame_potentials
from fieldlib.inference.check import compare_asynchronous
from fieldlib.kernels import GaussianKernel
from fieldlib.models.charades import Annotations, Instance, Video, build_state_space
from fieldlib.models.charades.crf import (
    class_scores,
    collapse_progress,
    frame_domain,
    frame_inputs,
    frame_layout,
    frame_state,
    progress_size,
    video_graph,
)
from fieldlib.models.charades.labels import LabelSpace, Vocabulary, default_classes
from fieldlib.models.charades.statespace import StateSpace

D = torch.float64
MEANFIELD = dict(schedule="sequential", tol=1e-13, max_iter=5000)


# -- fixtures ---------------------------------------------------------------------------------
def _vocab(prefix, n):
    return Vocabulary(tuple(f"{prefix}{k}" for k in range(n)),
                      tuple(f"{prefix} {k}" for k in range(n)))


def make_space(cp, class_object, class_verb, n_objects, n_verbs, n_scenes) -> StateSpace:
    """A StateSpace from (class, progress) pairs and a class -> (object, verb) mapping."""
    n_classes = len(class_object)
    labels = LabelSpace(_vocab("c", n_classes), _vocab("o", n_objects), _vocab("v", n_verbs),
                        np.asarray(class_object, dtype=np.int64),
                        np.asarray(class_verb, dtype=np.int64))
    c, p = np.asarray(sorted(cp), dtype=np.int64).T
    states = np.stack([c, labels.class_object[c], labels.class_verb[c], p], 1)
    lookup = np.full((n_classes, 3), -1, dtype=np.int64)
    lookup[c, p] = np.arange(len(c))
    return StateSpace(labels, states, np.arange(1, len(c) + 1), _vocab("s", n_scenes),
                      lookup, 8.0)


@pytest.fixture(scope="module")
def small():
    """6 states over 4 classes (c2 and c3 share (o1, v1): C stays explicit), 3 objects,
    2 verbs, 2 scenes: 12 frame states."""
    return make_space([(0, 0), (0, 1), (1, 2), (2, 0), (2, 2), (3, 1)], [0, 1, 1, 1],
                      [0, 0, 1, 1], 3, 2, 2)


@pytest.fixture(scope="module")
def tiny():
    """3 states, 2 scenes: 6 frame states (exact == brute force == enumeration)."""
    return make_space([(0, 0), (1, 2), (2, 1)], [0, 1, 1], [0, 0, 1], 2, 2, 2)


@pytest.fixture(scope="module")
def built():
    """B from a few synthetic annotated videos, the real label sizes (157 classes, 38
    objects, 33 verbs through the derived mapping)."""
    videos = [Video("A", "Kitchen", 6.0, (Instance(5, 0.0, 3.0), Instance(60, 1.0, 5.5))),
              Video("B", "Bedroom", 4.0, (Instance(5, 0.5, 2.0), Instance(101, 2.0, 4.0))),
              Video("C", "Kitchen", 3.0, (Instance(17, 0.0, 3.0),))]
    labels = LabelSpace(default_classes()).with_derived_mapping()
    return build_state_space(Annotations(videos), labels, fps=2.0)


def random_heads(space, lead, *, component="object", n_intents=2, seed=0, scene=True,
                 intent=True, scale=1.0, grad=False):
    layout = frame_layout(space)
    gen = torch.Generator().manual_seed(seed)
    o, v, p, s = layout.n_objects, layout.n_verbs, layout.n_progress, layout.n_scenes
    d = o if component == "object" else o * p

    def rand(*shape):
        return (torch.randn(*lead, *shape, generator=gen, dtype=D) * scale).requires_grad_(grad)

    return SimpleNamespace(phi_op=rand(o, p), phi_ap=rand(v, p),
                           phi_os=rand(o, s) if scene else None, phi_b=rand(layout.n_states),
                           phi_xi=rand(d, n_intents) if intent else None)


def random_mu(space, component, seed=1, scale=1.0, grad=False):
    _, d = frame_layout(space).component(component)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d, d, generator=gen, dtype=D) * scale).requires_grad_(grad)


def flat(heads):
    return SimpleNamespace(**{k: None if v is None else v.flatten(0, 1)
                              for k, v in vars(heads).items()})


TIMES = torch.tensor([[0.0, 1.5, 4.0], [0.0, 0.5, 1.0]], dtype=D)


# -- the layout -------------------------------------------------------------------------------
def test_frame_domain_layout(small):
    dom = frame_domain(small)
    assert list(dom.components) == ["c", "o", "a", "p", "s", "q"]
    assert dom.size == small.size * small.n_scenes == 12
    k = torch.arange(dom.size)
    b, s = k // 2, k % 2  # state index b * S + s
    states = torch.as_tensor(small.states)
    torch.testing.assert_close(dom.tuples[:, :4], states[b])
    torch.testing.assert_close(dom.component("s"), s)
    torch.testing.assert_close(dom.component("q"), states[b, 1] * 3 + states[b, 3])
    assert dom.components["q"].size == 9


def test_frame_state_and_padding(small):
    state = torch.tensor([[0, 5, -1], [3, -1, -1]])
    scene = torch.tensor([1, 0])  # one per video, broadcast over frames
    got = frame_state(state, scene, small)
    assert got.tolist() == [[1, 11, -1], [6, -1, -1]]
    assert frame_state(torch.tensor([2, 2]), torch.tensor([-1, 1]), small).tolist() == [-1, 5]
    with pytest.raises(FieldlibError, match="state 6 is outside -1..5"):
        frame_state(torch.tensor([6]), torch.tensor([0]), small)
    with pytest.raises(FieldlibError, match="scene 2 is outside -1..1"):
        frame_state(torch.tensor([0]), torch.tensor([2]), small)


def test_collapse_progress(small, built):
    for space in (small, built):
        col = collapse_progress(space)
        assert progress_size(space) == 3 and progress_size(col) == 1
        assert (col.states[:, 3] == 0).all()
        assert len(np.unique(col.states[:, :3], axis=0)) == len(col.states)
        assert int(col.counts.sum()) == int(space.counts.sum())
        # every (c, p) of a class in B maps to the collapsed row of that class
        has = (space.lookup >= 0).any(1)
        rows = col.lookup[has]
        assert (rows >= 0).all() and (rows == rows[:, :1]).all()
        assert (col.states[rows[:, 0], 0] == np.flatnonzero(has)).all()
        assert (col.lookup[~has] == -1).all()
        assert collapse_progress(col) is col
        layout = frame_layout(col)
        assert layout.n_progress == 1 and layout.domain.components["p"].size == 1
        torch.testing.assert_close(layout.domain.component("q"), layout.domain.component("o"))


# -- (a) frame_inputs == frame_potentials of the video graph ----------------------------------
@pytest.mark.parametrize("component", ["object", "object_progress"])
@pytest.mark.parametrize("scene", [True, False])
def test_frame_inputs_equal_the_graphs_frame_potentials(built, component, scene):
    n, t = 2, 3
    heads = random_heads(built, (n, t), component=component, scene=scene, n_intents=4)
    mu = random_mu(built, component)
    crf = video_graph(heads, built, mu=mu, times=TIMES, component=component)
    unary, latent = frame_potentials(crf.graph)
    inputs = frame_inputs(flat(heads), built, component=component, mu=mu)
    size = built.size * built.n_scenes
    assert inputs["unary"].shape == (n * t, size)
    torch.testing.assert_close(inputs["unary"].reshape(n, t, size), unary, rtol=0, atol=0)
    assert bool(torch.isfinite(inputs["unary"]).all())  # every frame state is in B
    kt = next(f for f in crf.graph.factors if f.name == "mu")
    fi = next(f for f in crf.graph.factors if f.name == "phi_xi")
    assert torch.equal(inputs["mu_component"], kt.state_component)
    assert torch.equal(inputs["xi_component"], fi.state_component)
    assert inputs["phi_xi"].shape == (n * t, fi.component_size, 4)
    assert inputs["mu"] is mu and torch.equal(latent["I"], torch.zeros(n, 4, dtype=D))


# -- (b) the dense frame log-table by hand ------------------------------------------------------
def test_dense_frame_table_by_hand(small):
    n, t = 2, 3
    heads = random_heads(small, (n, t), seed=3)
    crf = video_graph(heads, small, mu=random_mu(small, "object"), times=TIMES)
    table = torch.zeros(n, t, 12, dtype=D)
    for term in crf.graph.terms():
        if isinstance(term.factor, Component):
            table[:, term.variables[0].position] += term.table
    states = small.states
    for k in (0, 3, 7, 10, 11):
        b, s = divmod(k, 2)
        c, o, a, p = states[b]
        want = (heads.phi_op[:, :, o, p] + heads.phi_ap[:, :, a, p]
                + heads.phi_os[:, :, o, s] + heads.phi_b[:, :, b])
        torch.testing.assert_close(table[:, :, k], want, rtol=0, atol=1e-14)


# -- (c) exact == brute force == enumeration; meanfield; the asynchronous step ------------------
def enumerate_field(space, heads, mu, times, sigma, component):
    """log Z (N,), frame marginals (N, T, S) and Q_I (N, N_I) by listing every
    configuration, from MATH.md §2 written out."""
    layout = frame_layout(space)
    dom = layout.domain
    k = torch.arange(dom.size)
    b, s = k // layout.n_scenes, k % layout.n_scenes
    c, o, a, p = (torch.as_tensor(space.states)[b, j] for j in range(4))
    d = o if component == "object" else o * layout.n_progress + p
    n, t = heads.phi_b.shape[:2]
    unary = (heads.phi_op[..., o, p] + heads.phi_ap[..., a, p] + heads.phi_os[..., o, s]
             + heads.phi_b[..., b])  # (N, T, S)
    xi = heads.phi_xi[:, :, d, :]  # (N, T, S, N_I)
    cfg = torch.cartesian_prod(*[torch.arange(dom.size)] * t)  # (S^T, T)
    frames = torch.arange(t)
    score = unary[:, frames, cfg].sum(-1)[..., None] + xi[:, frames, cfg].sum(-2)
    for i in range(t):
        for j in range(i + 1, t):
            k = torch.exp(-((times[:, j] - times[:, i]) ** 2) / (2 * sigma**2))
            score = score + (mu[d[cfg[:, i]], d[cfg[:, j]]] * k[:, None])[..., None]
    log_z = score.flatten(1).logsumexp(-1)
    prob = (score - log_z[:, None, None]).exp()  # (N, S^T, N_I)
    px = prob.sum(-1)
    marg = torch.stack([torch.zeros(n, dom.size, dtype=D).index_add(1, cfg[:, i], px)
                        for i in range(t)], 1)
    return log_z, marg, prob.sum(1)


@pytest.mark.parametrize("component", ["object", "object_progress"])
def test_exact_equals_enumeration_and_the_checks_hold(tiny, component):
    heads = random_heads(tiny, (2, 3), component=component, seed=5, grad=True)
    mu = random_mu(tiny, component, seed=6, grad=True)
    crf = video_graph(heads, tiny, mu=mu, times=TIMES, kernel=2.0, component=component)
    exact = get_engine("exact")(crf.graph)
    brute = get_engine("bruteforce")(crf.graph)
    with torch.no_grad():
        log_z, marg, q_i = enumerate_field(tiny, heads, mu, TIMES, 2.0, component)
    for r in (exact, brute):
        torch.testing.assert_close(r.log_z, log_z)
        torch.testing.assert_close(r.marginals["x"], marg)
        torch.testing.assert_close(r.marginals["I"], q_i)
    mf = get_engine("meanfield", **MEANFIELD)(crf.graph)
    assert bool((mf.elbo <= exact.log_z + 1e-9).all())
    torch.testing.assert_close(mf.marginals["x"].sum(-1), torch.ones(2, 3, dtype=D))
    labels = crf.labels(torch.tensor([[0, 1, 2], [2, 2, 0]]), torch.tensor([1, 0]))
    report = compare_asynchronous(crf.graph, labels, steps_old=(), inner_iterations=100)
    must = [r for r in report.rows if r.must_hold]
    assert len(must) == 6 and report.ok, report.table()


def test_frame_inputs_drive_the_asynchronous_step(small):
    n_i = 3
    heads = random_heads(small, (5,), component="object_progress", n_intents=n_i, grad=True)
    mu = random_mu(small, "object_progress", grad=True)
    inputs = frame_inputs(heads, small, component="object_progress", mu=mu)
    store = MessageStore.temporal_field(9, n_i, kernel=GaussianKernel(2.0), discount=0.9,
                                        dtype=D)
    label = frame_state(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 1, 0, 1]), small)
    seq, frame = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 3, 1, 2, 0])
    time_ = frame.to(D) * 0.5
    for _ in range(2):
        step = asynchronous_step(store, seq, frame, time_, label=label, **inputs)
    step.loss.backward()
    assert step.q.shape == (5, 12) and bool(torch.isfinite(step.loss))
    for g in (heads.phi_op.grad, heads.phi_b.grad, heads.phi_xi.grad, mu.grad):
        assert g is not None and bool(torch.isfinite(g).all())


# -- (d) ablations and padding ------------------------------------------------------------------
@pytest.mark.parametrize("use_temporal", [True, False])
@pytest.mark.parametrize("use_intent", [True, False])
@pytest.mark.parametrize("progress", [True, False])
def test_ablations_build_and_run(small, use_temporal, use_intent, progress):
    space = small if progress else collapse_progress(small)
    heads = random_heads(space, (2, 3), seed=7, intent=use_intent)
    crf = video_graph(heads, space, mu=random_mu(space, "object") if use_temporal else None,
                      times=TIMES if use_temporal else None, use_temporal=use_temporal,
                      use_intent=use_intent)
    names = {f.name for f in crf.graph.factors}
    assert ("mu" in names) == use_temporal and ("phi_xi" in names) == use_intent
    assert (crf.intent is None) == (not use_intent)
    mf = get_engine("meanfield", **MEANFIELD)(crf.graph)
    size = space.size * 2
    assert mf.marginals["x"].shape == (2, 3, size)
    torch.testing.assert_close(mf.marginals["x"].sum(-1), torch.ones(2, 3, dtype=D))
    if not (use_temporal or use_intent):  # independent frames: mean-field is exact
        exact = get_engine("exact")(crf.graph)
        torch.testing.assert_close(mf.marginals["x"], exact.marginals["x"])
        unary = frame_inputs(flat(heads), space, use_intent=False)["unary"]
        torch.testing.assert_close(mf.marginals["x"], torch.softmax(unary, -1).view(2, 3, -1))


@pytest.mark.parametrize("engine", ["exact", "meanfield"])
def test_padding_changes_nothing_on_real_frames(tiny, engine):
    eng = get_engine(engine, **(MEANFIELD if engine == "meanfield" else {}))
    heads = random_heads(tiny, (2, 4), component="object_progress", seed=9)
    mu = random_mu(tiny, "object_progress", seed=10)
    times = torch.tensor([[0.0, 1.0, 2.5, 0.0], [0.0, 0.5, 1.0, 3.0]], dtype=D)  # 0: padding
    common = dict(mu=mu, kernel=2.0, component="object_progress")
    padded = eng(video_graph(heads, tiny, times=times, lengths=[3, 4], **common).graph)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    by_mask = eng(video_graph(heads, tiny, times=times, mask=mask, **common).graph)
    torch.testing.assert_close(by_mask.marginals["x"], padded.marginals["x"])
    first = SimpleNamespace(**{k: v[:1, :3] for k, v in vars(heads).items()})
    alone = eng(video_graph(first, tiny, times=times[:1, :3], **common).graph)
    torch.testing.assert_close(padded.marginals["x"][0, :3], alone.marginals["x"][0])
    torch.testing.assert_close(padded.marginals["I"][0], alone.marginals["I"][0])
    assert float(padded.marginals["x"][0, 3].abs().sum()) == 0.0
    second = SimpleNamespace(**{k: v[1:] for k, v in vars(heads).items()})
    whole = eng(video_graph(second, tiny, times=times[1:], **common).graph)
    torch.testing.assert_close(padded.marginals["x"][1], whole.marginals["x"][0])


def test_padded_labels_train_and_padding_gets_no_gradient(small):
    heads = random_heads(small, (2, 3), seed=12, grad=True)
    mu = random_mu(small, "object", seed=13, grad=True)
    times = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=D)
    crf = video_graph(heads, small, mu=mu, times=times, mask=torch.tensor(
        [[True, True, False], [True, True, True]]))
    labels = crf.labels(torch.tensor([[1, 4, -1], [0, 0, 5]]), torch.tensor([1, 0]))
    assert labels["x"].tolist() == [[3, 9, -1], [0, 0, 10]]
    loss = meanfield_loss(crf.graph, labels, engine=get_engine("meanfield", **MEANFIELD)).loss
    loss.backward()
    for name in ("phi_op", "phi_ap", "phi_os", "phi_b", "phi_xi"):
        grad = getattr(heads, name).grad
        assert bool(torch.isfinite(grad).all()) and float(grad[0, 2].abs().max()) == 0.0
        assert float(grad[0, :2].abs().max()) > 0.0
    assert bool(torch.isfinite(mu.grad).all()) and float(mu.grad.abs().max()) > 0.0


# -- (e) class scores ---------------------------------------------------------------------------
def test_class_scores_are_the_class_marginal(small):
    heads = random_heads(small, (2, 3), seed=11)
    crf = video_graph(heads, small, mu=random_mu(small, "object"), times=TIMES,
                      lengths=[2, 3])
    q = get_engine("meanfield", **MEANFIELD)(crf.graph).marginals["x"]
    got = crf.class_scores(q)
    assert got.shape == (2, 3, 4)
    dom = crf.layout.domain
    want = torch.zeros(2, 3, 4, dtype=D).index_add(-1, dom.component("c"), q)  # onto c
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[0, :2].sum(-1), torch.ones(2, dtype=D))
    assert float(got[0, 2].abs().sum()) == 0.0  # padded frame
    # by hand: class 2 has states (2, 0) and (2, 2), rows 3 and 4 of B, both scenes
    torch.testing.assert_close(got[..., 2], q[..., [6, 7, 8, 9]].sum(-1))
    with pytest.raises(ShapeError, match="class_scores: q"):
        class_scores(q[..., :5], small)


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input_names_the_tensor(small):
    heads = random_heads(small, (2, 3))
    mu = random_mu(small, "object")
    kw = dict(mu=mu, times=TIMES)

    def with_(**changes):
        return SimpleNamespace(**{**vars(heads), **changes})

    cases = [
        (with_(phi_op=heads.phi_op[..., :2]), kw, ShapeError, r"heads\.phi_op .*\(2, 3, 3, 3\)"),
        (with_(phi_ap=heads.phi_ap[:, :2]), kw, ShapeError, r"heads\.phi_ap"),
        (with_(phi_os=heads.phi_os[..., :1]), kw, ShapeError, r"heads\.phi_os .*O, S"),
        (with_(phi_b=torch.zeros(2, 3, 5, dtype=D)), kw, ShapeError, r"heads\.phi_b .*\|B\|"),
        (with_(phi_xi=torch.zeros(2, 3, 9, 2, dtype=D)), kw, ShapeError,
         r"heads\.phi_xi .*object_progress"),
        (with_(phi_op=heads.phi_op[0]), kw, ShapeError, r"heads\.phi_op .*\(N, T, O, P\)"),
        (with_(phi_b=None), kw, FieldlibError, r"heads\.phi_b is missing"),
        (with_(phi_xi=None), kw, FieldlibError, r"heads\.phi_xi is None but use_intent"),
        (heads, dict(mu=torch.zeros(9, 9, dtype=D), times=TIMES), ShapeError,
         r"mu must have shape \(D, D\) = \(3, 3\)"),
        (heads, dict(mu=mu, times=TIMES[:, :2]), ShapeError, r"times must be real, of shape"),
        (heads, dict(mu=mu, times=TIMES.flip(-1)), ShapeError, r"times must be non-decreasing"),
        (heads, dict(mu=mu), FieldlibError, r"times \(N, T\) in seconds"),
        (heads, dict(times=TIMES), FieldlibError, r"mu is None but use_temporal"),
        (heads, dict(lengths=[3], **kw), ShapeError, r"lengths must have shape \(N,\)"),
        (heads, dict(mask=torch.tensor([[True, False, True]] * 2), **kw), ShapeError,
         r"mask must mark a prefix"),
        (heads, dict(component="verb", **kw), FieldlibError, r"component must be one of"),
        (with_(phi_op=heads.phi_op.detach().clone().fill_(float("nan"))), kw,
         FieldlibError, r"phi_op"),
    ]
    for bad, options, error, match in cases:
        with pytest.raises(error, match=match):
            video_graph(bad, small, **options)
    with pytest.raises(ShapeError, match=r"heads\.phi_b must have shape \(B, \|B\|\)"):
        frame_inputs(SimpleNamespace(**{k: v[0] for k, v in vars(with_(
            phi_b=torch.zeros(2, 3, 7, dtype=D))).items()}), small)
    with pytest.raises(ShapeError, match=r"mu must have shape"):
        frame_inputs(flat(heads), small, mu=torch.zeros(3, 4))
    wrong_p = random_heads(collapse_progress(small), (2, 3))  # P = 1 heads, P = 3 space
    with pytest.raises(ShapeError, match=r"heads\.phi_op .*collapse_progress"):
        video_graph(wrong_p, small, **kw)
    category_only = StateSpace(LabelSpace(_vocab("c", 4)), small.states, small.counts,
                               small.scenes, small.lookup, 8.0)
    with pytest.raises(FieldlibError, match="class -> object/verb mapping"):
        frame_layout(category_only)
