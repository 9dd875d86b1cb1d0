"""Component factors on block variables (MATH.md §1-2).

A frame is one block variable whose states are tuples, e.g. (c, o, a, p, s). The frame factor
φX(c,o,a,p,s) = φ(o,p) + φ(a,p) + φ(o,s) + φ(c,o,a,p) is four component factors on the same
block, each a table over some components gathered onto the block's states; the last is
sparse: it lists values for the tuples of B only (everything else is -inf).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from fieldlib.variables import BlockDomain, VariableArray

__all__ = ["Component"]


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
        flat, total = domain.flat_index(self.components)
        if configs is None:
            cards = tuple(domain.components[c].size for c in self.components)
            self.batched = self._set_batch(self.table, lead + cards, "table")
            self._index = flat  # block state -> flat component index
            self._valid = None
        else:
            names = [f"component {comp!r}" for comp in self.components]
            sizes = [domain.components[comp].size for comp in self.components]
            c = check_configs(configs, names, sizes, self.label)
            code = torch.zeros(len(c), dtype=torch.long)
            for k, comp in enumerate(self.components):
                code = code * domain.components[comp].size + c[:, k]
            sorted_code, order = torch.sort(code)
            self.batched = self._set_batch(self.table, lead + (len(c),), "table")
            pos = torch.searchsorted(sorted_code, flat).clamp(max=len(c) - 1)
            self._valid = sorted_code[pos] == flat
            self._index = order[pos]  # block state -> config row (where valid)
            configs = c
        self.configs = configs

    def tensors(self):
        return [self.table]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def block_table(self) -> torch.Tensor:
        """``([N,] [T,] S)`` log-potential of every block state."""
        t = self.table
        index = self._index.to(t.device)
        if self._valid is None:
            m = len(self.components)
            t = t.reshape(*t.shape[: t.dim() - m], -1)
        # gather (not index_select: several times slower along the last axis on CPU)
        out = t.gather(-1, index.expand(*t.shape[:-1], len(index)))
        if self._valid is None:
            return out
        return out.masked_fill(~self._valid.to(t.device), float("-inf"))

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
        return (self._valid is not None and not bool(self._valid.all())) or \
            any_neginf(self.table)

    # -- closed-form gradient (MATH.md §6: Eq. 7 marginalised onto the components) -----------
    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"table": (N, [T,] d_1, ..., d_m)}`` (sparse: ``(N, [T,] K)``): ∂ E_Q[log φ] /
        ∂table(u) = Σ_{x: comp(x) = u} Q(x), Q of the block summed onto the components (the
        same in both forms: each term has one block variable)."""
        target = self.scope[0]
        q = q.probs(target)
        if self._valid is None:
            flat, total = target.domain.flat_index(self.components)
            out = q.new_zeros(*q.shape[:-1], total).index_add_(-1, flat.to(q.device), q)
            cards = [target.domain.components[c].size for c in self.components]
            return {"table": out.reshape(*q.shape[:-1], *cards)}
        valid = self._valid.to(q.device)
        out = q.new_zeros(*q.shape[:-1], self.table.shape[-1])
        return {"table": out.index_add_(-1, self._index.to(q.device)[valid], q[..., valid])}
