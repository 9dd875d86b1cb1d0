"""The factorised distribution Q of mean-field inference, stored group by group.

Q(X) = Π_v Q_v(x_v) (MATH.md §3): one factor of Q per variable, where a variable with a
:class:`~fieldlib.variables.BlockDomain` (a frame's joint states) is one factor of Q over all
its block states (structured mean-field). Storage is batched and vectorised:

* every :class:`~fieldlib.variables.VariableArray` is one group, a tensor ``(N, T, d)``;
* stand-alone variables are pooled by cardinality, one tensor ``(N, n, d)`` per pool.

Padded array positions hold all-zero rows, so every expectation over Q ignores them. A
:class:`MeanFieldState` implements :class:`~fieldlib.factors.beliefs.Beliefs`, the view
factors receive in :meth:`~fieldlib.factors.Factor.expected_messages` (``probs``,
``component_marginal``, ``wants``, ``constant``, ``batch``, ``options``). It belongs to one
run of an engine: the engine creates it, and nothing of it lives on the engine object; the
values factors keep through ``constant`` (what does not depend on Q) live and die with it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors.beliefs import MessageOptions, cached_constant
from fieldlib.factors.frame_intent import component_map
from fieldlib.variables import Variable, VariableArray

__all__ = ["Group", "Layout", "MeanFieldState"]


@dataclass
class Group:
    """One stored block of Q: an array (``array`` set) or a pool of stand-alone variables."""

    index: int
    size: int
    card: int
    variables: list[Variable]
    array: VariableArray | None = None
    domain: object = None
    _components: dict = field(default_factory=dict)

    def component_index(self, component: str | None) -> tuple[torch.Tensor, int]:
        """State -> component value map of this group's (block) domain, cached."""
        if component not in self._components:
            self._components[component] = component_map(self.domain, component)
        return self._components[component]


class Layout:
    """Where each variable of a graph lives in the grouped storage of Q.

    ``where[v]`` is ``(group, position)``: an array member is found through its array (no
    per-position entry is built), a stand-alone variable in its pool."""

    def __init__(self, graph):
        self.groups: list[Group] = []
        self.array_group: dict[VariableArray, int] = {}
        self.where = _Where(self.array_group)
        for a in graph.arrays.values():
            g = Group(len(self.groups), a.size, a.cardinality, a.variables, a, a.domain)
            self.groups.append(g)
            self.array_group[a] = g.index
        pools: dict[int, Group] = {}
        for v in graph.standalone_variables():
            if v in self.where:  # a member of an array of the graph, added again on its own
                continue
            if v.cardinality not in pools:
                pools[v.cardinality] = Group(len(self.groups), 0, v.cardinality, [],
                                             domain=v.domain)
                self.groups.append(pools[v.cardinality])
            g = pools[v.cardinality]
            self.where.pooled[v] = (g.index, g.size)
            g.variables.append(v)
            g.size += 1

    def locate(self, item) -> tuple[int, int | None]:
        """``(group, position)`` of a Variable, ``(group, None)`` of a VariableArray."""
        if isinstance(item, VariableArray):
            if item not in self.array_group:
                raise FieldlibError(f"array {item.name!r} is not in this graph")
            return self.array_group[item], None
        if item not in self.where:
            raise FieldlibError(f"variable {item.name!r} is not in this graph")
        return self.where[item]


class _Where:
    """``Variable -> (group, position)``: array members through their array, pooled
    variables from a dict."""

    def __init__(self, array_group: dict):
        self.array_group = array_group
        self.pooled: dict[Variable, tuple[int, int]] = {}

    def __getitem__(self, v: Variable) -> tuple[int, int]:
        g = self.array_group.get(v.array) if v.array is not None else None
        if g is not None:
            return g, v.position
        return self.pooled[v]

    def __contains__(self, v) -> bool:
        return isinstance(v, Variable) and (v.array in self.array_group or v in self.pooled)


class MeanFieldState:
    """Q for a batch of N, as probabilities and logs per group, plus the factor-facing view
    (:class:`~fieldlib.factors.beliefs.Beliefs`).

    Attributes:
        q, logq: per group ``(N, L, d)`` (padding: q = 0, logq = -inf).
        options: the run's :class:`~fieldlib.factors.beliefs.MessageOptions` (the -inf
            penalty, KernelTemporal's kernel sums), read by the factors.
    """

    def __init__(self, layout: Layout, batch: int, dtype, device,
                 options: MessageOptions | None = None):
        self.layout, self.batch = layout, batch
        self.dtype, self.device = dtype, device
        self.options = options or MessageOptions()
        self.q = [torch.zeros(batch, g.size, g.card, dtype=dtype, device=device)
                  for g in layout.groups]
        self._logq: list[torch.Tensor | None] = [None] * len(self.q)
        self._cache: dict = {}
        self._constants: dict = {}  # Beliefs.constant: per run, shared with option views
        self._want: dict[int, torch.Tensor | None] | None = None

    @classmethod
    def from_marginals(cls, graph, marginals, batch: int | None = None) -> MeanFieldState:
        """A fixed Q from marginals keyed by array / variable name (as in a Result):
        arrays ``([N,] T, d)``, stand-alone variables ``([N,] d)``."""
        layout = Layout(graph)
        first = next(iter(marginals.values()))
        n = batch or graph.batch_size or 1
        state = cls(layout, n, first.dtype, first.device)
        for g in layout.groups:
            if g.array is not None:
                m = marginals[g.array.name]
                m = m if m.dim() == 3 else m.unsqueeze(0)
                state.q[g.index] = m.expand(n, -1, -1).detach()
            else:
                rows = []
                for v in g.variables:
                    m = marginals[v.name]
                    rows.append((m if m.dim() == 2 else m.unsqueeze(0)).expand(n, -1))
                state.q[g.index] = torch.stack(rows, 1).detach()
        return state

    # -- the view factors use ----------------------------------------------------------------
    def probs(self, item) -> torch.Tensor:
        """Q of a Variable ``(N, d)`` or of a VariableArray ``(N, T, d)``."""
        g, pos = self.layout.locate(item)
        return self.q[g] if pos is None else self.q[g][:, pos]

    def component_marginal(self, array: VariableArray, component: str | None) -> torch.Tensor:
        """``(N, T, D)``: Q of every frame summed onto a block component (cached until the
        group changes). ``component=None`` gives Q itself."""
        g, _ = self.layout.locate(array)
        if component is None:
            return self.q[g]
        key = (g, component)
        if key not in self._cache:
            index, size = self.layout.groups[g].component_index(component)
            q = self.q[g]
            out = q.new_zeros(*q.shape[:-1], size)
            self._cache[key] = out.index_add_(-1, index.to(q.device), q)
        return self._cache[key]

    def wants(self, item) -> bool:
        """Whether the current update needs a message to ``item``."""
        if self._want is None:
            return True
        g, pos = self.layout.locate(item)
        if g not in self._want:
            return False
        mask = self._want[g]
        return mask is None or pos is None or bool(mask[pos])

    def constant(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run (and grad mode) under ``key``: a value that does not
        depend on Q (Beliefs.constant)."""
        return cached_constant(self._constants, key, compute)

    # -- engine side ---------------------------------------------------------------------------
    def with_options(self, **changes) -> MeanFieldState:
        """A view of the same Q (shared storage: it sees every later ``set_group``) whose
        options differ by ``changes``, e.g. ``penalty=1e30`` for the soft messages of a row
        whose every state is impossible."""
        view = copy.copy(self)
        view.options = dataclasses.replace(self.options, **changes)
        return view

    def set_wants(self, want: dict[int, torch.Tensor | None] | None) -> None:
        """Groups (and per group an optional position mask ``(L,)``) being updated."""
        self._want = want

    def set_group(self, g: int, q: torch.Tensor, logq: torch.Tensor | None = None) -> None:
        """Store Q of group ``g`` (its log computed on demand when not given)."""
        self.q[g], self._logq[g] = q, logq
        for key in [k for k in self._cache if k[0] == g]:
            del self._cache[key]

    @property
    def logq(self) -> list[torch.Tensor]:
        """log Q per group (-inf where Q = 0), computed lazily."""
        for g, q in enumerate(self.q):
            if self._logq[g] is None:
                self._logq[g] = torch.log(q)
        return self._logq

    def entropy(self) -> torch.Tensor:
        """``(N,)`` Σ_v H(Q_v) (0 log 0 = 0)."""
        total = torch.zeros(self.batch, dtype=self.dtype, device=self.device)
        for q, logq in zip(self.q, self._logq):
            if not q.numel():
                continue
            if logq is None:  # q log q; 0 · log 0 = NaN -> 0 (faster than xlogy or where)
                plogp = (q * torch.log(q)).nan_to_num_(nan=0.0)
            else:
                plogp = torch.where(q > 0, q * logq, q.new_zeros(()))
            total = total - plogp.sum((1, 2))
        return total
