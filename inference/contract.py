"""Log-space tensor contraction along an opt_einsum path, with cost accounting.

An exact query is one contraction: log Z = log Σ_x Π_f φ_f(x_f), each operand a log-table
labelled by variable ids plus the batch label :data:`BATCH`. This module

* turns an elimination order into an opt_einsum-format path (a list of operand-position
  tuples, contracted operands removed and the result appended), or takes a path from one of
  opt_einsum's optimisers;
* accounts for what the executor really allocates, step by step, so an engine can refuse
  before it starts (:func:`path_cost`);
* executes the path in the log semiring (exp-shift, ``torch.einsum``, ``safe_log``: the
  pyro.ops.einsum.torch_log recipe, without its 26-symbol limit) or the max semiring with
  back-pointers for MAP (:func:`contract_path`).

Labels are ints: variable ids >= 0 and ``BATCH = -1``, present in every operand and in the
output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pyro.ops.special import safe_log

from fieldlib.errors import TooLargeError

__all__ = ["BATCH", "Step", "PathCost", "order_to_path", "path_cost", "contract_path",
           "backtrack"]

BATCH = -1
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Step:
    """One contraction: operands at ``positions`` (of the live list) -> labels ``out``."""

    positions: tuple[int, ...]
    inputs: tuple[tuple[int, ...], ...]
    out: tuple[int, ...]


@dataclass
class PathCost:
    """What executing a path costs, in elements (multiply by itemsize for bytes).

    Attributes:
        largest_intermediate: the largest step output (opt_einsum's figure).
        largest_union: the largest union of a step's input labels (what a max-semiring step
            materialises).
        flops: Σ over steps of the union size (one multiply-add per element).
        retained: elements kept alive for backward (exp'd inputs and outputs of each step).
        peak: retained plus the largest transient of one step: an upper estimate of peak
            memory for log Z with gradients (marginals).
        map_peak: peak for a max-semiring pass (unions plus int64 back-pointers).
    """

    steps: list[Step]
    largest_intermediate: int
    largest_union: int
    flops: int
    retained: int
    peak: int
    map_peak: int


def _size(labels, cards) -> int:
    return math.prod(cards[label] for label in labels)


def _simulate(labels: Sequence[tuple[int, ...]], path) -> list[Step]:
    """Replay an opt_einsum path over label tuples; a step keeps the labels that another
    live operand (or the output, i.e. BATCH) still needs."""
    live = [tuple(lab) for lab in labels]
    steps = []
    for positions in path:
        positions = tuple(sorted(positions, reverse=True))
        inputs = tuple(live[p] for p in positions)
        for p in positions:
            live.pop(p)
        needed = {BATCH}
        for lab in live:
            needed.update(lab)
        union = []
        for lab in inputs:
            union.extend(x for x in lab if x not in union)
        out = tuple(x for x in union if x in needed)
        steps.append(Step(positions, inputs, out))
        live.append(out)
    if len(live) != 1:
        raise ValueError(f"the path leaves {len(live)} operands, expected one")
    return steps


def order_to_path(labels: Sequence[tuple[int, ...]], order: Sequence[int], cards) -> list:
    """Pairwise opt_einsum path from an elimination order.

    For each variable in ``order`` the operands that hold it are combined two at a time,
    smallest union first; the last combination sums the variable out. Whatever is left
    (operands holding only the batch label) is combined at the end.
    """
    live = [tuple(lab) for lab in labels]
    path = []

    def combine(ids: list[int]) -> None:
        # ids index into `live`; repeatedly merge the pair with the smallest union
        ids = list(ids)
        while len(ids) > 1:
            best = None
            for a in range(len(ids)):
                for b in range(a + 1, len(ids)):
                    u = set(live[ids[a]]) | set(live[ids[b]])
                    cost = _size(u, cards)
                    if best is None or cost < best[0]:
                        best = (cost, ids[a], ids[b])
            _, i, j = best
            _merge([i, j])
            ids = [k for k in ids if k not in (i, j)]
            ids = [k - (k > i) - (k > j) for k in ids] + [len(live) - 1]

    def _merge(ids: list[int]) -> None:
        ids = sorted(ids, reverse=True)
        inputs = [live[k] for k in ids]
        for k in ids:
            live.pop(k)
        needed = {BATCH}
        for lab in live:
            needed.update(lab)
        union = []
        for lab in inputs:
            union.extend(x for x in lab if x not in union)
        live.append(tuple(x for x in union if x in needed))
        path.append(tuple(sorted(ids)))

    for v in order:
        bucket = [k for k, lab in enumerate(live) if v in lab]
        if not bucket:
            continue
        if len(bucket) == 1:
            _merge(bucket)  # sum v out of a lone operand
        else:
            combine(bucket)
    if len(live) > 1:
        combine(list(range(len(live))))
    elif not path:
        path.append((0,))
    return path


def path_cost(labels: Sequence[tuple[int, ...]], path, cards: dict) -> PathCost:
    """Account for a path (see :class:`PathCost`); ``cards`` maps label -> size."""
    steps = _simulate(labels, path)
    largest = largest_union = flops = retained = transient = map_peak = 0
    inputs_total = sum(_size(lab, cards) for lab in labels)
    for s in steps:
        union = set().union(*map(set, s.inputs))
        u, o = _size(union, cards), _size(s.out, cards)
        ins = sum(_size(lab, cards) for lab in s.inputs)
        largest, largest_union = max(largest, o), max(largest_union, u)
        flops += u
        retained += ins + 2 * o          # exp'd inputs + einsum result + log result
        transient = max(transient, 2 * ins + o)  # permuted copies inside torch.einsum
        map_peak = max(map_peak, 3 * u + 2 * o)  # broadcast sum, max values, back-pointers
    return PathCost(steps, largest, largest_union, flops, retained,
                    inputs_total + retained + transient, inputs_total + map_peak)


def _equation(inputs, out) -> str:
    symbols: dict[int, str] = {}
    for lab in (*inputs, out):
        for x in lab:
            if x not in symbols:
                if len(symbols) == len(_LETTERS):
                    raise TooLargeError(
                        "one contraction step spans more than 52 variables; the graph is too "
                        "wide for exact inference"
                    )
                symbols[x] = _LETTERS[len(symbols)]
    ins = ",".join("".join(symbols[x] for x in lab) for lab in inputs)
    return ins + "->" + "".join(symbols[x] for x in out)


def _log_step(tensors, inputs, out):
    """log Σ exp over the labels not in ``out``: exp-shift, einsum, safe_log, unshift."""
    shifts, exps = [], []
    for t, lab in zip(tensors, inputs):
        reduce_dims = [d for d, x in enumerate(lab) if x not in out]
        shift = t.detach()
        if reduce_dims:
            shift = shift.amax(dim=reduce_dims, keepdim=True)
        shift = shift.clamp(min=torch.finfo(t.dtype).min)  # no -inf - -inf
        exps.append((t - shift).exp())
        kept = [x for x in lab if x in out]
        s = shift.reshape([t.shape[d] for d, x in enumerate(lab) if x in out])
        ordered = sorted(kept, key=out.index)
        s = s.permute([kept.index(x) for x in ordered])
        view = [s.shape[ordered.index(x)] if x in ordered else 1 for x in out]
        shifts.append(s.reshape(view))
    result = safe_log(torch.einsum(_equation(inputs, out), *exps))
    for s in shifts:
        result = result + s
    return result


def _max_step(tensors, inputs, out):
    """max over the labels not in ``out``; also the flat argmax over those labels."""
    union = []
    for lab in inputs:
        union.extend(x for x in lab if x not in union)
    reduced = [x for x in union if x not in out]
    order = list(out) + reduced
    total = None
    for t, lab in zip(tensors, inputs):
        perm = sorted(range(len(lab)), key=lambda d: order.index(lab[d]))
        t = t.permute(perm)
        placed = [lab[d] for d in perm]
        shape = [t.shape[placed.index(x)] if x in placed else 1 for x in order]
        t = t.reshape(shape)
        total = t if total is None else total + t
    shape = list(total.shape[: len(out)])
    sizes = list(total.shape[len(out):])
    if not reduced:
        return total, None, []
    flat = total.reshape(shape + [-1])
    # amax + argmax: torch.max(dim) is ~500x slower on small tensors in torch 2.14
    values, arg = flat.amax(dim=-1), flat.argmax(dim=-1)
    return values, arg, list(zip(reduced, sizes))


def contract_path(operands: Sequence[torch.Tensor], labels: Sequence[tuple[int, ...]], path,
                  semiring: str = "sum"):
    """Contract log-tables along ``path``; the output keeps only :data:`BATCH`.

    Args:
        operands: log-tables, each with one axis per label (BATCH axis included).
        labels: label tuple of each operand.
        path: opt_einsum-format path.
        semiring: ``"sum"`` (log-sum-exp: log Z) or ``"max"`` (max-sum: MAP score).

    Returns:
        ``(result (N,), backpointers)``; backpointers (max semiring only) is a list of
        ``(out_labels, argmax, [(label, size), ...])`` per step, for :func:`backtrack`.
    """
    live = list(zip(operands, [tuple(lab) for lab in labels]))
    pointers = []
    for step in _simulate(labels, path):
        group = [live[p] for p in step.positions]
        for p in step.positions:
            live.pop(p)
        tensors = [g[0] for g in group]
        if semiring == "sum":
            if len(tensors) == 1 and step.out == step.inputs[0]:
                result = tensors[0]
            else:
                result = _log_step(tensors, step.inputs, step.out)
        else:
            result, arg, reduced = _max_step(tensors, step.inputs, step.out)
            pointers.append((step.out, arg, reduced))
        live.append((result, step.out))
    (result, out), = live
    if out != (BATCH,):
        perm = [out.index(BATCH)] + [d for d, x in enumerate(out) if x != BATCH]
        result = result.permute(perm)
        result = result.reshape(result.shape[0], -1)
        result = torch.logsumexp(result, -1) if semiring == "sum" else result.amax(-1)
    return result, pointers


def backtrack(pointers, batch: int) -> dict[int, torch.Tensor]:
    """Read a MAP assignment ``{label: LongTensor (N,)}`` off max-semiring back-pointers.

    Steps are replayed last to first: each step's output labels are assigned by then (they
    are consumed later or are the batch), so its argmax gives its reduced labels.
    """
    value: dict[int, torch.Tensor] = {}
    for out, arg, reduced in reversed(pointers):
        if arg is None:
            continue
        rows = torch.arange(batch, device=arg.device)
        # gather: arg has axes in `out` order; pick entries at the assigned values
        idx = [rows if x == BATCH else value[x] for x in out]
        flat = arg[tuple(idx)]
        for label, size in reversed(reduced):
            value[label] = flat % size
            flat = flat // size
    return value
