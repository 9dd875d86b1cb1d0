"""Table factors of any arity (unary, pairwise, tertiary, ...), dense or sparse.

A :class:`Table` holds a dense tensor of log-potentials over its scope. When the scope
contains :class:`~fieldlib.variables.VariableArray` s (all of one length L), the factor is
applied position-wise: one table per position, stacked on an axis right after the batch
axis. ``Table(frames, unary)`` with ``unary`` of shape ``(N, T, S)`` is the per-frame unary
φX of MATH.md §2 for a batch of N videos of T frames.

A :class:`SparseTable` lists the allowed configurations; every other one is ``-inf``.

Both give their mean-field messages for all positions at once (one matrix product per other
slot of the table, on views of the stacked per-position tables: no per-position term, no
copy of the table), declare themselves as one dense table when their scope is stand-alone
variables (so the mean-field engine stacks many of them, inference/meanfield_stack.py), and
give the closed-form gradient of their expected log-potential: the product of the scope's
marginals (MATH.md §6, Eq. 7).
"""

from __future__ import annotations

import torch

from fieldlib.errors import CardinalityError, ShapeError
from fieldlib.factors.base import (
    Factor,
    Term,
    check_configs,
    check_log_potential,
    position_terms,
    positions,
    register_factor,
)
from fieldlib.factors.beliefs import (
    Beliefs,
    any_neginf,
    contract,
    labelled_einsum,
    split_impossible,
    with_impossible,
)
from fieldlib.variables import VariableArray

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

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"log_potential": self.log_potential}

    def dense_table(self) -> torch.Tensor | None:
        return self.log_potential if self.length is None else None

    def dense_size(self) -> int:
        return self.log_potential.numel()

    def coupling_arity(self) -> int:
        return len(self.scope)

    def has_hard_zeros(self, q: Beliefs) -> bool:
        return self._split(q)[1] is not None

    def terms(self) -> list[Term]:
        t = self.log_potential
        if self.length is None:
            return [Term(tuple(self.scope), t, self.batched, self)]
        return position_terms(self, self.scope, t, self.batched)

    # -- mean-field (see Factor.expected_messages): all positions in one einsum ------------
    def _split(self, q: Beliefs):
        """The table's finite part and -inf indicator, once per run."""
        return q.constant((self, "split"), lambda: split_impossible(self.log_potential))

    def expected_messages(self, q: Beliefs) -> dict:
        if self.length is None:
            return super().expected_messages(q)
        return _positionwise_messages(self.scope, self._split(q), self.batched, q)

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        if self.length is None:
            return super().expected_energy(q)
        return _positionwise_energy(self.scope, self._split(q), self.batched, q).sum(-1)

    def position_energy(self, q: Beliefs) -> dict:
        if self.length is None:
            return super().position_energy(q)
        e = _positionwise_energy(self.scope, self._split(q), self.batched, q)
        return _credit_positions(self.scope, e, q)

    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"log_potential": (N, [L,] d_1, ..., d_k)}``: ∂ E_Q[log φ] / ∂φ(x) = Π_j Q_j(x_j)
        (0 on -inf entries, which carry no gradient)."""
        g = _outer(q, self.scope, self.length)
        return {"log_potential": g.masked_fill(
            torch.isneginf(self.log_potential).expand_as(g), 0.0)}


@register_factor("sparse_table")
class SparseTable(Factor):
    """Log-potentials on listed configurations only; ``-inf`` on every other one.

    Args:
        scope: Variables / arrays as for :class:`Table`.
        configs: integers ``(K, k)``, K >= 1: the allowed configurations (distinct rows).
        values: ``Tensor ([N,] [L,] K)``: the log-potential of each listed configuration.

    Raises:
        ShapeError, CardinalityError (a config value out of range), FieldlibError
        (configs that are not integers, none at all, or a repeated one),
        InvalidPotentialError.
    """

    def __init__(self, scope, configs, values, name: str | None = None):
        super().__init__(scope, name)
        self.length = positions(self.scope)
        cards = _cards(self.scope)
        names = [item.name for item in self.scope]
        c = check_configs(configs, names, cards, self.label)
        flat = torch.zeros(len(c), dtype=torch.long)
        for k, d in enumerate(cards):
            flat = flat * d + c[:, k]
        self.configs, self._flat, self._cards = c, flat, cards
        self.values = check_log_potential(values, self.label)
        core = ((self.length,) if self.length is not None else ()) + (len(c),)
        self.batched = self._set_batch(self.values, core, "values")

    def tensors(self):
        return [self.values]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    def dense_table(self) -> torch.Tensor | None:
        return self.dense() if self.length is None else None

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

    def coupling_arity(self) -> int:
        return len(self.scope)

    def has_hard_zeros(self, q: Beliefs) -> bool:
        total = 1
        for d in self._cards:
            total *= d
        return len(self.configs) < total or any_neginf(self.values)

    def terms(self) -> list[Term]:
        dense = self.dense()
        if self.length is None:
            return [Term(tuple(self.scope), dense, self.batched, self)]
        return position_terms(self, self.scope, dense, self.batched)

    # -- mean-field: through the dense table (exact 0 · (-inf) handling off the list) ------
    def _split(self, q: Beliefs):
        """The dense table's finite part and -inf indicator, once per run."""
        return q.constant((self, "split"), lambda: split_impossible(self.dense()))

    def expected_messages(self, q: Beliefs) -> dict:
        if self.length is None:
            return super().expected_messages(q)
        return _positionwise_messages(self.scope, self._split(q), self.batched, q)

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        if self.length is None:
            return super().expected_energy(q)
        return _positionwise_energy(self.scope, self._split(q), self.batched, q).sum(-1)

    def position_energy(self, q: Beliefs) -> dict:
        if self.length is None:
            return super().position_energy(q)
        e = _positionwise_energy(self.scope, self._split(q), self.batched, q)
        return _credit_positions(self.scope, e, q)

    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"values": (N, [L,] K)}``: ∂ E_Q[log φ] / ∂values(c) = Π_j Q_j(c_j) for each
        listed configuration c."""
        g = _outer(q, self.scope, self.length)
        flat = g.reshape(*g.shape[: g.dim() - len(self.scope)], -1)
        return {"values": flat.index_select(-1, self._flat.to(flat.device))}


def _outer(q: Beliefs, scope, length) -> torch.Tensor:
    """``(N, [L,] d_1, ..., d_k)``: the product of the scope's marginals (a lone Variable
    shared by the L positions when the scope holds arrays)."""
    qs = []
    for s in scope:
        p = q.probs(s)
        if length is not None and not isinstance(s, VariableArray):
            p = p.unsqueeze(1).expand(q.batch, length, -1)
        qs.append(p)
    args: list = []
    for j, p in enumerate(qs):
        args += [p, [..., j]]
    return labelled_einsum(*args, [..., *range(len(qs))])


# -- position-wise tables: labels "n" (batch), "l" (position), j (slot j's states) -----------
def _slot_operands(scope, q) -> list[tuple]:
    """Q of each scope slot with its labels: an array ``(N, L, d)`` on ``("n", "l", j)``, a
    lone Variable ``(N, d)`` on ``("n", j)`` (shared by the positions, never expanded)."""
    return [(q.probs(s), ("n", "l", j)) if isinstance(s, VariableArray) else
            (q.probs(s), ("n", j)) for j, s in enumerate(scope)]


def _positionwise(split, labels, ops, out, q) -> torch.Tensor:
    """E of the split table ``(finite, impossible)`` under ``ops`` onto ``out`` labels
    (MATH.md §3, 0 · (-inf) = 0), the batch axis added when no operand has one."""
    finite, impossible = split
    if "n" in out and "n" not in labels and not any("n" in lab for _, lab in ops):
        inner = [x for x in out if x != "n"]
        r = _positionwise(split, labels, ops, inner, q)
        return r.unsqueeze(0).expand(q.batch, *r.shape)
    value = contract(finite, labels, ops, out)
    imp = None if impossible is None else contract(impossible, labels, ops, out)
    return with_impossible(value, imp, q.options.penalty)


def _table_labels(scope, batched) -> list:
    return (["n"] if batched else []) + ["l", *range(len(scope))]


def _positionwise_messages(scope, split, batched, q) -> dict:
    """``{slot: message}``: to an array ``(N, L, d)``, to a lone Variable ``(N, d)`` (summed
    over the positions it is paired with)."""
    labels = _table_labels(scope, batched)
    slots = _slot_operands(scope, q)
    out: dict = {}
    for a, s in enumerate(scope):
        if q.wants(s):
            target = ("n", "l", a) if isinstance(s, VariableArray) else ("n", a)
            m = _positionwise(split, labels, [o for j, o in enumerate(slots) if j != a],
                              target, q)
            out[s] = out[s] + m if s in out else m
    return out


def _positionwise_energy(scope, split, batched, q) -> torch.Tensor:
    """``(N, L)``: each position's expected log-potential."""
    return _positionwise(split, _table_labels(scope, batched), _slot_operands(scope, q),
                         ("n", "l"), q)


def _credit_positions(scope, e: torch.Tensor, q) -> dict:
    out: dict = {}
    for s in scope:
        if isinstance(s, VariableArray):
            out[s] = out[s] + e if s in out else e
        elif s.array is not None:
            row = e.new_zeros(q.batch, s.array.size)
            row[:, s.position] = e.sum(1)
            out[s.array] = out[s.array] + row if s.array in out else row
    return out
