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
engines use a factor's own vectorised message where it has one and these terms otherwise.
A new factor type is one subclass in one file, registered with :func:`register_factor`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fieldlib.errors import FieldlibError, InvalidPotentialError, ShapeError, TooLargeError
from fieldlib.variables import Variable, VariableArray

__all__ = [
    "Term",
    "Factor",
    "register_factor",
    "factor_types",
    "check_log_potential",
    "DEFAULT_MAX_DENSE_ELEMENTS",
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
    """Return ``tensor`` as a floating tensor; reject NaN and +inf with a clear error."""
    t = torch.as_tensor(tensor)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    bad = torch.isnan(t) | (t == math.inf)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = "NaN" if bool(torch.isnan(t[where])) else "+inf"
        raise InvalidPotentialError(
            f"{what}: log-potential is {value} at index {where} (only finite values or -inf, "
            f"meaning impossible, are allowed)"
        )
    return t


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

    # -- helpers for subclasses -----------------------------------------------------------
    @property
    def label(self) -> str:
        return f"factor {self.name!r} ({self.kind})" if self.name else f"{self.kind} factor"

    def _set_batch(self, tensor: torch.Tensor, core_shape: Sequence[int], what: str) -> bool:
        """Check ``tensor`` has shape ``core_shape`` or ``(N,) + core_shape``.

        Returns whether it is batched; records N and checks it agrees across tensors.
        """
        core = tuple(int(s) for s in core_shape)
        shape = tuple(tensor.shape)
        if shape == core:
            return False
        if len(shape) == len(core) + 1 and shape[1:] == core:
            n = shape[0]
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


def at(item: Variable | VariableArray, t: int) -> Variable:
    """The variable at position t of an array, or the variable itself."""
    return item[t] if isinstance(item, VariableArray) else item
