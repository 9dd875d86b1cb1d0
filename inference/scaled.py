"""Sum-product steps in scaled linear space: the fast path of :func:`contract.contract_path`.

A log-space step costs exp, log and shift passes over every large tensor (and torch runs
element-wise kernels slowly on tensors of many small axes). Here an operand is kept as
``value = t * exp(scale)``: ``t`` a linear tensor (batch axis first), ``scale (N,)`` a
detached per-batch log-scale. A step is then products and one ``torch.einsum`` (a batched
matmul), with no transcendental function at all.

Range is guarded, not hoped for: each operand carries log2 bounds ``lo`` (every positive
entry >= 2**lo) and ``hi`` (every entry <= 2**hi). A step's product terms lie within
``[Σ lo, Σ hi + log2 K]`` (K summed terms per output entry). When that could overflow,
inputs are renormalised by their max (one pass); when it could underflow, the inputs' true
smallest positive entries are measured; if the step is still unsafe, :class:`Unsafe` is
raised and the caller finishes the contraction in log space (pyro's torch_log recipe),
where no range limit exists. Exact zeros (``-inf`` log-potentials) stay exact zeros.
Gradients (marginals) flow through ``exp`` of the inputs, the products and the einsums; the
scales are constants, so ``log t + scale`` differentiates to the exact log Z gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fieldlib.errors import TooLargeError

__all__ = ["Scaled", "Unsafe", "from_log", "to_log", "scaled_step", "safe_log", "einsum_labels"]


class _SafeLog(torch.autograd.Function):
    """log x whose gradient is 1/x where x > 0 and 0 where x == 0 (an impossible state
    contributes nothing). pyro's safe_log clamps x at machine epsilon in backward, which is
    wrong for the tiny (unnormalised) values scaled contraction produces."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        positive = x > 0
        return torch.where(positive, grad / torch.where(positive, x, torch.ones_like(x)),
                           torch.zeros_like(grad))


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """Natural log with a finite gradient at 0 (see :class:`_SafeLog`)."""
    return _SafeLog.apply(x)


class Unsafe(Exception):
    """A scaled step could under- or overflow; finish in log space."""


@dataclass
class Scaled:
    """``value = t * exp(scale)``: ``t`` linear ``(N, ...)`` with axes ``labels`` (batch
    first), ``scale (N,)`` detached, ``lo``/``hi`` log2 bounds on t's positive entries."""

    t: torch.Tensor
    labels: tuple[int, ...]
    scale: torch.Tensor
    lo: float
    hi: float
    measured: bool = False
    #: the log-table this operand was made from (inputs only): the log-space fallback
    #: restarts from it, never from ``t``, whose entries far below the max underflowed to 0
    log: torch.Tensor | None = None


def _limits(dtype: torch.dtype) -> tuple[float, float]:
    info = torch.finfo(dtype)
    return 0.8 * math.log2(info.tiny), 0.8 * math.log2(info.max)


def _per_batch(t: torch.Tensor, op) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    return op(flat, 1) if flat.shape[1] else t.new_zeros(t.shape[0])


def from_log(tables, labels) -> list[Scaled]:
    """Log-tables (batch axis first, all of one batch size N) as scaled linear operands,
    each shifted by its own per-batch max: a few vectorised ops for all tables at once."""
    if not tables:
        return []
    n = tables[0].shape[0]
    flat = [t.reshape(n, -1) for t in tables]
    lengths = [f.shape[1] for f in flat]
    data = torch.cat(flat, dim=1) if len(flat) > 1 else flat[0]
    with torch.no_grad():
        d = data.detach().t()
        counts = torch.tensor(lengths, device=d.device)
        m = torch.segment_reduce(d, "max", lengths=counts, axis=0)          # (k, N)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        finite = torch.where(torch.isfinite(d), d, torch.full_like(d, math.inf))
        low = torch.segment_reduce(finite, "min", lengths=counts, axis=0) - m
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low)).amin(1)
        lows = (low / math.log(2)).tolist()
        shift = m.repeat_interleave(counts, dim=0).t()
    parts = (data - shift).exp().split(lengths, dim=1)
    return [Scaled(p.reshape(t.shape), tuple(lab), m[k], lows[k], 0.0, True, t)
            for k, (p, t, lab) in enumerate(zip(parts, tables, labels))]


def to_log(op: Scaled) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The log-table of a scaled operand (for the log-space fallback).

    An input operand returns the log-table it was made from. A step's result is rebuilt from
    ``t``: exact, since the range guard admitted the step only if every positive entry is a
    normal float (its zeros are true zeros)."""
    if op.log is not None:
        return op.log, op.labels
    view = (-1,) + (1,) * (op.t.dim() - 1)
    return safe_log(op.t) + op.scale.view(view), op.labels


def _normalise(op: Scaled) -> Scaled:
    """Divide by the per-batch max (one pass): hi becomes 0."""
    with torch.no_grad():
        m = _per_batch(op.t.detach(), lambda f, k: f.amax(k))
        m = torch.where(m > 0, m, torch.ones_like(m))
        top = float(m.max())
    view = (-1,) + (1,) * (op.t.dim() - 1)
    return Scaled(op.t / m.view(view), op.labels, op.scale + m.log(), op.lo - math.log2(top),
                  0.0, op.measured)


def _measure(op: Scaled) -> Scaled:
    """Replace ``lo`` by the measured smallest positive entry (masked min, a few passes)."""
    with torch.no_grad():
        d = op.t.detach()
        positive = torch.where(d > 0, d, torch.full_like(d, math.inf))
        low = float(positive.amin()) if d.numel() else 1.0
    lo = math.log2(low) if math.isfinite(low) and low > 0 else 0.0
    return Scaled(op.t, op.labels, op.scale, max(op.lo, lo), op.hi, True)


def _place(t: torch.Tensor, lab: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
    """View ``t`` (axes ``lab``) on ``target``'s axes: permuted, size-1 where absent."""
    pos = {x: i for i, x in enumerate(target)}
    perm = sorted(range(len(lab)), key=lambda d: pos[lab[d]])
    if perm != list(range(len(lab))):
        t = t.permute(perm)
    if len(lab) == len(target):
        return t
    shape = [1] * len(target)
    for i, d in enumerate(perm):
        shape[pos[lab[d]]] = t.shape[i]
    return t.reshape(shape)


def _mul(a, la, b, lb):
    """Broadcast product of two linear tensors. The larger keeps its layout; the smaller's
    own labels go right after the last label both share, so the larger's trailing own
    labels form one contiguous inner block (fast element-wise kernels and reductions)."""
    if a.numel() < b.numel():
        a, la, b, lb = b, lb, a, la
    in_a = set(la)
    extra = tuple(x for x in lb if x not in in_a)
    shared_b = set(lb)
    cut = max((i for i, x in enumerate(la) if x in shared_b), default=0) + 1
    target = la[:cut] + extra + la[cut:]
    left = _place(a, la, target) if extra else a
    return left * _place(b, lb, target), target


def _product(ops: list[Scaled]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Product of linear tensors, smallest first (see :func:`_mul` for the layouts)."""
    ops = sorted(ops, key=lambda o: o.t.numel())
    acc, lab = ops[0].t, ops[0].labels
    for op in ops[1:]:
        acc, lab = _mul(acc, lab, op.t, op.labels)
    return acc, lab


def scaled_step(ops: list[Scaled], out: tuple[int, ...], plan) -> Scaled:
    """Contract scaled operands onto the labels ``out`` (as a set; the result's layout is
    chosen for speed and returned in ``labels``). ``plan`` is contract._plan's
    ``(reduced, group_a, group_b)``. Raises :class:`Unsafe` when the range guard fails."""
    reduced, ga, gb = plan
    low_limit, high_limit = _limits(ops[0].t.dtype)
    sizes = {}
    for op in ops:
        sizes.update(zip(op.labels, op.t.shape))
    terms = math.prod(sizes[x] for x in reduced) if reduced else 1
    ops = list(ops)
    hi = sum(o.hi for o in ops) + math.log2(terms)
    if hi > high_limit / 2:
        ops = [_normalise(o) if o.hi > 0 else o for o in ops]
        hi = sum(o.hi for o in ops) + math.log2(terms)
    lo = sum(o.lo for o in ops)
    if lo < low_limit:
        ops = [o if o.measured else _measure(o) for o in ops]
        lo = sum(o.lo for o in ops)
    if lo < low_limit or hi > high_limit:
        raise Unsafe
    scale = ops[0].scale
    for o in ops[1:]:
        scale = scale + o.scale
    if ga is None:
        t, lab = _product(ops)
    else:
        a, la = _product([ops[k] for k in ga])
        if not gb:
            dims = [d for d, x in enumerate(la) if x in reduced]
            t, lab = a.sum(dim=dims), tuple(x for x in la if x not in reduced)
        else:
            b, lb = _product([ops[k] for k in gb])
            t, lab = _einsum(a, la, b, lb, set(reduced))
    return Scaled(t, lab, scale, lo, hi)


def einsum_labels(a, la, b, lb, out) -> torch.Tensor:
    """``torch.einsum`` of two tensors whose axes carry integer labels (any ints, any
    number), written in torch's sublist form: no alphabet of letters to run out of."""
    ids: dict[int, int] = {}
    for x in (*la, *lb, *out):
        ids.setdefault(x, len(ids))
    if len(ids) > 52:  # torch's own limit on distinct subscripts in one einsum
        raise TooLargeError(f"one contraction step spans {len(ids)} variables (torch.einsum "
                            f"takes at most 52); the graph is too wide for exact inference")
    return torch.einsum(a, [ids[x] for x in la], b, [ids[x] for x in lb],
                        [ids[x] for x in out])


def _einsum(a, la, b, lb, reduced):
    """``Σ_reduced a * b`` with the output laid out as bmm produces it: labels shared by
    both (batch first), then a's own, then b's own."""
    in_b = set(lb)
    in_a = set(la)
    shared = tuple(x for x in la if x in in_b and x not in reduced)
    own_a = tuple(x for x in la if x not in in_b and x not in reduced)
    own_b = tuple(x for x in lb if x not in in_a and x not in reduced)
    out = shared + own_a + own_b
    return einsum_labels(a, la, b, lb, out), out
