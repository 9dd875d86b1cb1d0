"""Many small tables, one tensor program: the mean-field messages of a file-style model, and
the hard zeros of a model as stacked boolean tables (a feasible starting point for Q).

A model read from a UAI file is hundreds of tables over stand-alone variables. Calling each
factor's message in turn costs a Python round trip per factor and variable; instead, the
engine stacks every factor that declares itself one dense table
(:meth:`~fieldlib.factors.Factor.dense_table`: Table and SparseTable over stand-alone
variables, or a user's type) by shape into ``(N, M, d_1, ..., d_k)`` (stand-alone variables
of one cardinality share one pool of Q, so slot j of every stacked table reads the same
pool) and computes all their messages with one einsum per slot and one ``index_add`` into
the pool. Only an optimisation: the result is the factors' own ``expected_messages``.

:class:`Constraints` stacks the same way the *-inf entries* of every factor's dense terms, as
boolean "allowed" tables, to find a configuration of positive probability for mean-field to
start from (docs/meanfield.md, "-inf potentials"): generalised arc consistency (a state
stays in a variable's domain only while every table over it allows some combination of the
other variables' domains) inside a depth-first search, budgeted in search nodes.
"""

from __future__ import annotations

import torch

from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS
from fieldlib.factors.beliefs import contract_table, split_impossible

__all__ = ["Constraints", "TableStack", "stack_tables"]


class TableStack:
    """Tables of one shape over pooled stand-alone variables, stacked.

    Attributes:
        factors: the M stacked factors; tables: their
            :meth:`~fieldlib.factors.Factor.dense_table` (``([N,] d_1, ..., d_k)`` each,
            differentiable in the factors' tensors); variables: their scopes.
        groups: pool group of each slot; positions ``(M, k)``: each table's variables there.
    """

    kind = "table_stack"

    def __init__(self, factors, tables, scopes, layout):
        self.factors, self.tables = list(factors), list(tables)
        self.layout = layout
        self.variables = [tuple(scope) for scope in scopes]
        self.arity = len(self.variables[0])
        self.groups = [layout.where[v][0] for v in self.variables[0]]
        self.positions = torch.tensor([[layout.where[v][1] for v in scope]
                                       for scope in self.variables], dtype=torch.long)

    def table(self) -> torch.Tensor:
        """``(N or 1, M, d...)`` (differentiable in the factors' tensors)."""
        k = self.arity
        batched = [t.dim() > k for t in self.tables]
        if any(batched):
            n = next(t.shape[0] for t, b in zip(self.tables, batched) if b)
            tabs = [t if b else t.expand(n, *t.shape) for t, b in zip(self.tables, batched)]
            return torch.stack(tabs, 1)
        return torch.stack(self.tables, 0).unsqueeze(0)

    def couplings(self):
        return self.variables

    def coupling_arity(self) -> int:
        return self.arity

    def has_hard_zeros(self, q=None) -> bool:
        return self._parts()[1] is not None

    def _parts(self):
        if not hasattr(self, "_cached"):
            self._cached = split_impossible(self.table().detach())
        return self._cached

    def _expect(self, parts, qs, keep, penalty, rows=None):
        """``(N, M, [d_keep])``: expected_log_table of every stacked table (MATH.md §3)."""
        finite, ind = parts
        if rows is not None:
            finite = finite.index_select(1, rows)
            ind = None if ind is None else ind.index_select(1, rows)
        others = [j for j in range(self.arity) if j != keep]
        n = qs[0].shape[0]
        return contract_table(finite.expand(n, *finite.shape[1:]),
                              None if ind is None else ind.expand(n, *ind.shape[1:]),
                              [qs[j] for j in others], others, keep, penalty,
                              lead=("n", "m"))

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
            m = self._expect(parts, qs, a, state.options.penalty, rows)  # (N, rows, d_a)
            size = self.layout.groups[g]
            buf = out.get(g)
            if buf is None:
                buf = m.new_zeros(state.batch, size.size, size.card)
            out[g] = buf.index_add(1, pos.to(m.device), m)
        return out

    def expected_energy(self, state, differentiable: bool = False) -> torch.Tensor:
        qs = [state.q[g][:, self.positions[:, j]] for j, g in enumerate(self.groups)]
        if differentiable:
            parts = split_impossible(self.table())
        else:
            parts = self._parts()
        return self._expect(parts, qs, None, state.options.penalty).sum(1)


def stack_tables(factors, layout):
    """Split ``factors`` into TableStacks (factors that declare one dense table over distinct
    stand-alone variables, grouped by shape and batching) and the rest, in order."""
    buckets: dict = {}
    rest = []
    for f in factors:
        table = f.dense_table()  # not None: ``f.scope`` holds Variables only
        scope = f.scope if table is not None else ()
        if not (scope and all(layout.groups[layout.where[v][0]].array is None for v in scope)
                and len({id(v) for v in scope}) == len(scope)):
            rest.append(f)
            continue
        key = (tuple(v.cardinality for v in scope), table.dim() > len(scope))
        bucket = buckets.setdefault(key, ([], [], []))
        bucket[0].append(f)
        bucket[1].append(table)
        bucket[2].append(scope)
    return [TableStack(*bucket, layout=layout) for bucket in buckets.values()], rest


class Constraints:
    """The hard zeros (-inf entries) of a graph's factors, as stacked boolean tables.

    Built from the factors' dense :meth:`~fieldlib.factors.Factor.terms`; a factor whose
    terms would exceed ``max_elements`` (or that has none) is left out, so a proof of
    infeasibility stays sound and a configuration found must still be checked against the
    full model. Domains are per Q group ``(N, L, d)`` booleans; positions that are not
    ``active`` (padding) constrain nothing.

    Attributes:
        stacks: ``[(groups, positions (M, k), allowed (N|1, M, d_1..d_k) bool)]``.
        dead: ``(N,)`` whether a term over no variable is -inf (the model is impossible).
    """

    def __init__(self, factors, layout, batch: int, device,
                 max_elements: int = DEFAULT_MAX_DENSE_ELEMENTS):
        self.layout = layout
        self.dead = torch.zeros(batch, dtype=torch.bool, device=device)
        buckets: dict = {}
        for f in factors:
            try:
                if f.dense_size() > max_elements:
                    continue
                terms = f.terms()
            except NotImplementedError:
                continue
            for term in terms:
                neginf = torch.isneginf(term.table.detach())
                if not bool(neginf.any()):
                    continue
                if not term.variables:  # a constant -inf
                    self.dead |= neginf.expand(batch).to(device)
                    continue
                where = [layout.where[v] for v in term.variables]
                key = (tuple(g for g, _ in where), tuple(neginf.shape[-len(where):]))
                bucket = buckets.setdefault(key, ([], []))
                bucket[0].append([p for _, p in where])
                bucket[1].append(~neginf if term.batched else (~neginf)[None])
        self.stacks = []
        for (groups, _), (pos, allowed) in buckets.items():
            n = max(t.shape[0] for t in allowed)
            allowed = torch.stack([t.expand(n, *t.shape[1:]) for t in allowed], 1)
            self.stacks.append((list(groups), torch.tensor(pos, dtype=torch.long, device=device),
                                allowed.to(device)))

    def element(self, n: int) -> Constraints:
        """The constraints of batch element ``n`` alone (``N = 1``)."""
        out = object.__new__(Constraints)
        out.layout, out.dead = self.layout, self.dead[n:n + 1]
        out.stacks = [(g, pos, t[n:n + 1] if t.shape[0] > 1 else t) for g, pos, t in self.stacks]
        return out

    def propagate(self, domains: list, active: list) -> list:
        """Generalised arc consistency to a fixed point: a new list of domains."""
        domains = list(domains)
        changed = True
        while changed:
            changed = False
            for groups, pos, allowed in self.stacks:
                k = len(groups)
                applies = torch.stack([active[g][:, pos[:, j]] for j, g in enumerate(groups)],
                                      -1).all(-1)[..., None]  # (N, M, 1)
                for a in range(k):
                    n = domains[groups[a]].shape[0]
                    ok = allowed.expand(n, *allowed.shape[1:])
                    for j in range(k):
                        if j != a:
                            shape = [n, len(pos)] + [1] * k
                            shape[2 + j] = -1
                            ok = ok & domains[groups[j]][:, pos[:, j]].reshape(shape)
                    ok = ok.movedim(2 + a, -1)
                    support = ok.reshape(n, len(pos), -1, ok.shape[-1]).any(2)
                    refused = ~support & applies
                    g = groups[a]
                    count = torch.zeros(domains[g].shape, dtype=torch.int32,
                                        device=allowed.device)
                    count = count.index_add(1, pos[:, a], refused.to(torch.int32))
                    new = domains[g] & (count == 0)
                    if bool((new != domains[g]).any()):
                        domains[g], changed = new, True
        return domains

    @staticmethod
    def wiped(domains: list, active: list) -> torch.Tensor:
        """``(N,)``: whether some active variable has an empty domain."""
        out = torch.zeros(domains[0].shape[0], dtype=torch.bool, device=domains[0].device)
        for d, a in zip(domains, active):
            if d.numel():
                out |= (a & ~d.any(-1)).any(-1)
        return out

    def search(self, domains: list, active: list, score, budget: int):
        """Depth-first search with arc consistency for one batch element (``N = 1``).

        Branches on the active variable with the fewest states left, trying its states in
        decreasing ``score(domains, group, position)`` (a ``(d,)`` tensor).

        Returns ``(assignment, proven)``: ``assignment`` is per group ``(1, L)`` states (all
        tables allow it), or None with ``proven`` True when no configuration exists and False
        when more than ``budget`` nodes would be needed."""
        dom = self.propagate(domains, active)
        if bool(self.wiped(dom, active).any()):
            return None, True
        frames: list = []  # (domains before the choice, group, position, states left)
        nodes = 0
        while True:
            pick = self._branch(dom, active)
            if pick is None:
                return [d[0].to(torch.long).argmax(-1)[None] for d in dom], False
            g, p = pick
            states = dom[g][0, p].nonzero().flatten()
            order = score(dom, g, p)[states].argsort(descending=True, stable=True)
            frames.append((dom, g, p, states[order].tolist()))
            while frames:
                base, g, p, left = frames[-1]
                if not left:
                    frames.pop()
                    continue
                nodes += 1
                if nodes > budget:
                    return None, False
                trial = list(base)
                trial[g] = base[g].clone()
                trial[g][0, p] = False
                trial[g][0, p, left.pop(0)] = True
                trial = self.propagate(trial, active)
                if not bool(self.wiped(trial, active).any()):
                    dom = trial
                    break
            else:
                return None, True

    @staticmethod
    def _branch(domains, active):
        """``(group, position)`` of an active variable with the fewest (> 1) states left."""
        best = None
        for g, (d, a) in enumerate(zip(domains, active)):
            if not d.numel():
                continue
            size = d[0].sum(-1).masked_fill(~a[0], 0)
            size = size.masked_fill(size <= 1, d.shape[-1] + 1)
            p = int(size.argmin())
            if int(size[p]) <= d.shape[-1] and (best is None or int(size[p]) < best[0]):
                best = (int(size[p]), g, p)
        return None if best is None else best[1:]
