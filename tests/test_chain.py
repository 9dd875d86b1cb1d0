"""ChainPairwise and linear-chain CRFs (issue 13 §3): log Z, marginals, pair marginals,
Viterbi and NLL against a forward-backward and a Viterbi written here, on padded batches
with random lengths, transitions shared and per step, scores of hundreds of nats; the
exact engine's chain path against its general contraction; the factor's mean-field
messages, energies and closed form; partial evidence (-1, a boolean mask, state labels) for
the exact, bruteforce and meanfield engines against enumeration written here.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldlib import ChainPairwise, Factor, FactorGraph, Table
from fieldlib.errors import EvidenceError, InvalidPotentialError, ShapeError
from fieldlib.factors import FixedBeliefs, MessageOptions
from fieldlib.inference import exact_nll, get_engine
from fieldlib.inference.check import compare_closed_form

D = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs" / "chains.md"


# -- references written here ------------------------------------------------------------------
def _step(tr, n, t):
    """A_t for sequence n, from any of the four transition shapes (per_position given)."""
    a, per_position, batched = tr
    if batched:
        a = a[n]
    return a[t] if per_position else a


def reference(em, tr, lengths):
    """Forward-backward in log space, one sequence at a time: ``(log Z (N,), marginals
    (N, T, d), pair marginals (N, T-1, d, d))``, zeros on padding."""
    n_seq, t_len, d = em.shape
    log_z = torch.zeros(n_seq, dtype=D)
    marg = torch.zeros(n_seq, t_len, d, dtype=D)
    pair = torch.zeros(n_seq, max(t_len - 1, 0), d, d, dtype=D)
    for n in range(n_seq):
        length = int(lengths[n])
        if length == 0:
            continue
        alpha = [em[n, 0]]
        for t in range(1, length):
            alpha.append(torch.logsumexp(alpha[-1][:, None] + _step(tr, n, t - 1), 0)
                         + em[n, t])
        beta = [torch.zeros(d, dtype=D)] * length
        for t in range(length - 2, -1, -1):
            beta[t] = torch.logsumexp(_step(tr, n, t) + em[n, t + 1] + beta[t + 1], 1)
        z = torch.logsumexp(alpha[-1], 0)
        log_z[n] = z
        for t in range(length):
            marg[n, t] = (alpha[t] + beta[t] - z).exp()
        for t in range(length - 1):
            pair[n, t] = (alpha[t][:, None] + _step(tr, n, t) + em[n, t + 1] + beta[t + 1]
                          - z).exp()
    return log_z, marg, pair


def viterbi(em, tr, lengths):
    """``(score (N,), path (N, T))``: max-sum with back-pointers, -1 on padding."""
    n_seq, t_len, d = em.shape
    score = torch.zeros(n_seq, dtype=D)
    path = torch.full((n_seq, t_len), -1, dtype=torch.long)
    for n in range(n_seq):
        length = int(lengths[n])
        if length == 0:
            continue
        delta, back = em[n, 0], []
        for t in range(1, length):
            s = delta[:, None] + _step(tr, n, t - 1)
            back.append(s.argmax(0))
            delta = s.max(0).values + em[n, t]
        state = int(delta.argmax())
        score[n] = delta[state]
        path[n, length - 1] = state
        for t in range(length - 2, -1, -1):
            state = int(back[t][state])
            path[n, t] = state
    return score, path


def path_score(em, tr, lengths, tags):
    """``(N,)``: the score of ``tags`` (emissions plus transitions over real positions)."""
    out = torch.zeros(em.shape[0], dtype=D)
    for n in range(em.shape[0]):
        length = int(lengths[n])
        for t in range(length):
            out[n] += em[n, t, tags[n, t]]
            if t + 1 < length:
                out[n] += _step(tr, n, t)[tags[n, t], tags[n, t + 1]]
    return out


def chain(em, tr, lengths, name="chain"):
    g = FactorGraph()
    y = g.array("y", em.shape[1], em.shape[2], lengths=lengths)
    a, per_position, _ = tr
    g.add(Table(y, em, name="emit"), ChainPairwise(y, a, per_position=per_position, name=name))
    return g


def transitions(gen, form, n, t_len, d, scale=1.0):
    shape = {"shared": (d, d), "batched": (n, d, d), "per_step": (t_len - 1, d, d),
             "batched_per_step": (n, t_len - 1, d, d)}[form]
    a = scale * torch.randn(shape, generator=gen, dtype=D)
    return a, "per_step" in form, "batched" in form


FORMS = ["shared", "batched", "per_step", "batched_per_step"]


def _problem(data, scale=1.0):
    n = data.draw(st.integers(1, 4), label="N")
    t_len = data.draw(st.integers(2, 7), label="T")
    d = data.draw(st.integers(1, 4), label="d")
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, t_len), min_size=n, max_size=n),
                                     label="lengths"))
    form = data.draw(st.sampled_from(FORMS), label="form")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    em = scale * torch.randn(n, t_len, d, generator=gen, dtype=D)
    return em, transitions(gen, form, n, t_len, d, scale), lengths


def _check_against_references(em, tr, lengths, atol=1e-10, rtol=1e-12):
    z, marg, pair = reference(em, tr, lengths)
    score, path = viterbi(em, tr, lengths)
    g = chain(em, tr, lengths)
    for spec in ("exact", "exact[chain=false]"):
        r = get_engine(spec)(g, map=True, factor_marginals=True)
        assert r.info["path"] == ("chain" if spec == "exact" else "contraction")
        torch.testing.assert_close(r.log_z, z, atol=atol, rtol=rtol)
        torch.testing.assert_close(r.marginals["y"], marg, atol=atol, rtol=0)
        got_pair = torch.stack(r.factor_marginals["chain"], 1) if pair.shape[1] else pair
        torch.testing.assert_close(got_pair, pair, atol=atol, rtol=0)
        torch.testing.assert_close(r.map_score, score, atol=atol, rtol=rtol)
        assert torch.equal(r.map["y"], path), (spec, r.map["y"], path)
    return g, z


# -- the references ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_exact_engine_equals_forward_backward_and_viterbi(data):
    em, tr, lengths = _problem(data)
    g, z = _check_against_references(em, tr, lengths)
    tags = torch.randint(em.shape[2], lengths.shape + em.shape[1:2])
    want = z - path_score(em, tr, lengths, tags)
    torch.testing.assert_close(exact_nll(g, {"y": tags}), want, atol=1e-10, rtol=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_scores_of_hundreds_of_nats(data):
    """Potentials of hundreds of nats (up to ~1e3), which exp() of a table against its own
    maximum would zero out: the chain path and the general path stay exact."""
    em, tr, lengths = _problem(data, scale=300.0)
    a, per_position, batched = tr
    shift = 400.0 * torch.randn(em.shape[-1], dtype=D)  # cancels across the two factors
    em = em + shift
    tr = (a - shift[:, None], per_position, batched)
    _check_against_references(em, tr, lengths, atol=1e-9, rtol=1e-12)


def test_against_brute_force_enumeration_engine():
    gen = torch.Generator().manual_seed(3)
    em = torch.randn(3, 5, 3, generator=gen, dtype=D)
    lengths = torch.tensor([5, 2, 0])
    for form in FORMS:
        g = chain(em, transitions(gen, form, 3, 5, 3), lengths)
        brute = get_engine("bruteforce")(g, map=True)
        r = get_engine("exact")(g, map=True)
        torch.testing.assert_close(r.log_z, brute.log_z)
        torch.testing.assert_close(r.marginals["y"], brute.marginals["y"])
        assert torch.equal(r.map["y"], brute.map["y"])


def test_three_line_user_code_as_documented():
    """The first code block of docs/chains.md, run as written."""
    text = DOCS.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    gen = torch.Generator().manual_seed(0)
    n, t_len, d = 4, 6, 3
    ns = {"FactorGraph": FactorGraph, "Table": Table, "ChainPairwise": ChainPairwise,
          "T": t_len, "d": d, "lengths": torch.tensor([6, 3, 1, 5]),
          "emissions": torch.randn(n, t_len, d, generator=gen, dtype=D),
          "transitions": torch.randn(d, d, generator=gen, dtype=D)}
    exec(block, ns)
    g = ns["g"]
    tr = (ns["transitions"], False, False)
    z, marg, _ = reference(ns["emissions"], tr, ns["lengths"])
    r = get_engine("exact")(g, map=True)
    torch.testing.assert_close(r.log_z, z)
    torch.testing.assert_close(r.marginals["y"], marg)
    assert torch.equal(r.map["y"], viterbi(ns["emissions"], tr, ns["lengths"])[1])


def test_batch_of_n_equals_n_single_calls_and_padding_changes_nothing():
    """A transition into a padded position is dropped: a padded sequence equals the same
    sequence cut to its length."""
    gen = torch.Generator().manual_seed(1)
    em = torch.randn(3, 6, 4, generator=gen, dtype=D)
    a = torch.randn(3, 5, 4, 4, generator=gen, dtype=D)
    lengths = torch.tensor([6, 4, 1])
    r = get_engine("exact")(chain(em, (a, True, True), lengths))
    for n, length in enumerate(lengths.tolist()):
        g = FactorGraph()
        y = g.array("y", length, 4)
        g.add(Table(y, em[n, :length]))
        if length > 1:
            g.add(ChainPairwise(y, a[n, : length - 1], per_position=True))
        one = get_engine("exact")(g)
        torch.testing.assert_close(r.log_z[n], one.log_z)
        torch.testing.assert_close(r.marginals["y"][n, :length], one.marginals["y"])
        assert float(r.marginals["y"][n, length:].abs().sum()) == 0.0


def test_gradients_flow_to_emissions_and_transitions():
    """log Z's gradient in the emissions is the marginals (both paths), in the
    transitions the summed pair marginals."""
    gen = torch.Generator().manual_seed(2)
    em = torch.randn(2, 5, 3, generator=gen, dtype=D).requires_grad_()
    a = torch.randn(3, 3, generator=gen, dtype=D).requires_grad_()
    lengths = torch.tensor([5, 3])
    z, marg, pair = reference(em.detach(), (a.detach(), False, False), lengths)
    for spec in ("exact", "exact[chain=false]"):
        r = get_engine(spec)(chain(em, (a, False, False), lengths), marginals=False)
        g_em, g_a = torch.autograd.grad(r.log_z.sum(), [em, a])
        torch.testing.assert_close(g_em, marg)
        torch.testing.assert_close(g_a, pair.sum((0, 1)))


def _chain_peak(g, query):
    """Elements the chain path holds at its peak beyond the prepared operands (live tensor
    bytes, tests/test_memory_estimate.py's counter), and the path's own model of it."""
    import gc

    from test_memory_estimate import LiveBytes

    from fieldlib.inference.chain import chain_cost, chain_log_z, chain_map, find_chain
    from fieldlib.inference.prepare import prepare

    gc.collect()
    with LiveBytes() as mode:
        prep = prepare(g, probes=query in ("grad", "factor"),
                       factor_marginals=query == "factor")
        base = mode.peak = mode.live  # prepare's own transients are not the path's
        found = find_chain(prep.labels)
        if query in ("grad", "factor"):
            with torch.enable_grad():
                log_z = chain_log_z(prep.operands, found, prep.cards)
                inputs = list(prep.probes.values()) + prep.term_probes
                grads = torch.autograd.grad(log_z.sum(), inputs)
            del grads
        elif query == "sum":
            with torch.no_grad():
                chain_log_z(prep.operands, found, prep.cards)
        else:
            with torch.no_grad():
                chain_map([t.detach() for t in prep.operands], found, prep.cards)
        held = (mode.peak - base) / 8
    return held, chain_cost(found, prep.cards, 0, query)["held"]


@pytest.mark.parametrize("n, t_len, d, padded", [(8, 40, 6, True), (8, 40, 6, False),
                                                 (3, 64, 2, True), (2, 10, 30, False),
                                                 (8, 300, 3, True), (1, 50, 1, True)])
def test_chain_path_is_linear_in_length_and_its_memory_estimate_covers_the_peak(n, t_len, d,
                                                                                padded):
    gen = torch.Generator().manual_seed(t_len)
    em = torch.randn(n, t_len, d, generator=gen, dtype=D)
    lengths = torch.randint(1, t_len + 1, (n,), generator=gen) if padded else \
        torch.full((n,), t_len)
    g = chain(em, transitions(gen, "shared", n, t_len, d), lengths)
    r = get_engine("exact")(g, marginals=False)
    assert r.info["flops"] == n * (t_len - 1) * d * d  # one (N, d, d) table per step
    for query in ("grad", "factor", "sum", "map"):
        held, modelled = _chain_peak(g, query)
        assert held <= modelled <= 2 * held + 64, (query, held, modelled)


def test_the_chain_path_refuses_what_its_estimate_does_not_fit():
    from fieldlib.errors import TooLargeError

    gen = torch.Generator().manual_seed(0)
    g = chain(torch.randn(4, 50, 5, generator=gen, dtype=D),
              (torch.randn(5, 5, generator=gen, dtype=D), False, False), None)
    need = get_engine("exact")(g).info["estimated_bytes"]
    assert get_engine("exact", memory_budget=need)(g).info["path"] == "chain"
    with pytest.raises(TooLargeError, match="memory budget"):
        get_engine("exact", memory_budget=need - 1)(g)
    small = get_engine("exact")(g, marginals=False).info["estimated_bytes"]
    assert small < need  # log Z alone keeps no step's tables


def test_order_search_stops_at_the_lower_bound_on_a_chain():
    """The general path's order on a chain: the deterministic run is optimal (it meets the
    lower bound), so no restart is run; a graph with a cycle still gets its restarts."""
    from fieldlib.inference.ordering import elimination_order

    scopes = [(-1, t) for t in range(50)] + [(-1, t, t + 1) for t in range(49)]
    cards = {-1: 4, **{t: 7 for t in range(50)}}
    s = elimination_order(scopes, cards, list(range(50)))
    assert (s.restarts, s.cost, s.max_clique) == (2, 49 * 49 + 7, 49)
    grid = [(-1, 5 * i + j, 5 * i + j + 1) for i in range(5) for j in range(4)] + \
        [(-1, 5 * i + j, 5 * i + j + 5) for i in range(4) for j in range(5)]
    assert elimination_order(grid, {-1: 1, **{v: 2 for v in range(25)}},
                             list(range(25))).restarts > 2


def test_chain_detection():
    from fieldlib.inference.chain import find_chain

    assert find_chain([(-1, 0), (-1, 0, 1), (-1, 2, 1), (-1,)]).paths == ((0, 1, 2),)
    assert find_chain([(-1, 0, 1), (-1, 1, 2), (-1, 2, 0)]) is None       # a cycle
    assert find_chain([(-1, 0, 1), (-1, 0, 2), (-1, 0, 3)]) is None       # a star
    assert find_chain([(-1, 0, 1, 2)]) is None                            # a triple
    assert find_chain([(-1, 0), (-1, 3, 4)]).paths == ((0,), (3, 4))     # two paths
    g = FactorGraph()
    v = [g.variable(f"v{i}", 2) for i in range(3)]
    g.add(Table([v[0], v[1]], torch.randn(2, 2, dtype=D)),
          Table([v[1], v[2]], torch.randn(2, 2, dtype=D)),
          Table([v[0], v[2]], torch.randn(2, 2, dtype=D)))
    assert get_engine("exact")(g).info["path"] == "contraction"


# -- the factor ------------------------------------------------------------------------------------
def test_shapes_and_errors():
    g = FactorGraph()
    y = g.array("y", 4, 3)
    assert not ChainPairwise(y, torch.zeros(3, 3)).per_position
    assert ChainPairwise(y, torch.zeros(2, 3, 3, 3)).batched
    assert not ChainPairwise(y, torch.zeros(5, 3, 3)).per_position  # N = 5
    with pytest.raises(ShapeError, match="per_position"):
        ChainPairwise(y, torch.zeros(3, 3, 3))  # N or T-1?
    assert ChainPairwise(y, torch.zeros(3, 3, 3), per_position=True).per_position
    assert ChainPairwise(y, torch.zeros(3, 3, 3), per_position=False).batched
    z = g.array("z", 4, 3, lengths=[4, 2])
    assert ChainPairwise(z, torch.zeros(3, 3, 3)).per_position  # N = 2 != 3
    with pytest.raises(ShapeError):
        ChainPairwise(y, torch.zeros(3, 2))
    with pytest.raises(ShapeError):
        ChainPairwise(y, torch.zeros(2, 4, 3, 3))  # T-1 is 3
    with pytest.raises(InvalidPotentialError, match="NaN"):
        ChainPairwise(y, torch.full((3, 3), math.nan))
    with pytest.raises(Exception, match="VariableArray"):
        ChainPairwise(g.variable("v", 3), torch.zeros(3, 3))
    one = g.array("one", 1, 2)
    f = ChainPairwise(one, torch.zeros(2, 2))
    assert f.terms() == [] and f.coupling_arity() == 0


def _random_q(gen, n, t_len, d, lengths):
    q = torch.rand(n, t_len, d, generator=gen, dtype=D)
    q = q / q.sum(-1, keepdim=True)
    return q * (torch.arange(t_len) < lengths[:, None]).to(D)[..., None]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impossible", [False, True])
def test_vectorised_messages_equal_the_generic_ones(form, impossible):
    gen = torch.Generator().manual_seed(4)
    n, t_len, d = 3, 6, 4
    lengths = torch.tensor([6, 3, 0])
    a, per_position, _ = transitions(gen, form, n, t_len, d)
    if impossible:
        a = a.masked_fill(torch.rand(a.shape, generator=gen) < 0.3, -math.inf)
    g = FactorGraph()
    y = g.array("y", t_len, d, lengths=lengths)
    f = ChainPairwise(y, a, per_position=per_position)
    g.add(f)
    for penalty in (None, 1e30):
        p = _random_q(gen, n, t_len, d, lengths)
        marginals = {"y": p, **{v.name: p[:, t] for t, v in enumerate(y)}}
        q = FixedBeliefs(marginals, n, MessageOptions(penalty=penalty))
        generic = Factor.expected_messages(f, q)  # one message per position's variable
        want = torch.stack([generic.get(v, torch.zeros(n, d, dtype=D)) for v in y], 1)
        torch.testing.assert_close(f.expected_messages(q)[y], want)
        torch.testing.assert_close(f.expected_energy(q), Factor.expected_energy(f, q))
        torch.testing.assert_close(f.position_energy(q)[y], Factor.position_energy(f, q)[y])


@pytest.mark.parametrize("form", FORMS)
def test_closed_form_gradient_equals_autograd(form):
    gen = torch.Generator().manual_seed(5)
    n, t_len, d = 3, 5, 3
    lengths = torch.tensor([5, 2, 4])
    a, per_position, batched = transitions(gen, form, n, t_len, d)
    a = a.requires_grad_()
    g = FactorGraph()
    y = g.array("y", t_len, d, lengths=lengths)
    f = ChainPairwise(y, a, per_position=per_position)
    p = _random_q(gen, n, t_len, d, lengths)
    q = FixedBeliefs({"y": p, **{v.name: p[:, t] for t, v in enumerate(y)}}, n)
    grad = f.energy_gradient(q)["transitions"]
    for k in range(n):
        (want,) = torch.autograd.grad(f.expected_energy(q)[k], a)
        torch.testing.assert_close(grad[k], want[k] if batched else want)
    torch.testing.assert_close(f.energy_gradient(q, "frame")["transitions"], 2 * grad)
    # and through the library's check, against autograd of the mean-field surrogate
    em = torch.randn(n, t_len, d, generator=gen, dtype=D).requires_grad_()
    g.add(Table(y, em, name="emit"), f)
    f.name = "chain"
    labels = {"y": torch.randint(d, (n, t_len), generator=gen)}
    report = compare_closed_form(g, labels, params={"emit.log_potential": em,
                                                    "chain.transitions": a})
    assert report.ok, report.table()


def test_meanfield_on_a_chain_is_below_log_z_and_exact_without_coupling():
    gen = torch.Generator().manual_seed(6)
    em = torch.randn(2, 6, 3, generator=gen, dtype=D)
    lengths = torch.tensor([6, 4])
    g = chain(em, (torch.randn(3, 3, generator=gen, dtype=D), False, False), lengths)
    mf = get_engine("meanfield[schedule=sequential,tol=1e-12,max_iter=500]")
    assert bool((mf(g).elbo <= get_engine("exact")(g).log_z + 1e-12).all())
    flat = chain(em, (torch.zeros(3, 3, dtype=D), False, False), lengths)
    torch.testing.assert_close(mf(flat).marginals["y"], get_engine("exact")(flat).marginals["y"])


# -- partial evidence ----------------------------------------------------------------------------
def enumerate_conditional(em, a, lengths, observed):
    """Per sequence, by listing every configuration of its real positions: ``(log Z(e) (N,),
    marginals (N, T, d))`` given ``observed`` (N, T), -1 where unobserved."""
    n_seq, t_len, d = em.shape
    log_z = torch.zeros(n_seq, dtype=D)
    marg = torch.zeros(n_seq, t_len, d, dtype=D)
    for n in range(n_seq):
        length = int(lengths[n])
        scores, configs = [], []
        for x in itertools.product(range(d), repeat=length):
            if any(observed[n, t] >= 0 and observed[n, t] != x[t] for t in range(length)):
                continue
            s = sum(em[n, t, x[t]] for t in range(length))
            s = s + sum(a[x[t], x[t + 1]] for t in range(length - 1))
            scores.append(torch.as_tensor(s, dtype=D))
            configs.append(x)
        scores = torch.stack(scores)
        log_z[n] = torch.logsumexp(scores, 0)
        p = (scores - log_z[n]).exp()
        for w, x in zip(p, configs):
            for t in range(length):
                marg[n, t, x[t]] += w
    return log_z, marg


@pytest.fixture
def small():
    gen = torch.Generator().manual_seed(7)
    em = torch.randn(3, 4, 3, generator=gen, dtype=D)
    a = torch.randn(3, 3, generator=gen, dtype=D)
    lengths = torch.tensor([4, 3, 2])
    observed = torch.tensor([[2, -1, 0, -1], [-1, -1, 1, -1], [-1, 1, -1, -1]])
    return em, a, lengths, observed


@pytest.mark.parametrize("engine", ["exact", "exact[chain=false]", "bruteforce"])
def test_partial_evidence_with_minus_one_and_a_mask(engine, small):
    em, a, lengths, observed = small
    g = chain(em, (a, False, False), lengths)
    want_z, want_m = enumerate_conditional(em, a, lengths, observed)
    mask = observed >= 0
    garbage = torch.where(mask, observed, torch.full_like(observed, 7))  # ignored states
    for ev in ({"y": observed}, {"y": (garbage, mask)}, {"y": (garbage.tolist(), mask)}):
        r = get_engine(engine)(g, ev, map=True)
        torch.testing.assert_close(r.log_z, want_z)
        torch.testing.assert_close(r.marginals["y"], want_m)
        real = torch.arange(4) < lengths[:, None]
        assert bool((r.map["y"][mask & real] == observed[mask & real]).all())
        onehot = r.marginals["y"][mask & real].amax(-1)
        assert bool((onehot == 1.0).all())  # exactly one-hot where observed
    nll = exact_nll(g, {"y": (garbage, mask)})
    full = enumerate_conditional(em, a, lengths, torch.full_like(observed, -1))[0]
    torch.testing.assert_close(nll, full - want_z)


def test_meanfield_with_partial_evidence_is_exact_when_the_rest_is_independent(small):
    """Observing every other position leaves free variables with no free neighbour: then
    mean-field is exact, and must equal the enumeration."""
    em, a, lengths, _ = small
    observed = torch.tensor([[1, -1, 2, -1], [-1, 0, -1, -1], [2, -1, -1, -1]])
    g = chain(em, (a, False, False), lengths)
    want_z, want_m = enumerate_conditional(em, a, lengths, observed)
    mf = get_engine("meanfield[schedule=sequential,tol=1e-14,max_iter=200]")
    for ev in ({"y": observed}, {"y": (observed.clamp(min=0), observed >= 0)}):
        r = mf(g, ev)
        torch.testing.assert_close(r.marginals["y"], want_m)
        torch.testing.assert_close(r.elbo, want_z)


def test_state_labels_as_evidence_mixed_with_unobserved():
    gen = torch.Generator().manual_seed(8)
    g = FactorGraph()
    y = g.array("y", 4, ["walk", "sit", "read"])
    em = torch.randn(4, 3, generator=gen, dtype=D)
    a = torch.randn(3, 3, generator=gen, dtype=D)
    g.add(Table(y, em), ChainPairwise(y, a))
    r = get_engine("exact")(g, {"y": ["walk", -1, "read", -1]})
    want = get_engine("exact")(g, {"y[0]": 0, "y[2]": 2})
    torch.testing.assert_close(r.log_z, want.log_z)
    torch.testing.assert_close(r.marginals["y"], want.marginals["y"])
    nll = exact_nll(g, {"y": ["walk", "sit", "read", "sit"]})
    torch.testing.assert_close(nll, exact_nll(g, {"y": torch.tensor([0, 1, 2, 1])}))
    with pytest.raises(EvidenceError, match="not a state label"):
        get_engine("exact")(g, {"y": ["walk", -1, "fly", -1]})


def test_partial_evidence_rules(small):
    em, a, lengths, observed = small
    g = chain(em, (a, False, False), lengths)
    ev = g.evidence({"y": observed})
    y = g.arrays["y"]
    assert y[3] not in ev                                   # observed nowhere
    assert ev[y[0]].tolist() == [2, -1, -1]                 # observed in element 0 only
    assert ev[y[2]].tolist() == [0, 1, 0]   # observed wherever real; padding: its clamp 0
    one = torch.full_like(observed, -1)
    one[0, 2] = 1
    assert g.evidence({"y": one})[y[2]].tolist() == [1, -1, -1]  # partial: padding -1 too
    with pytest.raises(EvidenceError, match="outside its states"):
        g.evidence({"y[1]": -1})                            # a lone -1 is no state
    with pytest.raises(EvidenceError, match="observed mask has shape"):
        g.evidence({"y": (observed, torch.ones(2, 4, dtype=torch.bool))})
    bad = observed.clone()
    bad[2, 3] = 2                                           # on padding, marked observed
    with pytest.raises(EvidenceError, match="padding"):
        g.evidence({"y": bad})
    g.evidence({"y": (bad, bad != 2)})                      # ... unless marked unobserved
    # two keys for one variable merge where they do not disagree
    merged = g.evidence({"y": observed, "y[1]": torch.tensor([0, -1, 1])})
    assert merged[y[1]].tolist() == [0, -1, 1]
    with pytest.raises(EvidenceError, match="conflicting"):
        g.evidence({"y": observed, "y[0]": torch.tensor([1, -1, -1])})


def test_async_engine_takes_partial_evidence():
    """The asynchronous engine fixes a frame only where it is observed: -1 in the array's
    evidence equals leaving that frame out, and (no coupling: mean-field is exact) the
    exact engine's conditional marginals."""
    from fieldlib.inference.check import toy_temporal_field

    field, _, labels = toy_temporal_field(0, frames=4, coupling=False)
    x = labels["x"].clone()
    x[1], x[3] = -1, -1
    engine = get_engine("async[tol=1e-12]")
    a = engine(field, {"x": x})
    b = engine(field, {"x[0]": x[0], "x[2]": x[2]})
    torch.testing.assert_close(a.marginals["x"], b.marginals["x"])
    want = get_engine("exact")(field, {"x": x}).marginals["x"]
    torch.testing.assert_close(a.marginals["x"], want, atol=1e-8, rtol=0)
