"""Exact samples from a field: forward filtering, backward sampling along the exact plan.

Variable elimination computes log Z as a sequence of steps (:class:`~.contract.Plan`): step
n takes some live log-tables, and sums out the labels ``reduced`` that no other live table
holds, leaving a message over ``out``. Read backwards, the same steps factorise the joint:

    p(x) = Π_n  Π_{inputs of n} φ(x) / m_n(x_out(n))

so, once the labels of ``out(n)`` are drawn (they are summed out by a later step, or are
the batch), the labels ``reduced(n)`` are distributed as the product of step n's inputs at
those values, normalised. This module

* runs the plan's steps forward in log space (:func:`forward`), keeping every step's input
  log-tables (the messages are the filter),
* walks the steps last to first and draws each step's ``reduced`` labels from that
  conditional for all samples and batch elements at once (:func:`backward_sample`): each
  input is indexed at the drawn values of its other labels (a gather of ``(S, N, ...)``
  rows, never the step's whole clique per sample), the rows are added, and one Gumbel-max
  draw picks the joint state of the reduced labels.

It reads only the plan objects :mod:`.contract` exposes (``Plan.steps``: positions, inputs,
out, reduced, passthrough); the forward pass is its own log-space executor, because the
executor of :mod:`.contract` keeps its intermediate messages in scaled linear space and
returns only log Z. Each forward step materialises the broadcast sum of its inputs over
``out + reduced`` (what the max semiring of MAP does too), reduced by ``torch.logsumexp``:
exact for any finite or ``-inf`` log-values, so a state of probability zero (a ``-inf``
entry) gets a ``-inf`` logit and Gumbel-max never draws it. Memory is therefore bounded by
:attr:`~.contract.PathCost.map_peak` (the MAP estimate), plus the kept messages and the
``(S, N, R)`` logits of the widest step (:func:`sampling_elements`).
"""

from __future__ import annotations

import math

import torch

from .contract import BATCH, Plan

__all__ = ["forward", "backward_sample", "gumbel_argmax", "sampling_elements"]


def _place(t: torch.Tensor, lab: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
    """``t`` (axes ``lab``) permuted and reshaped to broadcast on ``target``."""
    order = [x for x in target if x in lab]
    t = t.permute([lab.index(x) for x in order])
    shape, it = [], iter(t.shape)
    for x in target:
        shape.append(next(it) if x in lab else 1)
    return t.reshape(shape)


def forward(operands, plan: Plan):
    """Run ``plan`` on the log-tables ``operands`` (one per ``plan.labels``, batch first).

    Returns ``(log_z (N,), kept, final)``: ``kept[n]`` is the list of ``(table, labels)``
    inputs of step n (None for a pass-through step), ``final`` the last live table and its
    labels (normally ``(BATCH,)`` only; any other label it holds is drawn from it first).
    """
    live = [(t.detach(), tuple(lab)) for t, lab in zip(operands, plan.labels)]
    kept: list = []
    for step in plan.steps:
        group = [live[p] for p in step.positions]
        for p in step.positions:
            live.pop(p)
        if step.passthrough or (len(group) == 1 and group[0][1] == tuple(step.out)):
            kept.append(None)
            live.append(group[0])
            continue
        target = tuple(step.out) + tuple(step.reduced)
        placed = sorted((_place(t, lab, target) for t, lab in group), key=lambda t: -t.numel())
        total = placed[0]
        for t in placed[1:]:
            total = total + t
        k = len(step.reduced)
        if k:
            total = torch.logsumexp(total, dim=tuple(range(len(target) - k, len(target))))
        kept.append(group)
        live.append((total, tuple(step.out)))
    (final, labels), = live
    rest = tuple(range(1, final.dim()))
    perm = [labels.index(BATCH)] + [d for d, x in enumerate(labels) if x != BATCH]
    table = final.permute(perm)
    log_z = torch.logsumexp(table, dim=rest) if rest else table
    return log_z, kept, (final, labels)


def gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row of the last axis from softmax(``logits``): argmax of logits plus
    Gumbel noise (log space throughout; a ``-inf`` logit is never drawn while the row has a
    finite one)."""
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
    u = u.clamp_min(torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def _draw(tables, reduced, cards, values, batch_idx) -> None:
    """Draw the labels ``reduced`` given ``values`` of every other label of ``tables``."""
    s, n = batch_idx.shape
    logits = None
    for t, lab in tables:
        known = [x for x in lab if x not in reduced]
        free = [x for x in reduced if x in lab]
        t = t.permute([lab.index(x) for x in known + free])
        rows = t[tuple(batch_idx if x == BATCH else values[x] for x in known)]
        rows = rows.reshape((s, n) + tuple(cards[x] if x in lab else 1 for x in reduced))
        logits = rows if logits is None else logits + rows
    full = (s, n) + tuple(cards[x] for x in reduced)
    flat = gumbel_argmax(logits.expand(full).reshape(s, n, -1))
    for x in reversed(reduced):
        values[x] = flat % cards[x]
        flat = flat // cards[x]


def backward_sample(plan: Plan, kept, final, num_samples: int) -> dict[int, torch.Tensor]:
    """``{label: LongTensor (S, N)}`` for every label the plan eliminates: ``num_samples``
    exact joint draws per batch element, from :func:`forward`'s ``kept`` and ``final``."""
    table, labels = final
    n = table.shape[labels.index(BATCH)]
    batch_idx = torch.arange(n, device=table.device).expand(num_samples, n)
    values: dict[int, torch.Tensor] = {}
    cards = plan.cards
    rest = [x for x in labels if x != BATCH]
    if rest:
        _draw([final], rest, cards, values, batch_idx)
    for step, tables in zip(reversed(plan.steps), reversed(kept)):
        if tables is None or not step.reduced:
            continue
        _draw(tables, list(step.reduced), cards, values, batch_idx)
    return values


def sampling_elements(plan: Plan, num_samples: int) -> int:
    """Elements sampling holds beyond the MAP pass's figure: every kept message and, for
    the widest step, its ``(S, N, R)`` logits, noise and rows (three copies)."""
    n = plan.cards[BATCH]
    messages = sum(math.prod(plan.cards[x] for x in s.out) for s in plan.steps)
    widest = max((math.prod(plan.cards[x] for x in s.reduced) for s in plan.steps), default=1)
    return messages + 3 * num_samples * n * widest
