"""Variables, their domains, and batched arrays of variables.

Conventions (stated once, used everywhere):

* A variable takes one of ``cardinality`` states ``0 .. cardinality-1``.
* A :class:`VariableArray` is ``size`` variables that share one domain, e.g. the T frames of a
  video (MATH.md §1). It is one object: factors over an array are applied position-wise with
  one tensor whose array axis comes right after the optional batch axis.
* A :class:`BlockDomain` is a joint domain whose states are an explicit list of allowed
  tuples of component values (the set B of (C, O, A, P) tuples seen in training, times the
  scene S: MATH.md §1). A frame is then one block variable over ``len(tuples)`` states, never
  the dense product of its components.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

import torch

from fieldlib.errors import CardinalityError, FieldlibError, ShapeError

__all__ = ["Domain", "BlockDomain", "Variable", "VariableArray", "as_domain", "as_count",
           "integer_tensor", "run_length"]


def as_count(value, what: str, error=CardinalityError, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``: an int (not a bool), an integral finite float
    or a 0-d integer tensor. Anything else (2.5, NaN, "3", True, ...) raises ``error`` whose
    message starts with ``what``."""
    ok = False
    if not isinstance(value, bool | str | bytes):
        if hasattr(value, "__index__"):
            value, ok = int(value.__index__()), True
        elif isinstance(value, numbers.Real) or (
                isinstance(value, torch.Tensor) and value.dim() == 0
                and value.is_floating_point()):
            value = float(value)
            ok = math.isfinite(value) and value == int(value)
            value = int(value) if ok else value
    if not ok or value < minimum:
        raise error(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def integer_tensor(value, what: str) -> torch.Tensor:
    """``value`` as a LongTensor with no rounding: integer data, or floats that are exactly
    integers. Raises FieldlibError naming ``what`` for anything else (fractions, NaN, inf,
    booleans, complex numbers, strings, None, integers beyond int64)."""
    if value is None:
        raise FieldlibError(f"{what} is None; expected integers")
    try:
        t = torch.as_tensor(value)
        if t.is_floating_point() and not isinstance(value, torch.Tensor):
            t = torch.as_tensor(value, dtype=torch.float64)  # float32 would round 2**24 + 1
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise FieldlibError(f"{what} must be integers, got {_short(value)} ({exc})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise FieldlibError(f"{what} must be integers, got a {t.dtype} tensor")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round()) | (t.abs() >= 2.0**63)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise FieldlibError(
                f"{what} must be integers, got {t[where].item()!r} at index {where}")
    return t.long()


def _short(value, k: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= k else text[: k - 3] + "..."


class Domain:
    """A finite set of ``size`` states, optionally labelled.

    Args:
        size: number of states (an integer >= 1).
        labels: optional sequence of ``size`` distinct labels (strings or any hashable);
            string labels may be used as evidence (see :meth:`state`).

    Raises:
        CardinalityError: ``size`` not an integer >= 1 (2.5, "3", True, NaN), ``labels`` of
            the wrong length or repeated.
    """

    def __init__(self, size: int, labels: Sequence | None = None):
        self.size = as_count(size, "a domain's size")
        if labels is not None:
            if isinstance(labels, str | bytes):
                raise CardinalityError(
                    f"domain labels must be a sequence of labels, got the string {labels!r}")
            labels = list(labels)
            if len(labels) != self.size:
                raise CardinalityError(
                    f"a domain of size {self.size} got {len(labels)} labels"
                )
            try:
                distinct = len(set(labels)) == len(labels)
            except TypeError:
                raise CardinalityError("domain labels must be hashable") from None
            if not distinct:
                raise CardinalityError(f"domain labels must be distinct, got {labels!r}")
        self.labels = labels

    def state(self, label: str) -> int:
        """The state whose label is the string ``label``.

        Raises KeyError when the domain has no such label (callers add context)."""
        if self.labels is None or label not in self.labels:
            raise KeyError(label)
        return self.labels.index(label)

    def label(self, state: int):
        """The label of ``state`` (the state itself when the domain is unlabelled)."""
        return self.labels[state] if self.labels is not None else state

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Domain({self.size})"


class BlockDomain(Domain):
    """A joint domain over named components, restricted to an explicit list of tuples.

    Args:
        components: mapping from component name to its cardinality (or to a :class:`Domain`),
            e.g. ``{"c": 157, "o": 38, "a": 33, "p": 3, "s": 15}``.
        tuples: integer tensor/array of shape ``(S, len(components))``: row ``k`` is the
            component values of block state ``k``. Rows must be distinct and in range.

    Attributes:
        tuples: ``LongTensor (S, K)``.
        components: ordered dict name -> Domain.

    Raises:
        ShapeError: ``tuples`` not two-dimensional with one column a component.
        CardinalityError: a value out of its component's range.
        FieldlibError: duplicate rows.
    """

    def __init__(self, components: Mapping[str, int | Domain], tuples, labels=None):
        self.components = {
            name: (d if isinstance(d, Domain) else Domain(d)) for name, d in components.items()
        }
        t = integer_tensor(tuples, "block tuples")
        if t.dim() != 2 or t.shape[1] != len(self.components):
            raise ShapeError(
                f"block tuples must have shape (S, {len(self.components)}) for components "
                f"{list(self.components)}, got {tuple(t.shape)}"
            )
        for k, (name, dom) in enumerate(self.components.items()):
            col = t[:, k]
            if len(col) and (col.min() < 0 or col.max() >= dom.size):
                bad = int(((col < 0) | (col >= dom.size)).nonzero()[0, 0])
                raise CardinalityError(
                    f"block tuple {bad} has {name}={int(col[bad])}, outside 0..{dom.size - 1}"
                )
        if len(torch.unique(t, dim=0)) != len(t):
            raise FieldlibError("block tuples must be distinct; found a repeated row")
        self.tuples = t
        # derived index structures of factors on this domain (Component's block plans),
        # built once per (components, configs): the domain's tuples never change
        self.plans: dict = {}
        super().__init__(len(t), labels)

    def component_index(self, name: str) -> int:
        if name not in self.components:
            raise FieldlibError(
                f"block domain has no component {name!r}; it has {list(self.components)}"
            )
        return list(self.components).index(name)

    def component(self, name: str) -> torch.Tensor:
        """``LongTensor (S,)``: the value of component ``name`` in each block state
        (contiguous: as an index of ``gather`` / ``index_add`` a strided column is slower)."""
        return self.tuples[:, self.component_index(name)].contiguous()

    def flat_index(self, names: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Row-major index of each block state's sub-tuple on ``names`` (C order), and the
        size of that sub-product. ``(LongTensor (S,), int)``."""
        index = torch.zeros(self.size, dtype=torch.long)
        total = 1
        for name in names:
            d = self.components[name].size if name in self.components else None
            if d is None:
                self.component_index(name)  # raises with the list of components
            index = index * d + self.component(name)
            total *= d
        return index, total

    def __repr__(self) -> str:
        return f"BlockDomain({list(self.components)}, states={self.size})"


def run_length(key: torch.Tensor) -> int:
    """The largest r dividing ``len(key)`` with ``key`` constant on each run of r consecutive
    entries (1 when none is longer): e.g. a frame state ``b * S + s``'s object, r = S."""
    n = key.numel()
    if n <= 1:
        return 1
    edges = (key[1:] != key[:-1]).nonzero().flatten() + 1
    return math.gcd(n, *edges.tolist()) if edges.numel() else n


def as_domain(domain: int | Domain | Sequence) -> Domain:
    """Accept a size (an integer), a Domain, or a list of labels.

    Raises CardinalityError for anything else, e.g. 2.5, NaN, True or the string "3" (a
    string is not taken as a list of one-character labels).
    """
    if isinstance(domain, Domain):
        return domain
    if isinstance(domain, str | bytes | bool) or domain is None:
        raise CardinalityError(
            f"a domain is a number of states, a Domain or a list of labels; got {domain!r}")
    if isinstance(domain, torch.Tensor) and domain.dim() > 0:
        raise CardinalityError(
            f"a domain is a number of states, a Domain or a list of labels; got a tensor of "
            f"shape {tuple(domain.shape)}")
    if isinstance(domain, numbers.Real | torch.Tensor) or hasattr(domain, "__index__"):
        return Domain(domain)
    try:
        labels = list(domain)
    except TypeError:
        raise CardinalityError(
            f"a domain is a number of states, a Domain or a list of labels; got "
            f"{_short(domain)}") from None
    return Domain(len(labels), labels=labels)


class Variable:
    """One discrete random variable.

    Args:
        name: unique name within a graph.
        domain: cardinality (int), a :class:`Domain`, or a list of state labels.

    Attributes:
        cardinality: number of states.
        array, position: the :class:`VariableArray` it belongs to and its index there
            (``None`` for a stand-alone variable).
    """

    def __init__(self, name: str, domain: int | Domain | Sequence):
        self.name = str(name)
        self.domain = as_domain(domain)
        self.array: VariableArray | None = None
        self.position: int | None = None

    @property
    def cardinality(self) -> int:
        return self.domain.size

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, {self.cardinality})"


class VariableArray:
    """``size`` variables sharing one domain: a sequence of frames, one object.

    Args:
        name: array name; element ``t`` is named ``f"{name}[{t}]"``.
        size: number of positions T.
        domain: shared domain (cardinality, Domain, BlockDomain or labels).
        lengths: optional integers ``(N,)`` (N >= 1): for a batch of N sequences padded to
            T, positions ``t >= lengths[n]`` are padding in batch element n. Padding is
            clamped out of the model: it contributes nothing to log Z, and every factor
            term touching a padded position is masked to zero (see FactorGraph). A length
            of 0 (an empty video) is valid: that element's array contributes nothing.

    Indexing ``array[t]`` gives the element :class:`Variable`; iteration yields all.

    Raises:
        ShapeError: ``size`` not an integer >= 1; ``lengths`` not a non-empty 1-d list of
            integers in 0..size (fractions, NaN and booleans are refused, not rounded).
        CardinalityError: a bad domain (see :func:`as_domain`).
    """

    def __init__(self, name: str, size: int, domain, lengths=None):
        self.name = str(name)
        self.size = as_count(size, f"array {self.name!r}: its size", ShapeError)
        self.domain = as_domain(domain)
        self.variables = [Variable(f"{self.name}[{t}]", self.domain) for t in range(self.size)]
        for t, v in enumerate(self.variables):
            v.array, v.position = self, t
        self.lengths = None
        if lengths is not None:
            what = f"array {self.name!r}: lengths"
            try:
                lengths = integer_tensor(lengths, what)
            except FieldlibError as exc:
                raise ShapeError(str(exc)) from None
            if lengths.dim() != 1 or len(lengths) == 0:
                raise ShapeError(
                    f"{what} must be one-dimensional (N,) with N >= 1 (one length per batch "
                    f"element), got shape {tuple(lengths.shape)}"
                )
            if lengths.min() < 0 or lengths.max() > self.size:
                raise ShapeError(f"{what} must lie in 0..{self.size}, got {lengths.tolist()}")
            self.lengths = lengths

    @property
    def cardinality(self) -> int:
        return self.domain.size

    def mask(self) -> torch.Tensor | None:
        """``BoolTensor (N, T)``: True on real positions; None when nothing is padded."""
        if self.lengths is None:
            return None
        return torch.arange(self.size) < self.lengths[:, None]

    def __getitem__(self, t: int) -> Variable:
        return self.variables[t]

    def __iter__(self) -> Iterator[Variable]:
        return iter(self.variables)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"VariableArray({self.name!r}, size={self.size}, cardinality={self.cardinality})"
