"""The factor protocol, the factor registry, and dense terms.

Sign convention (one place, used everywhere): a factor holds *log*-potentials. Higher is
likelier; the model is P(x) ∝ exp(Σ_f log φ_f(x_f)) (MATH.md §2). ``-inf`` marks an
impossible configuration; NaN and ``+inf`` are rejected.

Table layout: a table over variables (v1, ..., vk) has one axis per variable in scope order,
C order (the last variable changes fastest when flattened), as in the UAI format.

Batching: any factor tensor may carry one leading batch axis of size N; all batched factors
of a graph share N, unbatched ones are shared by every batch element.

Every factor can give its *dense terms* (:meth:`Factor.terms`): a list of :class:`Term`,
each a log-table over a few variables. Exact engines consume only these; mean-field
engines use a factor's own vectorised message where it has one and these terms otherwise
(the protocol between a factor and such an engine, :class:`~fieldlib.factors.beliefs.Beliefs`,
is in beliefs.py). A factor also declares its parameters (:meth:`Factor.parameters`) and,
where it has one, the closed-form gradient of its expected log-potential
(:meth:`Factor.energy_gradient`, MATH.md §6). A new factor type is one subclass in one file,
registered with :func:`register_factor`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fieldlib.errors import (
    CardinalityError,
    FieldlibError,
    InvalidPotentialError,
    ShapeError,
    TooLargeError,
)
from fieldlib.factors.beliefs import Beliefs, Messages, OnComponent, expected_log_table
from fieldlib.variables import Variable, VariableArray, integer_tensor

__all__ = [
    "Term",
    "Factor",
    "register_factor",
    "factor_types",
    "check_log_potential",
    "check_configs",
    "DEFAULT_MAX_DENSE_ELEMENTS",
    "OnComponent",
    "expected_log_table",
]

#: Refuse to build dense terms with more elements than this (all terms of a factor summed).
DEFAULT_MAX_DENSE_ELEMENTS = 50_000_000

_REGISTRY: dict[str, type] = {}


def register_factor(kind: str):
    """Class decorator: register a :class:`Factor` subclass under ``kind``.

    Registration gives the factor a stable name (``factor.kind``) used in error messages,
    summaries and by engines that dispatch per factor type (e.g. a mean-field engine
    looking up a vectorised message). Re-registering a name with another class raises.
    """

    def wrap(cls):
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise FieldlibError(f"factor kind {kind!r} is already registered to {_REGISTRY[kind]}")
        if not (isinstance(cls, type) and issubclass(cls, Factor)):
            raise FieldlibError(f"register_factor({kind!r}) expects a Factor subclass, got {cls}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def factor_types() -> dict[str, type]:
    """A copy of the registry: kind name -> Factor subclass."""
    return dict(_REGISTRY)


@dataclass
class Term:
    """One dense log-table.

    Attributes:
        variables: the scope ``(v1, ..., vk)``.
        table: ``Tensor ([N,] d1, ..., dk)`` of log-potentials.
        batched: whether ``table`` carries the leading batch axis.
        factor: the factor it came from (for messages and marginals).
    """

    variables: tuple[Variable, ...]
    table: torch.Tensor
    batched: bool
    factor: Factor | None = None


def check_log_potential(tensor, what: str) -> torch.Tensor:
    """Return ``tensor`` as a floating tensor; reject NaN and +inf with a clear error.

    Integer tensors become the default floating dtype. Raises InvalidPotentialError for NaN,
    +inf, complex or boolean values, and anything that is not numbers (None, strings).
    """
    try:
        t = torch.as_tensor(tensor)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidPotentialError(
            f"{what}: log-potentials must be a real tensor, got {type(tensor).__name__} ({exc})"
        ) from None
    if t.is_complex() or t.dtype == torch.bool:
        raise InvalidPotentialError(
            f"{what}: log-potentials must be real numbers, got a {t.dtype} tensor"
        )
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    top = t.detach().amax() if t.numel() else None  # NaN and +inf both reach the max
    if top is not None and bool(torch.isnan(top) | (top == math.inf)):
        bad = torch.isnan(t) | (t == math.inf)
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = "NaN" if bool(torch.isnan(t[where])) else "+inf"
        raise InvalidPotentialError(
            f"{what}: log-potential is {value} at index {where} (only finite values or -inf, "
            f"meaning impossible, are allowed)"
        )
    return t


def check_configs(configs, names: Sequence[str], cards: Sequence[int],
                  what: str) -> torch.Tensor:
    """Validate listed configurations: ``LongTensor (K, k)``, K >= 1, column j in
    ``0..cards[j]-1`` (``names[j]`` in messages), rows distinct.

    Raises FieldlibError (not integers: floats are not rounded; no configuration, which
    would make every configuration impossible; a repeated row), ShapeError (not (K, k)) and
    CardinalityError (a value out of range).
    """
    k = len(cards)
    c = integer_tensor(configs, f"{what}: configs")
    if c.dim() != 2 or c.shape[1] != k:
        if c.numel() == 0:
            raise FieldlibError(f"{what}: no configurations listed; at least one is needed "
                                f"(with none, every configuration is impossible)")
        raise ShapeError(f"{what}: configs must have shape (K, {k}), got {tuple(c.shape)}")
    if len(c) == 0:
        raise FieldlibError(f"{what}: no configurations listed; at least one is needed "
                            f"(with none, every configuration is impossible)")
    for j, d in enumerate(cards):
        bad = (c[:, j] < 0) | (c[:, j] >= d)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CardinalityError(
                f"{what}: configuration {row} has value {int(c[row, j])} for {names[j]}, "
                f"outside 0..{d - 1}"
            )
    if len(torch.unique(c, dim=0)) != len(c):
        raise FieldlibError(f"{what}: configurations must be distinct; found a repeated row")
    return c


def _flatten_scope(scope) -> list[Variable | VariableArray]:
    if isinstance(scope, Variable | VariableArray):
        return [scope]
    items = list(scope)
    for item in items:
        if not isinstance(item, Variable | VariableArray):
            raise FieldlibError(
                f"a factor scope holds Variables or VariableArrays, got {type(item).__name__}: "
                f"{item!r}"
            )
    return items


class Factor:
    """Base class of all factors.

    Subclasses set :attr:`scope` (Variables / VariableArrays), call
    :meth:`_set_batch` for each tensor argument, and implement :meth:`terms` and
    :meth:`dense_size`.

    Attributes:
        name: a label used in error messages (the graph gives one if None).
        scope: the declared arguments, Variables or VariableArrays.
        batch_size: N when a tensor carries a batch axis, else None.
    """

    kind = "factor"

    def __init__(self, scope, name: str | None = None):
        self.scope = _flatten_scope(scope)
        self.name = name
        self.batch_size: int | None = None

    # -- what every factor provides ------------------------------------------------------
    def variables(self) -> list[Variable]:
        """Every atomic variable the factor touches, in scope order."""
        out: list[Variable] = []
        for item in self.scope:
            out.extend(item.variables if isinstance(item, VariableArray) else [item])
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the factor holds (for dtype/device checks)."""
        return []

    def terms(self) -> list[Term]:
        """The factor as dense log-tables (for exact engines and generic messages)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement terms()")

    def dense_size(self) -> int:
        """Number of elements :meth:`terms` would allocate (all terms, batch included)."""
        raise NotImplementedError

    # -- what the factor declares -------------------------------------------------------
    def parameters(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}``: the factor's potentials, the tensors losses, checks and
        closed-form gradients differentiate with respect to (keyed ``"<factor>.<name>"``
        there). The default: the floating tensors of :meth:`tensors`, each named by the
        attribute that holds it (``tensor<i>`` if none does); override to leave out tensors
        that are not potentials (e.g. frame times)."""
        named = {id(v): k for k, v in reversed(list(vars(self).items()))
                 if isinstance(v, torch.Tensor)}
        return {named.get(id(t), f"tensor{i}"): t for i, t in enumerate(self.tensors())
                if t.is_floating_point()}

    def dense_table(self) -> torch.Tensor | None:
        """The factor as ONE dense log-table over its scope, ``([N,] d_1, ..., d_k)`` (N
        present iff batched), when it is exactly that and its scope holds Variables only (no
        VariableArray); None (the default) otherwise. An engine may stack such factors by
        shape and compute their messages from the stacked tables
        (inference/meanfield_stack.py) instead of calling :meth:`expected_messages`: a factor
        that declares a table must have the messages of that table."""
        return None

    # -- mean-field messages (MATH.md §3) --------------------------------------------------
    # A mean-field engine asks each factor for its expected log-potential given the current
    # Q, a :class:`~fieldlib.factors.beliefs.Beliefs` (q.probs, q.component_marginal,
    # q.wants, q.batch, q.options). The versions here are the GENERIC fallback over
    # :meth:`terms` (an einsum per term), so a new factor type works unchanged; factor types
    # override them with vectorised versions.
    def expected_messages(self, q: Beliefs) -> Messages:
        """``{item: message}``: for each Variable / VariableArray ``item`` of the scope that
        ``q.wants``, E_Q[log φ | item = x] summed over the factor's terms (the item's own Q
        excluded; MATH.md §3, Eq. 5). A message is a tensor ``([N,] [T,] d)`` (batch axis
        optional) or an :class:`OnComponent` over one block component. -inf where Q puts
        mass on an impossible configuration (``- q.options.penalty · p`` when set)."""
        out: dict = {}
        penalty = q.options.penalty
        for term in self.terms():
            table = term.table if term.batched else term.table.unsqueeze(0)
            qs = [q.probs(v) for v in term.variables]
            for a, v in enumerate(term.variables):
                if q.wants(v):
                    m = expected_log_table(table, qs, keep=a, penalty=penalty)
                    out[v] = out[v] + m if v in out else m
        return out

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        """``(N,)`` E_Q[log φ] (the factor's part of the ELBO); differentiable in the
        factor's tensors (Q is taken as given)."""
        total = 0.0
        for term in self.terms():
            table = term.table if term.batched else term.table.unsqueeze(0)
            total = total + expected_log_table(table, [q.probs(v) for v in term.variables],
                                               penalty=q.options.penalty)
        return total

    def position_energy(self, q: Beliefs) -> dict[VariableArray, torch.Tensor]:
        """``{array: (N, T)}``: each term's expected log-potential credited to every array
        position in its scope (a term on frames i and j counts at both: the per-frame rows
        of MATH.md §6, which sum to twice a pairwise energy). Terms touching no array
        position are left out."""
        out: dict = {}
        for term in self.terms():
            table = term.table if term.batched else term.table.unsqueeze(0)
            e = expected_log_table(table, [q.probs(v) for v in term.variables],
                                   penalty=q.options.penalty)
            for v in term.variables:
                if v.array is not None:
                    if v.array not in out:
                        out[v.array] = e.new_zeros(q.batch, v.array.size)
                    out[v.array] = out[v.array].index_add(
                        1, torch.tensor([v.position], device=e.device),
                        e.expand(q.batch)[:, None])
        return out

    def couplings(self) -> list[tuple[Variable, ...]]:
        """The groups of variables the factor couples (each term's scope). Variables that
        share no group can be updated at the same time by a sequential schedule."""
        return [tuple(term.variables) for term in self.terms()]

    def coupling_arity(self) -> int:
        """The most variables one group of :meth:`couplings` holds (0: a factor over no
        variable). An engine tells one-variable factors (at most 1: their messages do not
        depend on Q) from coupling ones by it, without listing the couplings, which for a
        factor over arrays is one Python object per position. The default reads
        :meth:`couplings`; the built-in types answer from their scope."""
        return max((len(c) for c in self.couplings()), default=0)

    def has_hard_zeros(self, q: Beliefs) -> bool:
        """Whether some configuration may have log-potential -inf. An engine skips its
        search for a configuration of positive probability when no coupling factor has
        any. The default, True, means "unknown: check with Q"; the built-in types look at
        their tensors (through ``q.constant``, once per run)."""
        return True

    # -- closed-form gradients (MATH.md §6) ------------------------------------------------
    def energy_gradient(self, q: Beliefs,
                        form: str = "sequence") -> dict[str, torch.Tensor] | None:
        """``{name: (N, *shape)}``: ∂ E_Q[log φ] / ∂θ for each parameter θ of
        :meth:`parameters` (``shape`` its shape without batch axis), written out without
        autograd: the product of Q's marginals on the parameter's entries (MATH.md §6,
        Eq. 7-9 are the free minus the clamped Q of this). ``form="frame"``: the sum of the
        per-frame rows, where a pairwise term counts at both of its frames.

        None (the default): the factor type has no closed form; checks report its
        parameters as such (``fieldlib gradcheck``)."""
        return None

    def closed_form_gradient(self, free: Beliefs, target: Beliefs,
                             form: str = "sequence") -> dict[str, torch.Tensor] | None:
        """``{name: tensor shaped like the parameter}``: the gradient of the mean-field
        surrogate E_free[log φ] - E_target[log φ] (MATH.md §6: "marginal minus target"),
        from :meth:`energy_gradient`, summed over the batch for an unbatched parameter.
        None when the factor has no closed form."""
        with torch.no_grad():
            gf = self.energy_gradient(free, form)
            if gf is None:
                return None
            gt = self.energy_gradient(target, form)
        params = self.parameters()
        out = {}
        for name, g in gf.items():
            d = g - gt[name]
            out[name] = d if d.dim() == params[name].dim() else d.sum(0)
        return out

    # -- stored messages (asynchronous mean-field, MATH.md §4-5; fieldlib.factors.stored) ----
    def stored_coupling(self):
        """The factor type's :class:`~fieldlib.factors.stored.StoredCoupling`: what a frame
        sends and how the incoming messages combine, for asynchronous mean-field. None (the
        default): the factor does not couple frames through stored messages."""
        return None

    def stored_inputs(self, n: int):
        """A :class:`~fieldlib.factors.stored.StoredInputs` for a graph of ``n`` sequences:
        the frames the factor couples and its tensors per frame / per sequence (what the
        ``async`` engine passes to the coupling). Needed by a type whose
        :meth:`stored_coupling` is not None."""
        raise NotImplementedError(f"{type(self).__name__} defines stored_coupling() but not "
                                  f"stored_inputs(n)")

    # -- helpers for subclasses -----------------------------------------------------------
    @property
    def label(self) -> str:
        return f"factor {self.name!r} ({self.kind})" if self.name else f"{self.kind} factor"

    def _set_batch(self, tensor: torch.Tensor, core_shape: Sequence[int], what: str) -> bool:
        """Check ``tensor`` has shape ``core_shape`` or ``(N,) + core_shape``, N >= 1.

        Returns whether it is batched; records N and checks it agrees across tensors.
        """
        core = tuple(int(s) for s in core_shape)
        shape = tuple(tensor.shape)
        if shape == core:
            return False
        if len(shape) == len(core) + 1 and shape[1:] == core:
            n = shape[0]
            if n == 0:
                raise ShapeError(f"{self.label}: {what} has a batch axis of size 0, shape "
                                 f"{shape}; a batch holds at least one element")
            if self.batch_size is not None and self.batch_size != n:
                raise ShapeError(
                    f"{self.label}: {what} has batch size {n}, another tensor has "
                    f"{self.batch_size}"
                )
            self.batch_size = n
            return True
        raise ShapeError(
            f"{self.label}: {what} must have shape {core} or (N, *{core}), got {shape}"
        )

    def _refuse_if_large(self, limit: int | None) -> None:
        limit = DEFAULT_MAX_DENSE_ELEMENTS if limit is None else limit
        size = self.dense_size()
        if size > limit:
            raise TooLargeError(
                f"{self.label}: its dense tables would hold {size:,} elements "
                f"({size * 8 / 2**30:.2f} GiB in float64), above the limit of {limit:,}; "
                f"use a mean-field engine, which never builds them"
            )

    def __repr__(self) -> str:
        names = ", ".join(getattr(s, "name", "?") for s in self.scope)
        return f"{type(self).__name__}({names}{', name=' + repr(self.name) if self.name else ''})"


def positions(scope: Iterable[Variable | VariableArray]) -> int | None:
    """Common length of the arrays in a scope (None when it holds no array).

    Raises ShapeError when arrays of different lengths are mixed.
    """
    sizes = {item.size for item in scope if isinstance(item, VariableArray)}
    if len(sizes) > 1:
        raise ShapeError(f"arrays in one factor scope must share a length, got {sorted(sizes)}")
    return sizes.pop() if sizes else None


def position_terms(factor: Factor, scope: Sequence[Variable | VariableArray],
                   table: torch.Tensor, batched: bool) -> list[Term]:
    """One :class:`Term` per position of a position-wise table ``([N,] L, d_1, ..., d_k)``
    over ``scope`` (arrays of length L and lone variables): the tables are the views of one
    ``unbind``, the scopes the arrays' variable lists zipped (no tensor call per position)."""
    slots = [s.variables if isinstance(s, VariableArray) else itertools.repeat(s)
             for s in scope]
    return [Term(variables, t, batched, factor)
            for variables, t in zip(zip(*slots), table.unbind(1 if batched else 0))]


def at(item: Variable | VariableArray, t: int) -> Variable:
    """The variable at position t of an array, or the variable itself."""
    return item[t] if isinstance(item, VariableArray) else item
