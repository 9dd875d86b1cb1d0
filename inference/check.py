"""Compare engines and gradients on a graph, as a table (DESIGN.md "verify gradients").

    report = fieldlib.inference.check.compare(graph, labels={"x": states})
    print(report.table())

Measures: the total-variation error of the approximate marginals (max over variables of
½ Σ_x |p(x) - q(x)|), log Z beside the ELBO (the gap is >= 0), and for every potential the
max absolute and the cosine error between the reference gradient and the approximate one:

* with labels: autograd of the exact -log Σ_latent P(labels, latent) against autograd of the
  mean-field surrogate (fieldlib.inference.losses, sequence form);
* without labels: the gradient of log Z (the exact marginals) against that of the ELBO with
  Q held fixed (the mean-field marginals).

The potentials are the parameters the factors declare (``Factor.parameters``), so a user's
factor type is compared like the built-in ones; :func:`compare_closed_form` gives a
parameter whose factor type has no closed form a row that says so.

:func:`toy_temporal_field` builds the small random temporal fields ``fieldlib gradcheck`` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fieldlib.factors import Component, FrameIntent, KernelTemporal
from fieldlib.graph import FactorGraph
from fieldlib.variables import BlockDomain

from .asynchronous import frame_potentials, split_graph
from .asynchronous_step import asynchronous_step
from .base import get_engine
from .losses import (
    _labels,
    closed_form_gradients,
    exact_nll,
    factor_parameters,
    intent_penalty,
    meanfield_loss,
)
from .messages import MessageStore

__all__ = [
    "CheckRow",
    "CheckReport",
    "NO_CLOSED_FORM",
    "compare",
    "compare_closed_form",
    "marginal_error",
    "gradient_error",
    "toy_temporal_field",
    "compare_asynchronous",
]


#: The ``note`` of a row for a parameter whose factor type has no closed-form gradient.
NO_CLOSED_FORM = "no closed form"


@dataclass
class CheckRow:
    """One line of a report. ``None`` fields print as ``-``; a ``note`` (e.g.
    :data:`NO_CLOSED_FORM`: nothing was checked) prints in the result column."""

    check: str
    quantity: str
    max_abs: float | None = None
    cosine: float | None = None
    tv: float | None = None
    log_z: float | None = None
    elbo: float | None = None
    must_hold: bool = False
    ok: bool = True
    note: str | None = None


@dataclass
class CheckReport:
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every must-hold row holds."""
        return all(r.ok for r in self.rows if r.must_hold)

    def extend(self, other: CheckReport) -> CheckReport:
        self.rows.extend(other.rows)
        return self

    def table(self) -> str:
        head = ("check", "quantity", "max abs err", "cos", "marg TV", "log Z", "ELBO",
                "must", "result")
        lines = []
        for r in self.rows:
            lines.append((r.check, r.quantity, _fmt(r.max_abs, ".2e"), _fmt(r.cosine, ".9f"),
                          _fmt(r.tv, ".2e"), _fmt(r.log_z, ".6f"), _fmt(r.elbo, ".6f"),
                          "yes" if r.must_hold else "no",
                          r.note or (("ok" if r.ok else "FAIL") if r.must_hold else "-")))
        widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
                  for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*x) for x in lines]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def marginal_error(reference: dict, approx: dict) -> float:
    """Max over variables (and batch elements, frames) of the total-variation distance."""
    worst = 0.0
    for name, p in reference.items():
        if name in approx:
            tv = 0.5 * (p - approx[name]).abs().sum(-1)
            worst = max(worst, float(tv.max()) if tv.numel() else 0.0)
    return worst


def gradient_error(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, cosine(a, b))``; the cosine of two zero vectors is 1."""
    a, b = reference.detach().flatten().double(), approx.detach().flatten().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        cos = 1.0
    elif na == 0.0 or nb == 0.0:
        cos = 0.0
    else:
        cos = float(a @ b) / (na * nb)
    return err, cos


def _grads(scalar, params: dict) -> dict:
    names = list(params)
    gs = torch.autograd.grad(scalar, [params[k] for k in names], allow_unused=True,
                             retain_graph=True)
    return {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, gs)}


def _default_params(graph) -> dict:
    return {k: t for k, t in factor_parameters(graph).items() if t.requires_grad}


def compare(graph, labels=None, *, params: dict | None = None, engine=None, reference=None,
            l2_intent: float = 0.0, name: str = "meanfield vs exact", expect_exact=False,
            tol: float = 1e-9) -> CheckReport:
    """Compare an approximate engine (default: sequential mean-field to tol 1e-10) with an
    exact one (default ``"exact"``) on ``graph``: marginals, log Z vs ELBO, gradients. An
    engine without an ELBO (``bp``: the Bethe estimate of log Z) is compared by its log Z
    estimate and, with labels, by its own NLL (estimate free minus clamped); its row is
    must-hold only with ``expect_exact`` (e.g. BP on a tree).

    Args:
        labels: labelled arrays / variables (gradients of the NLL), or None (gradients of
            log Z vs ELBO).
        params: ``{name: tensor}`` to differentiate with respect to (default: every
            potential of a built-in factor that requires grad).
        expect_exact: the approximation should be exact here (e.g. no coupling): the
            marginal, bound and gradient rows must then agree within ``tol`` (must-hold).
            Otherwise only ELBO <= log Z (+ tol) must hold.
    """
    engine = engine or get_engine("meanfield", schedule="sequential", tol=1e-10, max_iter=1000)
    reference = reference or get_engine("exact")
    params = _default_params(graph) if params is None else params
    ref = reference(graph)
    approx = engine(graph)
    evidence = _labels(graph, labels) if labels is not None else None
    report = CheckReport()
    tv = marginal_error(ref.marginals, approx.marginals)
    log_z = ref.log_z.detach().double()
    # a variational engine gives a bound (the ELBO); one without (loopy BP: the Bethe
    # estimate) gives an estimate of log Z, which may lie on either side
    bounded = approx.elbo is not None
    estimate = (approx.elbo if bounded else approx.log_z).detach().double()
    gap_ok = bool((estimate <= log_z + tol * (1 + log_z.abs())).all()) if bounded else True
    exact_ok = bool(((log_z - estimate).abs() <= tol * (1 + log_z.abs())).all())
    report.rows.append(CheckRow(name, "marginals, log Z >= ELBO" if bounded else
                                "marginals, log Z vs estimate", tv=tv,
                                log_z=float(log_z.sum()), elbo=float(estimate.sum()),
                                must_hold=bounded or expect_exact,
                                ok=gap_ok and (not expect_exact or (
                                    exact_ok and tv <= math.sqrt(tol)))))
    if params:
        if labels is not None:
            ref_scalar = exact_nll(graph, labels, reference).sum()
            ref_scalar = ref_scalar + intent_penalty(graph, l2_intent)
            if bounded:  # the mean-field surrogate (Eq. 7-9)
                approx_scalar = meanfield_loss(graph, labels, free=approx.marginals,
                                               target=engine(graph, evidence).marginals,
                                               l2_intent=l2_intent).loss
            else:  # the engine's own NLL: its log Z estimate free minus clamped
                approx_scalar = exact_nll(graph, labels, engine).sum() + \
                    intent_penalty(graph, l2_intent)
            what = "d NLL"
        else:
            ref_scalar = ref.log_z.sum()
            approx_scalar = (approx.elbo if bounded else approx.log_z).sum()
            what = "d log Z"
        g_ref, g_app = _grads(ref_scalar, params), _grads(approx_scalar, params)
        for k in params:
            err, cos = gradient_error(g_ref[k], g_app[k])
            scale = 1.0 + float(g_ref[k].detach().abs().max()) if g_ref[k].numel() else 1.0
            report.rows.append(CheckRow(name, f"{what}/{k}", err, cos, tv=tv,
                                        must_hold=expect_exact,
                                        ok=err <= math.sqrt(tol) * scale))
    return report


def compare_closed_form(graph, labels, *, params: dict | None = None, engine=None,
                        l2_intent: float = 0.0, tol: float = 1e-10,
                        forms=("sequence", "frame")) -> CheckReport:
    """Closed-form mean-field gradients (MATH.md §6) against autograd of the surrogate, for
    each form; must agree to rounding (max abs error <= tol · (1 + max |gradient|)).

    ``params`` (default: every declared factor parameter that requires grad) are matched to
    the factors' parameters by identity, whatever their keys. A parameter with no closed
    form (its factor type defines none, or it is no factor's parameter) gets a row with
    note :data:`NO_CLOSED_FORM` that is not must-hold: reported, not checked."""
    params = _default_params(graph) if params is None else params
    report = CheckReport()
    base = meanfield_loss(graph, labels, engine=engine, l2_intent=l2_intent)
    declared = {id(t): k for k, t in factor_parameters(graph).items()}
    for form in forms:
        loss = meanfield_loss(graph, labels, form=form, free=base.free, target=base.target,
                              l2_intent=l2_intent)
        auto = _grads(loss.loss, params)
        closed = closed_form_gradients(graph, base.free, base.target, form=form,
                                       l2_intent=l2_intent)
        for k, t in params.items():
            check = f"closed form vs autograd ({form})"
            key = declared.get(id(t), k)
            if key not in closed:
                report.rows.append(CheckRow(check, k, note=NO_CLOSED_FORM))
                continue
            err, cos = gradient_error(closed[key], auto[k])
            scale = 1.0 + float(closed[key].abs().max())
            report.rows.append(CheckRow(check, k, err, cos, must_hold=True,
                                        ok=err <= tol * scale))
    return report


def toy_temporal_field(seed: int = 0, *, frames: int | None = None, coupling: bool = True,
                       dtype: torch.dtype = torch.float64):
    """A random small temporal field: ``(graph, params, labels)``.

    Frames are block variables over (c, o, a, p, s) tuples: a random set B of (c, o, a, p)
    tuples times the scenes; φX = φ(o,p) + φ(a,p) + φ(o,s) + φ(c,o,a,p) (the last sparse on
    B), a latent intent with φXI on objects, and µ on objects with a Gaussian kernel. With
    ``coupling=False`` µ = 0 and φXI = 0 (mean-field is then exact). ``params`` maps
    ``"<factor>.<attribute>"`` to the leaf tensors (requires_grad); ``labels`` is
    ``{"x": states}``.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_(True)

    def pick(k):
        return int(torch.randint(k, (1,), generator=gen))

    t = frames or 2 + pick(2)
    cards = {"c": 2, "o": 2 + pick(2), "a": 2, "p": 2, "s": 2}
    space = torch.cartesian_prod(*(torch.arange(cards[k]) for k in "coap"))
    b = space[torch.randperm(len(space), generator=gen)[: 4 + pick(3)]]
    tuples = torch.cat([torch.cat([b, torch.full((len(b), 1), s)], 1) for s in range(2)])
    domain = BlockDomain(cards, tuples)
    n_intent = 2 + pick(2)
    g = FactorGraph()
    x = g.array("x", t, domain)
    intent = g.variable("I", n_intent)
    scale = 1.0 if coupling else 0.0
    params = {
        "phi_op.table": rand(t, cards["o"], cards["p"]),
        "phi_ap.table": rand(t, cards["a"], cards["p"]),
        "phi_os.table": rand(t, cards["o"], cards["s"]),
        "phi_coap.table": rand(t, len(b)),
        "phi_xi.table": rand(t, cards["o"], n_intent, scale=scale),
        "mu.mu": rand(cards["o"], cards["o"], scale=scale),
    }
    g.add(Component(x, ("o", "p"), params["phi_op.table"], name="phi_op"),
          Component(x, ("a", "p"), params["phi_ap.table"], name="phi_ap"),
          Component(x, ("o", "s"), params["phi_os.table"], name="phi_os"),
          Component(x, ("c", "o", "a", "p"), params["phi_coap.table"], configs=b,
                    name="phi_coap"),
          FrameIntent(x, intent, params["phi_xi.table"], component="o", name="phi_xi"),
          KernelTemporal(x, params["mu.mu"], kernel=1.5, component="o", name="mu"))
    labels = {"x": torch.randint(len(tuples), (t,), generator=gen)}
    return g, params, labels


# -- the asynchronous step (MATH.md §5) ----------------------------------------------------------
def _frames_batch(graph, labels):
    split = split_graph(graph)
    frames = split.frames
    kt = next(f for f, _, _ in split.coupled if isinstance(f, KernelTemporal))
    fi = next(f for f, _, _ in split.coupled if isinstance(f, FrameIntent))
    n, t = graph.batch_size or 1, frames.size
    x = torch.as_tensor(labels[frames.name]).long().expand(n, t).reshape(-1)
    table = fi.table.expand(n, *fi.table.shape[-3:]).reshape(n * t, *fi.table.shape[-2:])
    seq = torch.arange(n).repeat_interleave(t)
    pos = torch.arange(t).repeat(n)
    times = kt.times.expand(n, t).reshape(-1)
    return frames, kt, fi, n, t, x, table, seq, pos, times


def _fresh_store(graph, labels, free, discount):
    """A store holding each frame's outgoing messages (K, K*, H, H*) made from the marginals
    ``free`` and the graph's current φXI: one message a frame (capacity T), discount d,
    h = the number averaged."""
    from fieldlib.factors.stored import stored_coupling

    frames, kt, fi, n, t, x, table, seq, pos, times = _frames_batch(graph, labels)
    store = MessageStore.temporal_field(kt.component_size, fi.intent.cardinality, capacity=t,
                                        kernel=kt.kernel, discount=discount, scale="count",
                                        dtype=graph.dtype)
    q = free[frames.name].expand(n, t, frames.cardinality).reshape(n * t, -1)
    with torch.no_grad():
        m = dict(stored_coupling(kt).send(q, x))
        m.update(stored_coupling(fi).send(q, x, table=table.detach()))
    store.write(seq, pos, times, m, 0)
    return store


def _step_gradients(graph, labels, params, store, *, inner_iterations, l2_intent):
    """Autograd gradients of :func:`asynchronous_step`'s loss over every frame of every
    sequence of ``graph`` (one batch) reading ``store`` (not written)."""
    frames, kt, fi, n, t, x, table, seq, pos, times = _frames_batch(graph, labels)
    unary, latent_unary = frame_potentials(graph)
    intent_unary = latent_unary[fi.intent.name]
    step = asynchronous_step(store, seq, pos, times, unary.reshape(n * t, -1), x, mu=kt.mu,
                             mu_component=kt.state_component, phi_xi=table,
                             xi_component=fi.state_component,
                             intent_unary=intent_unary.repeat_interleave(t, 0), write=False,
                             inner_iterations=inner_iterations, l2_intent=l2_intent)
    return _grads(step.loss, params)


def compare_asynchronous(graph, labels, *, params: dict | None = None, engine=None,
                         l2_intent: float = 0.0, tol: float = 1e-10, discount: float = 0.9,
                         steps_old=(1, 5), lr: float = 0.1,
                         inner_iterations: int = 200) -> CheckReport:
    """The asynchronous step (Algorithm 2) against the closed forms (MATH.md §6).

    * must hold: with every other frame's CURRENT marginals in the store (the mean-field
      fixed point; d = 1, h = the number averaged), the step's gradients over every frame
      equal ``closed_form_gradients(form="frame")`` to rounding (max abs error <=
      tol · (1 + max |gradient|));
    * reported: the deviation when the stored messages are those of the fixed point of the
      parameters k SGD steps earlier (θ + k · lr · g, g the closed-form gradient; for each
      k in ``steps_old``) read with discount ``discount`` (d = 0.9: the paper's).

    The graph is a temporal field the ``async`` engine takes (e.g. :func:`toy_temporal_field`).
    """
    engine = engine or get_engine("meanfield", schedule="sequential", tol=1e-14, max_iter=5000)
    params = _default_params(graph) if params is None else params
    declared = factor_parameters(graph)
    key_of = {id(t): k for k, t in declared.items()}
    evidence = _labels(graph, labels)
    free, target = engine(graph).marginals, engine(graph, evidence).marginals
    closed = closed_form_gradients(graph, free, target, form="frame", l2_intent=l2_intent)
    report = CheckReport()
    options = {"inner_iterations": inner_iterations, "l2_intent": l2_intent}
    got = _step_gradients(graph, evidence, params, _fresh_store(graph, evidence, free, 1.0),
                          **options)
    for k, t in params.items():
        ref = closed.get(key_of.get(id(t), k))
        if ref is None:
            report.rows.append(CheckRow("async step, fresh messages", k, note=NO_CLOSED_FORM))
            continue
        err, cos = gradient_error(ref, got[k])
        report.rows.append(CheckRow("async step vs closed form (frame), fresh, d=1", k, err,
                                    cos, must_hold=True,
                                    ok=err <= tol * (1.0 + float(ref.abs().max()))))
    for old in steps_old:
        saved = {k: t.detach().clone() for k, t in declared.items()}
        try:
            with torch.no_grad():
                for k, t in declared.items():
                    if k in closed:
                        t.add_(old * lr * closed[k].reshape(t.shape))
            stale = {name: q.detach() for name, q in engine(graph).marginals.items()}
            store = _fresh_store(graph, evidence, stale, discount)  # the old φXI too
        finally:
            with torch.no_grad():
                for k, t in declared.items():
                    t.copy_(saved[k])
        got = _step_gradients(graph, evidence, params, store, **options)
        for k, t in params.items():
            ref = closed.get(key_of.get(id(t), k))
            if ref is None:
                continue
            err, cos = gradient_error(ref, got[k])
            report.rows.append(CheckRow(f"async step, d={discount:g}, messages {old} "
                                        f"step{'s' if old != 1 else ''} old", k, err, cos))
    return report
