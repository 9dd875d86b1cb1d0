"""Losses for learning potentials from labelled sequences (MATH.md §6).

The temporal field has labelled frames x* and a latent intent I that is never observed, so
the log-likelihood of a labelled sequence is l = log Σ_I P(x*, I) (Eq. 7-9).

* :func:`exact_nll` is -l from exact inference: log Z - log Z(evidence = x*), the second
  term being log Σ_I exp score(x*, I). Autograd of it gives the exact gradients.
* :func:`meanfield_loss` is the mean-field surrogate: a scalar whose autograd gradients
  with respect to every potential equal the closed forms of MATH.md §6, i.e. (for the loss
  -l) "model marginal minus target" contracted with the potential:

      surrogate = Σ_f ( E_{Q}[log φ_f] - E_{Q*}[log φ_f] ),   Q, Q* held fixed (no grad)

  with Q the mean-field marginals of the model and Q* those with the labels clamped (the
  labelled frames one-hot, the intent at P(I | x*), exact because I is the only latent
  variable left). For φX this is Q_i - 1[x*_i] (Eq. 7), for φXI Q_i Q_I - 1[x*_i] P(I|x*)
  (Eq. 8), for µ Σ_{i<j} k(i,j) (Q_i ⊗ Q_j - 1[x*_i] ⊗ 1[x*_j]) (Eq. 9 with the typo fixed);
  component tables get the same summed onto their components through the gather.
  Two forms:

  - ``form="sequence"``: the gradient of -l over the whole sequence (compare with autograd
    of :func:`exact_nll`; equal to it when the coupling is zero);
  - ``form="frame"``: the sum of the per-frame rows used by asynchronous training: each
    frame contributes its own terms, so a pairwise term counts at both of its frames and
    the µ gradient is TWICE the sequence form's (MATH.md §6, factor-2 note).

* :func:`closed_form_gradients` writes Eq. 7-9 out explicitly (no autograd), the oracle
  the surrogate is checked against: each factor gives its own
  (:meth:`~fieldlib.factors.Factor.closed_form_gradient`, in the factor type's file), for
  the parameters it declares (:func:`factor_parameters`); :func:`per_frame_mu_gradient`
  gives Eq. 9's rows.

The L2 pull of φXI toward zero is ``l2_intent / 2 · Σ φXI²`` (gradient ``l2_intent · φXI``),
added to the loss (not to ``per_sequence``). All gradients are of the LOSS, i.e. of -l.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors import FixedBeliefs, FrameIntent, KernelTemporal
from fieldlib.variables import VariableArray

from .base import get_engine
from .meanfield_state import MeanFieldState

__all__ = [
    "MeanFieldLoss",
    "exact_nll",
    "meanfield_loss",
    "closed_form_gradients",
    "per_frame_mu_gradient",
    "factor_parameters",
    "intent_penalty",
]


def _labels(graph, labels) -> dict:
    """Evidence for the labelled variables, padded positions set to 0 (their clamp). A
    value is read as evidence is (``FactorGraph.evidence``): state labels, -1 or a
    ``(states, observed)`` pair for unlabelled entries, which stay -1 (partial labels:
    the loss is then -log P(the labelled entries))."""
    if not isinstance(labels, Mapping):
        raise FieldlibError("labels must map arrays / variables (or their names) to states")
    out = {}
    for key, value in labels.items():
        target = graph.resolve(key)
        value, _ = graph.evidence_tensor(target, value)
        if isinstance(target, VariableArray) and target.lengths is not None:
            mask = target.mask().to(value.device)
            value = torch.where(mask if value.dim() == 2 else mask[0], value,
                                value.new_zeros(()))
        out[target.name] = value
    return out


def exact_nll(graph, labels, engine=None) -> torch.Tensor:
    """``([N])`` -log Σ_latent P(labels, latent) = log Z - log Z(evidence = labels), from an
    exact engine (default ``"exact"``); differentiable in the potentials."""
    engine = engine or get_engine("exact")
    log_z = engine(graph, marginals=False).log_z
    clamped = engine(graph, _labels(graph, labels), marginals=False).log_z
    return log_z - clamped


def _pulled(f) -> list[str]:
    """The parameters of factor ``f`` under the L2 pull toward zero: φXI's table."""
    return ["table"] if isinstance(f, FrameIntent) else []


def intent_penalty(graph, l2_intent: float) -> torch.Tensor:
    """``l2_intent / 2 · Σ φXI²`` over every FrameIntent factor (MATH.md §6)."""
    total = torch.zeros((), dtype=graph.dtype, device=graph.device)
    if l2_intent:
        for f in graph.factors:
            for name in _pulled(f):
                total = total + 0.5 * l2_intent * (f.parameters()[name] ** 2).sum()
    return total


@dataclass
class MeanFieldLoss:
    """Attributes: ``loss`` (scalar: Σ per_sequence + penalty), ``per_sequence`` (``[N]``),
    ``penalty`` (the L2 pull), ``free`` and ``target`` (the marginals used: Q and Q*)."""

    loss: torch.Tensor
    per_sequence: torch.Tensor
    penalty: torch.Tensor
    free: dict
    target: dict


def _marginals_of(graph, x, engine, evidence):
    if x is None:
        x = engine(graph, evidence)
    return x.marginals if hasattr(x, "marginals") else x


def meanfield_loss(graph, labels, *, engine=None, form: str = "sequence",
                   l2_intent: float = 0.0, free=None, target=None) -> MeanFieldLoss:
    """The mean-field surrogate loss (module docstring).

    Args:
        graph: the model; ``labels`` maps the labelled arrays / variables to states.
        engine: a mean-field engine (default: sequential, run to tol 1e-10).
        form: ``"sequence"`` or ``"frame"`` (module docstring).
        l2_intent: weight of the L2 pull of φXI toward zero.
        free, target: precomputed marginals (Results or name -> tensor dicts) to hold Q and
            Q* fixed, e.g. for torch.autograd.gradcheck.
    """
    if form not in ("sequence", "frame"):
        raise FieldlibError(f"form must be 'sequence' or 'frame', got {form!r}")
    engine = engine or get_engine("meanfield", schedule="sequential", tol=1e-10, max_iter=1000)
    free = _marginals_of(graph, free, engine, None)
    target = _marginals_of(graph, target, engine, _labels(graph, labels))
    n = graph.batch_size
    qf = MeanFieldState.from_marginals(graph, free, n)
    qt = MeanFieldState.from_marginals(graph, target, n)
    total = torch.zeros(qf.batch, dtype=graph.dtype, device=graph.device)
    for f in graph.factors:
        if form == "frame":
            pf, pt = f.position_energy(qf), f.position_energy(qt)
            if pf:
                for key in pf:
                    total = total + (pf[key] - pt[key]).sum(-1)
                continue
        total = total + f.expected_energy(qf) - f.expected_energy(qt)
    penalty = intent_penalty(graph, l2_intent)
    per_sequence = total if n is not None else total[0]
    return MeanFieldLoss(per_sequence.sum() + penalty, per_sequence, penalty, free, target)


# -- the closed forms, written out (the oracle for the surrogate) ------------------------------
def factor_parameters(graph) -> dict[str, torch.Tensor]:
    """``{"<factor>.<parameter>": tensor}``: every parameter each factor declares
    (:meth:`~fieldlib.factors.Factor.parameters`: Table.log_potential, SparseTable.values,
    Component.table, FrameIntent.table, KernelTemporal.mu, and a user's factor's own), the
    keys of :func:`closed_form_gradients`."""
    return {f"{f.name}.{name}": t for f in graph.factors for name, t in f.parameters().items()}


def per_frame_mu_gradient(f: KernelTemporal, marginals, n: int) -> torch.Tensor:
    """``(N, T, D, D)``: Eq. 9's rows of frame i for the marginals ``marginals`` (name ->
    tensor):  Q_i(a) Σ_{j>i} k(i,j) Q_j(b) + Q_i(b) Σ_{j<i} k(j,i) Q_j(a), on the component.
    Their sum over i is twice Σ_{i<j} k(i,j) Q_i(a) Q_j(b)
    (:meth:`~fieldlib.factors.KernelTemporal.per_frame_gradient`)."""
    return f.per_frame_gradient(FixedBeliefs(marginals, n))


def closed_form_gradients(graph, free, target, *, form: str = "sequence",
                          l2_intent: float = 0.0) -> dict[str, torch.Tensor]:
    """MATH.md §6 written out: ``{"<factor>.<parameter>": d loss / d parameter}`` with
    loss = -l, i.e. (model marginal - target) on each parameter, plus ``l2_intent · φXI``.
    Each factor computes its own (:meth:`~fieldlib.factors.Factor.closed_form_gradient`).

    Args:
        free, target: Q and Q* (Results or name -> marginal dicts), e.g. from
            :func:`meanfield_loss` (``.free``, ``.target``) or exact engines.
        form: ``"sequence"`` (µ: Σ_{i<j}) or ``"frame"`` (µ: the sum of Eq. 9's per-frame
            rows, twice the sequence form).

    The parameters of a factor type without a closed form (a user's type that defines no
    ``energy_gradient``) have no entry; :func:`fieldlib.inference.check.compare_closed_form`
    and ``fieldlib gradcheck`` report them as "no closed form".
    """
    free = free.marginals if hasattr(free, "marginals") else free
    target = target.marginals if hasattr(target, "marginals") else target
    n = graph.batch_size or 1
    qf, qt = FixedBeliefs(free, n), FixedBeliefs(target, n)
    out = {}
    for f in graph.factors:
        grads = f.closed_form_gradient(qf, qt, form)
        if grads is None:
            continue
        pulled = _pulled(f) if l2_intent else []
        for name, grad in grads.items():
            if name in pulled:
                grad = grad + l2_intent * f.parameters()[name].detach()
            out[f"{f.name}.{name}"] = grad
    return out
