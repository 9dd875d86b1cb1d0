"""Component factors on block variables (MATH.md §1-2).

A frame is one block variable whose states are tuples, e.g. (c, o, a, p, s). The frame factor
φX(c,o,a,p,s) = φ(o,p) + φ(a,p) + φ(o,s) + φ(c,o,a,p) is four component factors on the same
block, each a table over some components gathered onto the block's states; the last is
sparse: it lists values for the tuples of B only (everything else is -inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors.base import (
    Factor,
    Term,
    check_configs,
    check_log_potential,
    expected_log_table,
    position_terms,
    register_factor,
)
from fieldlib.factors.beliefs import Beliefs, any_neginf
from fieldlib.variables import BlockDomain, VariableArray, run_length

__all__ = ["Component", "BlockPlan", "block_plan", "block_table_sum"]


@register_factor("component")
class Component(Factor):
    """A table over some components of a block variable (or of every block of an array).

    Args:
        target: a Variable or VariableArray whose domain is a :class:`BlockDomain`.
        components: component names, e.g. ``("o", "p")``.
        table: dense mode: ``Tensor ([N,] [T,] d_1, ..., d_m)`` over the components.
            Sparse mode (``configs`` given): ``Tensor ([N,] [T,] K)``, one value per config.
        configs: optional integers ``(K, m)``, K >= 1, of distinct component tuples (e.g.
            the set B over (c, o, a, p)); block states whose sub-tuple is not listed get
            ``-inf``.

    The block log-table is ``table[..., comp_1(x), ..., comp_m(x)]`` for every block state x,
    shape ``([N,] [T,] S)``.

    Raises:
        FieldlibError: the target has no BlockDomain, an unknown component, configs that are
            not integers, none at all, or a repeated one.
        ShapeError / CardinalityError: a wrong shape, a config value out of its component's
            range. InvalidPotentialError: NaN or +inf in the table.
    """

    def __init__(self, target, components: Sequence[str], table, configs=None,
                 name: str | None = None):
        super().__init__(target, name)
        if len(self.scope) != 1:
            raise FieldlibError(f"{self.label}: the target is one block variable or array")
        domain = self.scope[0].domain
        if not isinstance(domain, BlockDomain):
            raise FieldlibError(
                f"{self.label}: target {self.scope[0].name!r} does not have a BlockDomain"
            )
        self.components = (components,) if isinstance(components, str) else \
            tuple(components)
        self.length = self.scope[0].size if isinstance(self.scope[0], VariableArray) else None
        self.table = check_log_potential(table, self.label)
        lead = (self.length,) if self.length is not None else ()
        plan = block_plan(domain, self.components, configs, self.label)
        self._plan = plan
        self._index, self._valid, self._dense = plan.index, plan.valid, plan.dense
        self.batched = self._set_batch(self.table, lead + plan.table_shape, "table")
        self.configs = plan.configs

    def tensors(self):
        return [self.table]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def block_table(self, run: int = 1) -> torch.Tensor:
        """``([N,] [T,] S)`` log-potential of every block state (``run`` r > 1, a divisor of
        :attr:`run`: ``([N,] [T,] S / r)``, one value per run of r states)."""
        t = self.table
        plan = self._plan
        if run > 1 and plan.run % run:
            raise FieldlibError(f"{self.label}: the table is constant on runs of {plan.run} "
                                f"states, not of {run}")
        index = plan.index_on(run, t.device)
        if plan.dense:
            m = len(self.components)
            t = t.reshape(*t.shape[: t.dim() - m], -1)
        # gather (not index_select: several times slower along the last axis on CPU)
        out = t.gather(-1, index.expand(*t.shape[:-1], len(index)))
        if plan.valid is None:
            return out
        return out.masked_fill(~plan.valid_on(run, t.device), float("-inf"))

    def dense_size(self) -> int:
        lead = self.table.shape[: int(self.batched) + int(self.length is not None)]
        return int(torch.Size(lead).numel()) * self.scope[0].cardinality

    def terms(self) -> list[Term]:
        table = self.block_table()
        target = self.scope[0]
        if self.length is None:
            return [Term((target,), table, self.batched, self)]
        return position_terms(self, [target], table, self.batched)

    # -- mean-field: a unary factor; its message does not depend on Q -------------------------
    def expected_messages(self, q: Beliefs) -> dict:
        target = self.scope[0]
        return {target: self.block_table()} if q.wants(target) else {}

    def _energy(self, q: Beliefs) -> torch.Tensor:
        e = expected_log_table(self.block_table(), [q.probs(self.scope[0])],
                               penalty=q.options.penalty)
        return e.expand(q.batch, *e.shape[1:]) if e.dim() else e.expand(q.batch)

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        e = self._energy(q)
        return e.sum(-1) if self.length is not None else e

    def position_energy(self, q: Beliefs) -> dict:
        target, e = self.scope[0], self._energy(q)
        if self.length is not None:
            return {target: e}
        if target.array is None:
            return {}
        row = e.new_zeros(q.batch, target.array.size)
        row[:, target.position] = e
        return {target.array: row}

    def couplings(self) -> list:
        return [(v,) for v in self.variables()]

    def coupling_arity(self) -> int:
        return 1

    def has_hard_zeros(self, q: Beliefs) -> bool:
        return self._valid is not None or any_neginf(self.table)

    # -- closed-form gradient (MATH.md §6: Eq. 7 marginalised onto the components) -----------
    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"table": (N, [T,] d_1, ..., d_m)}`` (sparse: ``(N, [T,] K)``): ∂ E_Q[log φ] /
        ∂table(u) = Σ_{x: comp(x) = u} Q(x), Q of the block summed onto the components (the
        same in both forms: each term has one block variable)."""
        target = self.scope[0]
        q = q.probs(target)
        if self._dense:
            flat, total = target.domain.flat_index(self.components)
            out = q.new_zeros(*q.shape[:-1], total).index_add_(-1, flat.to(q.device), q)
            cards = [target.domain.components[c].size for c in self.components]
            return {"table": out.reshape(*q.shape[:-1], *cards)}
        out = q.new_zeros(*q.shape[:-1], self.table.shape[-1])
        if self._valid is None:
            return {"table": out.index_add_(-1, self._index.to(q.device), q)}
        valid = self._valid.to(q.device)
        return {"table": out.index_add_(-1, self._index.to(q.device)[valid], q[..., valid])}


@dataclass
class BlockPlan:
    """Where a Component's table lands on the block states, built once per (domain,
    components, configs) by :func:`block_plan`.

    Attributes:
        dense: the table is over the components' full product (no configs).
        index: ``LongTensor (S,)``: each block state's flat component index (dense) or row
            of configs (sparse, where valid).
        valid: ``BoolTensor (S,)``: the states whose sub-tuple is listed, or None when all
            are (no state gets -inf).
        configs: the checked configs (sparse) or None.
        table_shape: the table's trailing shape: the cardinalities (dense) or ``(K,)``.
        run: the table is constant on runs of this many consecutive states
            (:func:`~fieldlib.variables.run_length`), e.g. S scenes for a factor without
            the scene on Charades frame states ``b * S + s``.
    """

    dense: bool
    index: torch.Tensor
    valid: torch.Tensor | None
    configs: torch.Tensor | None
    table_shape: tuple[int, ...]
    run: int
    _on: dict = field(default_factory=dict, repr=False)

    def index_on(self, run: int, device) -> torch.Tensor:
        """``index`` at the first state of each run of ``run`` states, on ``device``."""
        key = ("index", run, str(device))
        if key not in self._on:
            self._on[key] = self.index[::run].contiguous().to(device)
        return self._on[key]

    def valid_on(self, run: int, device) -> torch.Tensor:
        key = ("valid", run, str(device))
        if key not in self._on:
            self._on[key] = self.valid[::run].contiguous().to(device)
        return self._on[key]


_MAX_PLANS = 64  # plans a domain keeps (oldest dropped first)


def block_plan(domain: BlockDomain, components: tuple[str, ...], configs=None,
               what: str = "component factor") -> BlockPlan:
    """The :class:`BlockPlan` of a table over ``components`` of ``domain`` (configs: the
    sparse rows, as :class:`Component`'s). Cached on the domain (``domain.plans``) for dense
    tables and for a configs tensor seen before (same object, not modified in place since):
    building a factor each training step then costs no set-up.

    Raises: as :class:`Component` (unknown component, bad or repeated configs).
    """
    if configs is None:
        key, tag = (components, None), None
    elif isinstance(configs, torch.Tensor):
        key, tag = (components, id(configs)), configs
    else:
        key, tag = None, None
    hit = domain.plans.get(key) if key is not None else None
    if hit is not None and hit[0] is tag and (tag is None or hit[1] == tag._version):
        return hit[2]
    flat, _total = domain.flat_index(components)
    if configs is None:
        cards = tuple(domain.components[c].size for c in components)
        plan = BlockPlan(True, flat, None, None, cards, run_length(flat))
    else:
        names = [f"component {comp!r}" for comp in components]
        sizes = [domain.components[comp].size for comp in components]
        c = check_configs(configs, names, sizes, what)
        code = torch.zeros(len(c), dtype=torch.long)
        for k, comp in enumerate(components):
            code = code * domain.components[comp].size + c[:, k]
        sorted_code, order = torch.sort(code)
        pos = torch.searchsorted(sorted_code, flat).clamp(max=len(c) - 1)
        valid = sorted_code[pos] == flat
        index = order[pos]  # block state -> config row (where valid)
        run = run_length(torch.where(valid, index, -1))
        plan = BlockPlan(False, index, None if bool(valid.all()) else valid, c, (len(c),),
                         run)
    if key is not None:
        if len(domain.plans) >= _MAX_PLANS:
            domain.plans.pop(next(iter(domain.plans)))
        domain.plans[key] = (tag, None if tag is None else tag._version, plan)
    return plan


def block_table_sum(factors: Sequence[Component]) -> torch.Tensor:
    """``Σ_k factors[k].block_table()`` over one block variable, summed in that order (the
    same floating-point sums, bit for bit), with every table that is constant on runs of
    states gathered and added once a run: on Charades frame states ``b * S + s`` φ(o,p),
    φ(a,p) and φ(c,o,a,p) are gathered onto the |B| rows instead of the |B| S states.
    Shape ``([N,] [T,] S)`` (the factors' leading shapes broadcast)."""
    if not factors:
        raise FieldlibError("block_table_sum: no factors")
    runs = [f._plan.run for f in factors]
    coarse = [r for r in runs if r > 1]
    r = math.gcd(*coarse) if coarse else 1
    if r == 1:
        out = factors[0].block_table()
        for f in factors[1:]:
            out = out + f.block_table()
        return out
    s = factors[0].scope[0].cardinality
    acc, fine = None, False  # acc: (..., S / r) while coarse, (..., S / r, r) once fine
    for f, run in zip(factors, runs):
        if run > 1:
            t = f.block_table(run=r)
            if acc is None:
                acc = t
            else:
                acc = acc + (t[..., None] if fine else t)
        else:
            t = f.block_table()
            t = t.reshape(*t.shape[:-1], s // r, r)
            if acc is None:
                acc = t
            else:
                acc = (acc if fine else acc[..., None]) + t
            fine = True
    if not fine:
        acc = acc[..., None].expand(*acc.shape, r)
    return acc.reshape(*acc.shape[:-2], s)
