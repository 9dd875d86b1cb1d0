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

from collections.abc import Iterator, Mapping, Sequence

import torch

from fieldlib.errors import CardinalityError, FieldlibError, ShapeError

__all__ = ["Domain", "BlockDomain", "Variable", "VariableArray", "as_domain"]


class Domain:
    """A finite set of ``size`` states, optionally labelled.

    Args:
        size: number of states (>= 1).
        labels: optional sequence of ``size`` labels (strings or any hashable) for display.

    Raises:
        CardinalityError: ``size`` < 1 or ``labels`` of the wrong length.
    """

    def __init__(self, size: int, labels: Sequence | None = None):
        if int(size) != size or size < 1:
            raise CardinalityError(f"a domain needs a positive integer size, got {size!r}")
        self.size = int(size)
        if labels is not None:
            labels = list(labels)
            if len(labels) != self.size:
                raise CardinalityError(
                    f"a domain of size {self.size} got {len(labels)} labels"
                )
        self.labels = labels

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
        t = torch.as_tensor(tuples, dtype=torch.long)
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
        super().__init__(len(t), labels)

    def component_index(self, name: str) -> int:
        if name not in self.components:
            raise FieldlibError(
                f"block domain has no component {name!r}; it has {list(self.components)}"
            )
        return list(self.components).index(name)

    def component(self, name: str) -> torch.Tensor:
        """``LongTensor (S,)``: the value of component ``name`` in each block state."""
        return self.tuples[:, self.component_index(name)]

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


def as_domain(domain: int | Domain | Sequence) -> Domain:
    """Accept a size, a Domain, or a list of labels."""
    if isinstance(domain, Domain):
        return domain
    if hasattr(domain, "__index__"):  # int, numpy integer, 0-d integer tensor
        return Domain(int(domain))
    return Domain(len(domain), labels=list(domain))


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
        lengths: optional ``LongTensor (N,)``: for a batch of N sequences padded to T,
            positions ``t >= lengths[n]`` are padding in batch element n. Padding is
            clamped out of the model: it contributes nothing to log Z, and every factor
            term touching a padded position is masked to zero (see FactorGraph).

    Indexing ``array[t]`` gives the element :class:`Variable`; iteration yields all.
    """

    def __init__(self, name: str, size: int, domain, lengths=None):
        if int(size) != size or size < 1:
            raise ShapeError(f"array {name!r} needs a positive size, got {size!r}")
        self.name = str(name)
        self.size = int(size)
        self.domain = as_domain(domain)
        self.variables = [Variable(f"{self.name}[{t}]", self.domain) for t in range(self.size)]
        for t, v in enumerate(self.variables):
            v.array, v.position = self, t
        self.lengths = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long)
            if lengths.dim() != 1:
                raise ShapeError(
                    f"array {name!r}: lengths must be one-dimensional (N,), "
                    f"got shape {tuple(lengths.shape)}"
                )
            if len(lengths) and (lengths.min() < 1 or lengths.max() > self.size):
                raise ShapeError(
                    f"array {name!r}: lengths must lie in 1..{self.size}, got "
                    f"{lengths.tolist()}"
                )
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
