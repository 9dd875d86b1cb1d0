"""The message layout and the schedules of loopy belief propagation (inference/bp.py).

Messages live in log space, one tensor per (shape group, slot): every factor term of two or
more free variables is put in a canonical axis order (cardinalities descending), and the
terms of one shape are stacked into one table ``(N, G, d1, ..., dk)``; the message from
those G factors to the variables in slot j is one tensor ``(N, G, d_j)``. Variables are
pooled by cardinality: the summed incoming messages of all variables of ``c`` states are one
tensor ``(N, V_c, c)``, filled with ``index_add`` from every slot of that cardinality.
One-variable terms are folded into the variables (``unary``) and send no message.

A variable-to-factor message is the variable's total minus the factor's own message,
computed without ``-inf - -inf``: the total is kept as a finite sum and a count of ``-inf``
terms per state (:func:`cavity`), so the leave-one-out value is exact, including a state
that only the excluded factor rules out. Normalising shifts are clamped to 0 where a row
is all ``-inf`` (as pyro's torch_log does): such a row stays ``-inf``, never NaN.

A *phase* is a set of (group, members) updated together from the same totals:
``"parallel"`` has one phase (every factor at once, flooding); ``"sequential"`` has one
phase per colour of a greedy colouring of the factors (no two factors of a colour share a
variable), which is exactly a sequential sweep in colour order: a factor's inputs depend
only on factors sharing one of its variables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Group", "Layout", "build_layout", "cavity", "normalise", "factor_messages",
           "Messages"]

NEG_INF = float("-inf")


def normalise(m: torch.Tensor, semiring: str) -> torch.Tensor:
    """``m`` shifted so that it log-sums (``"sum"``) or maxes (``"max"``) to 0 over its
    last axis; an all ``-inf`` row keeps shift 0 (stays ``-inf``, not NaN)."""
    if semiring == "sum":
        shift = torch.logsumexp(m, -1, keepdim=True)
    else:
        shift = m.amax(-1, keepdim=True)
    return m - shift.masked_fill(torch.isneginf(shift), 0.0)


def _finite(m: torch.Tensor) -> torch.Tensor:
    return m.masked_fill(torch.isneginf(m), 0.0)


def cavity(total: torch.Tensor, count: torch.Tensor | None, index: torch.Tensor,
           m: torch.Tensor, semiring: str) -> torch.Tensor:
    """Variable-to-factor messages ``(N, G, c)``: the totals ``(N, V, c)`` (finite part,
    and how many ``-inf`` terms; ``count`` None when nothing is ever ``-inf``) of the
    variables at ``index`` ``(G,)``, less the factor's own message ``m``, normalised."""
    if count is None:
        return normalise(total[:, index] - m, semiring)
    rest = total[:, index] - _finite(m)
    impossible = count[:, index] - torch.isneginf(m).to(count.dtype)
    return normalise(rest.masked_fill(impossible > 0.5, NEG_INF), semiring)


def broadcast(mu: torch.Tensor, j: int, k: int) -> torch.Tensor:
    """A slot-j message ``(N, G, d)`` viewed against a table ``(N, G, d1, ..., dk)``."""
    return mu.view(*mu.shape[:2], *[mu.shape[-1] if a == j else 1 for a in range(k)])


def factor_messages(table: torch.Tensor, mus: list[torch.Tensor], semiring: str
                    ) -> list[torch.Tensor]:
    """Factor-to-variable messages, one ``(N, G, d_j)`` per slot: the table plus every other
    slot's incoming message, log-summed (or maxed) over every axis but j, normalised. The
    broadcast sum is materialised (exact at any range: no exp of a shifted table)."""
    k = len(mus)
    views = [broadcast(mu, j, k) for j, mu in enumerate(mus)]
    out = []
    for j in range(k):
        s = None
        for i in range(k):
            if i != j:
                s = table + views[i] if s is None else s.add_(views[i])
        # axis j first, the others flattened: one reduction over a contiguous last axis
        # (several times faster than torch.logsumexp over a tuple of small axes)
        s = s.movedim(2 + j, 2).reshape(*s.shape[:2], s.shape[2 + j], -1)
        r = torch.logsumexp(s, -1) if semiring == "sum" else s.amax(-1)
        out.append(normalise(r, semiring))
    return out


@dataclass
class Group:
    """The factor terms of one canonical shape.

    Attributes:
        shape: ``(d1, ..., dk)``, k >= 2, descending.
        table: ``(N, G, d1, ..., dk)`` log-tables (autograd reaches the user's potentials
            when they require grad; messages use ``table.detach()``).
        slots: per slot j, ``LongTensor (G,)``: the variable's position in its cardinality
            pool (pool ``shape[j]``).
        operands: the prepared operand each member came from, and ``perms`` the axis
            permutation that put it in canonical order.
    """

    shape: tuple[int, ...]
    table: torch.Tensor
    slots: list[torch.Tensor]
    operands: list[int]
    perms: list[tuple[int, ...]]


@dataclass
class Layout:
    """Where every message and potential of one query lives.

    Attributes:
        pools: cardinality -> the free variables of that many states, in graph order.
        where: variable -> (cardinality, position in its pool).
        unary: cardinality -> ``(N, V_c, c)`` summed one-variable log-potentials.
        degree: cardinality -> ``(V_c,)`` how many multi-variable factors hold each variable.
        groups: the stacked multi-variable terms.
        constant: ``(N,)`` sum of the terms with no free variable left.
        home: per operand, ``("group", g, member)``, ``("unary", variable)`` or
            ``("constant",)``.
        phases: per phase, ``[(g, members LongTensor or None for all)]``.
    """

    pools: dict[int, list]
    where: dict
    unary: dict[int, torch.Tensor]
    degree: dict[int, torch.Tensor]
    groups: list[Group]
    constant: torch.Tensor
    home: list[tuple]
    phases: list[list[tuple[int, torch.Tensor | None]]] = field(default_factory=list)


def build_layout(prep, graph, schedule: str) -> Layout:
    """The layout of a prepared query (``inference.prepare.prepare``: operands ``(N, ...)``
    labelled by graph variable indices, evidence already sliced away)."""
    n, dtype, device = prep.batch, prep.dtype, prep.device
    by_index = {graph.index(v): v for v in prep.free}
    pools: dict[int, list] = {}
    where = {}
    for v in prep.free:
        pool = pools.setdefault(v.cardinality, [])
        where[v] = (v.cardinality, len(pool))
        pool.append(v)
    constant = torch.zeros(n, dtype=dtype, device=device)
    unary_parts: dict[int, list] = {}
    members: dict[tuple, list] = {}
    home: list[tuple] = []
    for i, (table, lab) in enumerate(zip(prep.operands, prep.labels)):
        scope = [by_index[x] for x in lab[1:]]
        if not scope:
            constant = constant + table
            home.append(("constant",))
        elif len(scope) == 1:
            c, pos = where[scope[0]]
            unary_parts.setdefault(c, []).append((pos, table))
            home.append(("unary", scope[0]))
        else:
            perm = tuple(sorted(range(len(scope)), key=lambda a: -scope[a].cardinality))
            shape = tuple(scope[a].cardinality for a in perm)
            entry = members.setdefault(shape, [])
            home.append(("group", list(members).index(shape), len(entry)))
            entry.append((i, perm, [where[scope[a]][1] for a in perm]))
    unary = {}
    for c, pool in pools.items():
        parts = unary_parts.get(c, [])
        base = torch.zeros(n, len(pool), c, dtype=dtype, device=device)
        if parts:
            index = torch.tensor([p for p, _ in parts], device=device)
            base = base.index_add(1, index, torch.stack([t for _, t in parts], 1))
        unary[c] = base
    groups = []
    degree = {c: torch.zeros(len(pool), dtype=dtype, device=device)
              for c, pool in pools.items()}
    for shape, entries in members.items():
        tables = [prep.operands[i].permute(0, *(1 + a for a in perm)) for i, perm, _ in entries]
        slots = [torch.tensor([pos[j] for _, _, pos in entries], device=device)
                 for j in range(len(shape))]
        for j, index in enumerate(slots):
            degree[shape[j]].index_add_(0, index, torch.ones(len(index), dtype=dtype,
                                                             device=device))
        groups.append(Group(shape, torch.stack(tables, 1), slots,
                            [i for i, _, _ in entries], [p for _, p, _ in entries]))
    layout = Layout(pools, where, unary, degree, groups, constant, home)
    layout.phases = _phases(layout, prep, by_index, schedule)
    return layout


def _phases(layout: Layout, prep, by_index, schedule: str):
    """One phase of every factor (parallel), or one per colour class (sequential)."""
    if schedule == "parallel" or not layout.groups:
        return [[(g, None) for g in range(len(layout.groups))]]
    used: dict = {}  # variable -> colours of the factors holding it
    colour_of = []
    for g, group in enumerate(layout.groups):
        for member, i in enumerate(group.operands):
            scope = [by_index[x] for x in prep.labels[i][1:]]
            taken = set().union(*(used.get(v, set()) for v in scope))
            colour = next(c for c in range(len(taken) + 1) if c not in taken)
            for v in scope:
                used.setdefault(v, set()).add(colour)
            colour_of.append((colour, prep.labels[i], g, member))
    phases: dict[int, dict[int, list[int]]] = {}
    for colour, _, g, member in colour_of:
        phases.setdefault(colour, {}).setdefault(g, []).append(member)
    device = prep.device
    return [[(g, torch.tensor(ms, device=device)) for g, ms in sorted(phase.items())]
            for _, phase in sorted(phases.items())]


class Messages:
    """The factor-to-variable messages of one run (``m[g][j]``: ``(N, G, d_j)``, log,
    normalised) and the sweeps that update them."""

    def __init__(self, layout: Layout, semiring: str, damping: float):
        self.layout, self.semiring, self.damping = layout, semiring, damping
        self.tables = [g.table.detach() for g in layout.groups]
        self.phase_tables = [[self.tables[g] if sel is None else self.tables[g][:, sel]
                              for g, sel in phase] for phase in layout.phases]
        n = layout.constant.shape[0]
        # finite tables keep every message finite: no -inf bookkeeping then
        self.hard = any(bool(torch.isneginf(t).any()) for t in
                        [*self.tables, *(u.detach() for u in layout.unary.values())])
        self.m = [[torch.full((n, g.table.shape[1], d), -math.log(d),
                              dtype=g.table.dtype, device=g.table.device)
                   for d in g.shape] for g in layout.groups]

    def totals(self):
        """Per cardinality: ``(finite sum, -inf count)``, each ``(N, V_c, c)``, of the
        variables' one-variable potentials and incoming messages (count None when no
        table holds -inf)."""
        total, count = {}, {}
        for c, u in self.layout.unary.items():
            u = u.detach()
            if self.hard:
                total[c], count[c] = _finite(u), torch.isneginf(u).to(u.dtype)
            else:
                total[c], count[c] = u.clone(), None
        for group, ms in zip(self.layout.groups, self.m):
            for j, (index, m) in enumerate(zip(group.slots, ms)):
                c = group.shape[j]
                if self.hard:
                    total[c].index_add_(1, index, _finite(m))
                    count[c].index_add_(1, index, torch.isneginf(m).to(m.dtype))
                else:
                    total[c].index_add_(1, index, m)
        return total, count

    def cavities(self, g: int, sel, total, count) -> list[torch.Tensor]:
        """The variable-to-factor messages of group ``g`` (its members ``sel``; None: all)."""
        group = self.layout.groups[g]
        out = []
        for j, (index, m) in enumerate(zip(group.slots, self.m[g])):
            if sel is not None:
                index, m = index[sel], m[:, sel]
            out.append(cavity(total[group.shape[j]], count[group.shape[j]], index, m,
                              self.semiring))
        return out

    def sweep(self, frozen: torch.Tensor | None) -> torch.Tensor:
        """One iteration over every phase; returns the max change ``(N,)`` of any message
        (as probabilities). Batch elements where ``frozen`` is True keep their messages."""
        total, count = self.totals()
        change = torch.zeros_like(self.layout.constant)
        last = len(self.layout.phases) - 1
        for p, phase in enumerate(self.layout.phases):
            updates = []
            for (g, sel), table in zip(phase, self.phase_tables[p]):
                mus = self.cavities(g, sel, total, count)
                updates.append((g, sel, factor_messages(table, mus, self.semiring)))
            for g, sel, news in updates:
                group = self.layout.groups[g]
                for j, new in enumerate(news):
                    old = self.m[g][j] if sel is None else self.m[g][j][:, sel]
                    if self.damping > 0:
                        new = normalise((1 - self.damping) * new + self.damping * old,
                                        self.semiring)
                    if frozen is not None:
                        new = torch.where(frozen[:, None, None], old, new)
                    if new.numel():
                        delta = (new.exp() - old.exp()).abs_().amax((1, 2))
                        change = torch.maximum(change, delta)
                    if p < last:  # the totals the next phase reads
                        index = group.slots[j] if sel is None else group.slots[j][sel]
                        c = group.shape[j]
                        if self.hard:
                            total[c].index_add_(1, index, _finite(new) - _finite(old))
                            count[c].index_add_(1, index, torch.isneginf(new).to(new.dtype)
                                                - torch.isneginf(old).to(new.dtype))
                        else:
                            total[c].index_add_(1, index, new - old)
                    if sel is None:
                        self.m[g][j] = new
                    else:
                        self.m[g][j].index_copy_(1, sel, new)
        return change
