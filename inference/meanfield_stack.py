"""Many small tables, one tensor program: the mean-field messages of a file-style model.

A model read from a UAI file is hundreds of :class:`~fieldlib.factors.Table` s over
stand-alone variables. Calling each factor's message in turn costs a Python round trip per
factor and variable; instead, the engine stacks every such table of the same shape into
``(N, M, d_1, ..., d_k)`` (stand-alone variables of one cardinality share one pool of Q, so
slot j of every stacked table reads the same pool) and computes all their messages with one
einsum per slot and one ``index_add`` into the pool. Only an optimisation: the result is
the factors' own ``expected_messages``.
"""

from __future__ import annotations

import torch

from fieldlib.factors.base import _PENALTY
from fieldlib.factors.table import SparseTable, Table

__all__ = ["TableStack", "stack_tables"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class TableStack:
    """Tables of one shape over pooled stand-alone variables, stacked.

    Attributes:
        factors: the stacked factors.
        groups: pool group of each slot; positions ``(M, k)``: each table's variables there.
    """

    kind = "table_stack"

    def __init__(self, factors, layout):
        self.factors = list(factors)
        self.layout = layout
        first = self.factors[0]
        self.arity = len(first.scope)
        self.groups = [layout.where[v][0] for v in first.scope]
        self.positions = torch.tensor([[layout.where[v][1] for v in f.scope]
                                       for f in self.factors], dtype=torch.long)
        self.variables = [tuple(f.scope) for f in self.factors]

    def table(self) -> torch.Tensor:
        """``(N or 1, M, d...)`` (differentiable in the factors' tensors)."""
        tabs = [f.dense() if isinstance(f, SparseTable) else f.log_potential
                for f in self.factors]
        if any(f.batched for f in self.factors):
            n = next(f.batch_size for f in self.factors if f.batched)
            tabs = [t if f.batched else t.expand(n, *t.shape) for t, f in zip(tabs, self.factors)]
            return torch.stack(tabs, 1)
        return torch.stack(tabs, 0).unsqueeze(0)

    def couplings(self):
        return self.variables

    def _parts(self):
        if not hasattr(self, "_cached"):
            t = self.table().detach()
            neginf = torch.isneginf(t)
            self._cached = (t.masked_fill(neginf, 0.0),
                            neginf.to(t.dtype) if bool(neginf.any()) else None)
        return self._cached

    def _expect(self, parts, qs, keep, rows=None):
        finite, ind = parts
        if rows is not None:
            finite = finite.index_select(1, rows)
            ind = None if ind is None else ind.index_select(1, rows)
        k = self.arity
        letters = _LETTERS[:k]
        others = [j for j in range(k) if j != keep]
        eq = ",".join(["nm" + letters] + ["nm" + letters[j] for j in others]) + "->nm" + (
            letters[keep] if keep is not None else "")
        n = qs[0].shape[0]
        ops = [qs[j] for j in others]
        value = torch.einsum(eq, finite.expand(n, *finite.shape[1:]), *ops)
        if ind is None:
            return value
        imp = torch.einsum(eq, ind.expand(n, *ind.shape[1:]), *ops)
        if _PENALTY[0] is not None:
            return value - _PENALTY[0] * imp
        return value.masked_fill(imp > 0, float("-inf"))

    def group_messages(self, state, groups) -> dict:
        """``{group: (N, L, d)}`` summed messages of the stack to the wanted pools."""
        out: dict = {}
        parts = self._parts()
        for a, g in enumerate(self.groups):
            if groups is not None and g not in groups:
                continue
            pos = self.positions[:, a]
            mask = None if groups is None else groups[g]
            rows = None
            if mask is not None:
                rows = mask[pos].nonzero().flatten()
                if not len(rows):
                    continue
                pos = pos[rows]
            sel = self.positions if rows is None else self.positions[rows]
            qs = [state.q[self.groups[j]][:, sel[:, j]] for j in range(self.arity)]
            m = self._expect(parts, qs, a, rows)  # (N, rows, d_a)
            size = self.layout.groups[g]
            buf = out.get(g)
            if buf is None:
                buf = m.new_zeros(state.batch, size.size, size.card)
            out[g] = buf.index_add(1, pos.to(m.device), m)
        return out

    def expected_energy(self, state, differentiable: bool = False) -> torch.Tensor:
        qs = [state.q[g][:, self.positions[:, j]] for j, g in enumerate(self.groups)]
        if differentiable:
            t = self.table()
            neginf = torch.isneginf(t)
            parts = (t.masked_fill(neginf, 0.0),
                     neginf.to(t.dtype) if bool(neginf.any()) else None)
        else:
            parts = self._parts()
        return self._expect(parts, qs, None).sum(1)


def stack_tables(factors, layout):
    """Split ``factors`` into TableStacks (Tables / SparseTables over stand-alone variables,
    grouped by shape and batching) and the rest, in order."""
    buckets: dict = {}
    rest = []
    for f in factors:
        if (type(f) in (Table, SparseTable) and f.length is None
                and all(layout.groups[layout.where[v][0]].array is None for v in f.scope)
                and len({id(v) for v in f.scope}) == len(f.scope)):
            key = (tuple(v.cardinality for v in f.scope), f.batched)
            buckets.setdefault(key, []).append(f)
        else:
            rest.append(f)
    return [TableStack(fs, layout) for fs in buckets.values()], rest
