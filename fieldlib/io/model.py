"""TableModel: a discrete model as files hold it, and its conversion to and from FactorGraph.

Files (UAI, libDAI .fg) describe a model as variables 0..n-1 with domain sizes, and factors,
each a scope of variable indices and a table of non-negative potentials. A
:class:`TableModel` holds exactly that, tables in C order (the LAST variable of a scope
changes fastest, numpy's and UAI's layout). :meth:`TableModel.to_graph` builds a
:class:`~fieldlib.graph.FactorGraph` whose variables are named ``v0 .. v{n-1}`` in file
order and whose factors are :class:`~fieldlib.factors.Table` s of log-potentials (a zero
potential becomes ``-inf``); :meth:`TableModel.from_graph` goes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors import Table
from fieldlib.graph import FactorGraph

__all__ = ["TableModel"]


@dataclass
class TableModel:
    """Variables and factor tables of potentials (not logs).

    Attributes:
        cards: domain size of each variable, ``cards[i]`` for variable ``i``.
        scopes: each factor's scope, a tuple of distinct variable indices.
        tables: each factor's potentials, ``float64 ndarray`` of shape
            ``tuple(cards[v] for v in scope)`` (C order: last variable fastest).
        kind: ``"MARKOV"`` or ``"BAYES"`` (a BAYES factor is the CPT P(child | parents) with
            scope ``(parents..., child)``); kept for information, the graph is the same.
        source: the file it was read from (for messages).
        names: graph name of each variable (default ``v{label}``).
        labels: the file's label of each variable: its index in UAI, its libDAI label in
            .fg (any non-negative integers, ascending). Evidence files refer to these.
    """

    cards: list[int]
    scopes: list[tuple[int, ...]]
    tables: list[np.ndarray]
    kind: str = "MARKOV"
    source: str | None = None
    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.labels:
            self.labels = list(range(len(self.cards)))
        if not self.names:
            self.names = [f"v{label}" for label in self.labels]

    def index_of(self, label: int) -> int | None:
        """Position of the variable with file label ``label`` (None when absent)."""
        if self.labels == list(range(len(self.cards))):
            return label if 0 <= label < len(self.cards) else None
        try:
            return self.labels.index(label)
        except ValueError:
            return None

    @property
    def num_variables(self) -> int:
        return len(self.cards)

    # -- conversions --------------------------------------------------------------------
    def to_graph(self, dtype: torch.dtype = torch.float64) -> FactorGraph:
        """A FactorGraph: variables ``names`` in file order, one Table per factor
        (``f0, f1, ...``), log-potentials of ``dtype`` with zeros as ``-inf``. A model with
        no factors still computes in ``dtype``."""
        graph = FactorGraph(dtype)
        variables = [graph.variable(name, card) for name, card in zip(self.names, self.cards)]
        with np.errstate(divide="ignore"):
            for k, (scope, table) in enumerate(zip(self.scopes, self.tables)):
                log = torch.from_numpy(np.asarray(np.log(table))).to(dtype)
                graph.add(Table([variables[v] for v in scope], log, name=f"f{k}"))
        return graph

    @classmethod
    def from_graph(cls, graph: FactorGraph) -> TableModel:
        """The model of an unbatched graph: every dense term becomes one factor, variables
        are indexed in graph order, potentials are ``exp`` of the log-tables.

        Raises FieldlibError for a batched graph (a file holds one model).
        """
        if graph.batch_size is not None:
            raise FieldlibError(
                f"a model file holds one model, but the graph is batched "
                f"(batch size {graph.batch_size}); write one batch element at a time")
        cards = [v.cardinality for v in graph.variables.values()]
        scopes, tables = [], []
        for term in graph.terms():
            scope = tuple(graph.index(v) for v in term.variables)
            if len(set(scope)) != len(scope):
                raise FieldlibError(
                    f"{term.factor.label if term.factor else 'a term'} repeats a variable in "
                    f"its scope; model files need distinct variables per factor")
            table = torch.exp(term.table.detach().to(torch.float64)).cpu().numpy()
            scopes.append(scope)
            tables.append(np.ascontiguousarray(table))
        return cls(cards, scopes, tables, names=list(graph.variables))

    def check(self) -> None:
        """Check scopes and table shapes agree with ``cards`` (FieldlibError otherwise)."""
        n = len(self.cards)
        for k, (scope, table) in enumerate(zip(self.scopes, self.tables)):
            if any(not 0 <= v < n for v in scope) or len(set(scope)) != len(scope):
                raise FieldlibError(f"factor {k}: bad scope {scope} for {n} variables")
            shape = tuple(self.cards[v] for v in scope)
            if table.shape != shape:
                raise FieldlibError(
                    f"factor {k}: table shape {table.shape}, expected {shape}")

    def isolated(self) -> list[int]:
        """Variables in no factor's scope (formats without a variable list lose them)."""
        used = {v for scope in self.scopes for v in scope}
        return [i for i in range(len(self.cards)) if i not in used]

    def size(self) -> int:
        """Total number of table entries."""
        return sum(math.prod(t.shape) for t in self.tables)
