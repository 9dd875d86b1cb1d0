"""Table factors of any arity (unary, pairwise, tertiary, ...), dense or sparse.

A :class:`Table` holds a dense tensor of log-potentials over its scope. When the scope
contains :class:`~fieldlib.variables.VariableArray` s (all of one length L), the factor is
applied position-wise: one table per position, stacked on an axis right after the batch
axis. ``Table(frames, unary)`` with ``unary`` of shape ``(N, T, S)`` is the per-frame unary
φX of MATH.md §2 for a batch of N videos of T frames.

A :class:`SparseTable` lists the allowed configurations; every other one is ``-inf``.
"""

from __future__ import annotations

import torch

from fieldlib.errors import CardinalityError, FieldlibError, ShapeError
from fieldlib.factors.base import Factor, Term, at, check_log_potential, positions, register_factor

__all__ = ["Table", "SparseTable"]


def _cards(scope) -> tuple[int, ...]:
    return tuple(item.cardinality for item in scope)


@register_factor("table")
class Table(Factor):
    """Dense log-potential table over a scope of variables (or arrays, position-wise).

    Args:
        scope: a Variable / VariableArray or a sequence of them.
        log_potential: ``Tensor ([N,] [L,] d1, ..., dk)``; ``L`` present iff the scope holds
            arrays (all of length L); ``d_i`` the cardinalities in scope order.
        name: optional label for error messages.

    Raises:
        ShapeError / CardinalityError: wrong shape; InvalidPotentialError: NaN or +inf.
    """

    def __init__(self, scope, log_potential, name: str | None = None):
        super().__init__(scope, name)
        self.length = positions(self.scope)
        self.log_potential = check_log_potential(log_potential, self.label)
        core = ((self.length,) if self.length is not None else ()) + _cards(self.scope)
        try:
            self.batched = self._set_batch(self.log_potential, core, "log_potential")
        except ShapeError as exc:
            if self.log_potential.dim() in (len(core), len(core) + 1):
                raise CardinalityError(
                    f"{exc}; scope cardinalities are "
                    f"{[(s.name, s.cardinality) for s in self.scope]}"
                ) from None
            raise

    def tensors(self):
        return [self.log_potential]

    def dense_size(self) -> int:
        return self.log_potential.numel()

    def terms(self) -> list[Term]:
        t = self.log_potential
        if self.length is None:
            return [Term(tuple(self.scope), t, self.batched, self)]
        axis = 1 if self.batched else 0
        return [
            Term(tuple(at(s, p) for s in self.scope), t.select(axis, p), self.batched, self)
            for p in range(self.length)
        ]


@register_factor("sparse_table")
class SparseTable(Factor):
    """Log-potentials on listed configurations only; ``-inf`` on every other one.

    Args:
        scope: Variables / arrays as for :class:`Table`.
        configs: ``LongTensor (K, k)``: the allowed configurations (distinct rows).
        values: ``Tensor ([N,] [L,] K)``: the log-potential of each listed configuration.

    Raises:
        ShapeError, CardinalityError (a config value out of range), FieldlibError
        (repeated configuration), InvalidPotentialError.
    """

    def __init__(self, scope, configs, values, name: str | None = None):
        super().__init__(scope, name)
        self.length = positions(self.scope)
        cards = _cards(self.scope)
        c = torch.as_tensor(configs, dtype=torch.long)
        if c.dim() != 2 or c.shape[1] != len(cards):
            raise ShapeError(
                f"{self.label}: configs must have shape (K, {len(cards)}), got {tuple(c.shape)}"
            )
        for k, d in enumerate(cards):
            if len(c) and (c[:, k].min() < 0 or c[:, k].max() >= d):
                row = int(((c[:, k] < 0) | (c[:, k] >= d)).nonzero()[0, 0])
                raise CardinalityError(
                    f"{self.label}: configuration {row} has value {int(c[row, k])} for "
                    f"{self.scope[k].name}, outside 0..{d - 1}"
                )
        flat = torch.zeros(len(c), dtype=torch.long)
        for k, d in enumerate(cards):
            flat = flat * d + c[:, k]
        if len(torch.unique(flat)) != len(flat):
            raise FieldlibError(f"{self.label}: configurations must be distinct")
        self.configs, self._flat, self._cards = c, flat, cards
        self.values = check_log_potential(values, self.label)
        core = ((self.length,) if self.length is not None else ()) + (len(c),)
        self.batched = self._set_batch(self.values, core, "values")

    def tensors(self):
        return [self.values]

    def dense(self) -> torch.Tensor:
        """The equivalent dense table ``([N,] [L,] d1, ..., dk)``, -inf off the list."""
        lead = self.values.shape[:-1]
        total = 1
        for d in self._cards:
            total *= d
        out = self.values.new_full((*lead, total), float("-inf"))
        out = out.index_copy(-1, self._flat.to(out.device), self.values)
        return out.reshape(*lead, *self._cards)

    def dense_size(self) -> int:
        total = 1
        for d in self._cards:
            total *= d
        return total * self.values[..., 0].numel()

    def terms(self) -> list[Term]:
        dense = self.dense()
        if self.length is None:
            return [Term(tuple(self.scope), dense, self.batched, self)]
        axis = 1 if self.batched else 0
        return [
            Term(tuple(at(s, p) for s in self.scope), dense.select(axis, p), self.batched, self)
            for p in range(self.length)
        ]
