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

__all__ = ["Scaled", "Unsafe", "from_log", "to_log", "scaled_step", "safe_log", "einsum_labels",
           "table_ranges"]


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


#: Elements stacked at once by :func:`from_log` and :func:`table_ranges`: groups of same-shape
#: tables are processed in chunks of about this size. One stack of every table (a chain of
#: 512 steps: 6.5M elements) spends most of its time faulting in fresh pages; chunks reuse
#: the allocator's blocks (3-4x faster on a padded chain, docs/benchmarks.md).
CHUNK_ELEMENTS = 2**18


def _chunks(tables):
    """``(shape, shared, members)``: groups of ``tables`` (batch axis first) with one shape
    (``shape``: without the batch axis), each at most about :data:`CHUNK_ELEMENTS`;
    ``shared``: expanded along the batch (stride 0, e.g. an unbatched table), handled as
    one row, not N."""
    groups: dict[tuple, list[int]] = {}
    for k, t in enumerate(tables):
        shared = t.shape[0] > 1 and t.stride(0) == 0
        groups.setdefault((tuple(t.shape), shared), []).append(k)
    for (shape, shared), members in groups.items():
        size = max(math.prod(shape[1:]) * (1 if shared else shape[0]), 1)
        step = max(1, CHUNK_ELEMENTS // size)
        for i in range(0, len(members), step):
            yield shape[1:], shared, members[i:i + step]


def _row_ranges(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, min over finite entries)`` along the last axis of ``d``: -inf for a row with
    no finite entry (max) or none at all (min is then +inf). One pass each, and the masked
    minimum only for rows that hold a -inf."""
    top, low = d.amax(-1), d.amin(-1)
    holes = torch.isneginf(low)
    if bool(holes.any()):
        rows = d[holes]
        low = low.clone()
        low[holes] = torch.where(torch.isneginf(rows), torch.full_like(rows, math.inf),
                                 rows).amin(-1)
    return top, low


def table_ranges(tables) -> torch.Tensor:
    """``(k,)`` float64: the largest magnitude of a finite entry of each table (0 when it
    has none). One ``aminmax`` a table (a table shared by the batch: its first row); the
    tables holding a -inf are measured again, masked, per chunk of one shape."""
    out = torch.zeros(len(tables), dtype=torch.float64)
    if not tables:
        return out
    with torch.no_grad():
        rows = [t.detach() for t in tables]
        rows = [t[:1] if t.shape[0] > 1 and t.stride(0) == 0 else t for t in rows]
        low, top = zip(*(torch.aminmax(t) for t in rows))
        low, top = torch.stack(low).double().cpu(), torch.stack(top).double().cpu()
        out = torch.maximum(top.abs(), low.abs())
        holes = torch.isneginf(low).nonzero().flatten().tolist()
        if holes:
            for _, _, members in _chunks([rows[k] for k in holes]):
                d = torch.stack([rows[holes[j]] for j in members]).reshape(len(members), -1)
                top, low = _row_ranges(d)
                top = torch.where(torch.isfinite(top), top.abs(), torch.zeros_like(top))
                low = torch.where(torch.isfinite(low), low.abs(), torch.zeros_like(low))
                out[[holes[j] for j in members]] = torch.maximum(top, low).double().cpu()
    return out


def from_log(tables, labels) -> list[Scaled]:
    """Log-tables (batch axis first, all of one batch size N) as scaled linear operands,
    each shifted by its own per-batch max: a few vectorised ops per chunk of same-shape
    tables (:func:`_chunks`; a chain of T steps is a few chunks, not T operands one by one).

    A table shared by the batch (expanded along it: stride 0, e.g. an unbatched transition
    matrix) is exponentiated once and its result expanded, not once per batch element: the
    same values, N times less work and memory."""
    if not tables:
        return []
    n = tables[0].shape[0]
    out: list = [None] * len(tables)
    for shape, shared, members in _chunks(tables):
        rows = 1 if shared else n
        data = torch.stack([tables[k][:rows] for k in members]).reshape(len(members), rows, -1)
        with torch.no_grad():
            m, low = _row_ranges(data.detach())                               # (k, rows)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            low = low - m
            low = torch.where(torch.isfinite(low), low, torch.zeros_like(low)).amin(1)
            lows = (low / math.log(2)).tolist()
        parts = data.sub_(m[..., None]).exp_()  # in place: no fresh pages for a copy
        for j, k in enumerate(members):
            p, scale = parts[j].reshape(rows, *shape), m[j]
            if shared:
                p, scale = p.expand(n, *shape), scale.expand(n)
            out[k] = Scaled(p, tuple(labels[k]), scale, lows[j], 0.0, True, tables[k])
    return out


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
