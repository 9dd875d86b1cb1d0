"""FactorGraph: holds variables and factors, validates them, and hands engines dense terms.

    g = FactorGraph()
    x = g.array("x", 4, 3)                 # 4 frames, 3 states each
    I = g.variable("I", 2)                 # the latent intent
    g.add(Table(x, unary))                 # unary: (4, 3) or (N, 4, 3)
    g.add(FrameIntent(x, I, psi))          # psi: (4, 3, 2)
    g.add(KernelTemporal(x, mu, kernel=2.0))

Padding: an array created with ``lengths`` (N,) has padded positions per batch element.
The graph clamps each padded variable to state 0 and masks every term touching it to zero,
so padding changes neither log Z nor any real variable's marginal (any engine, for free).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fieldlib.errors import (
    EvidenceError,
    FieldlibError,
    ShapeError,
    UnknownVariableError,
)
from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS, Factor, Term
from fieldlib.variables import Variable, VariableArray, integer_tensor

__all__ = ["FactorGraph"]


class FactorGraph:
    """Variables (and arrays of them) plus factors over them.

    Attributes:
        variables: ``dict name -> Variable`` of every atomic variable, in insertion order.
        arrays: ``dict name -> VariableArray``.
        factors: list of factors in insertion order.
        batch_size: N when any factor (or array ``lengths``) is batched, else None.

    Args:
        dtype: the floating dtype of a graph without floating factor tensors (default:
            torch's default dtype); otherwise the graph's dtype is its factors' promoted one.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise FieldlibError(f"FactorGraph(dtype=...) takes a floating torch dtype, got "
                                f"{dtype!r}")
        self._dtype = dtype
        self.variables: dict[str, Variable] = {}
        self.arrays: dict[str, VariableArray] = {}
        self.factors: list[Factor] = []
        self.batch_size: int | None = None
        self._index: dict[str, int] = {}  # variable name -> position in self.variables
        self._standalone: dict[str, Variable] = {}  # added on their own, not by an array

    # -- building -------------------------------------------------------------------------
    def variable(self, name: str, domain) -> Variable:
        """Create and add a variable (cardinality, Domain or labels)."""
        return self.add(Variable(name, domain))

    def array(self, name: str, size: int, domain, lengths=None) -> VariableArray:
        """Create and add a VariableArray of ``size`` positions."""
        return self.add(VariableArray(name, size, domain, lengths=lengths))

    def add(self, *items):
        """Add Variables, VariableArrays and Factors; returns the (last) item added."""
        for item in items:
            if isinstance(item, VariableArray):
                self._add_array(item)
            elif isinstance(item, Variable):
                self._add_variable(item)
                self._standalone[item.name] = item
            elif isinstance(item, Factor):
                self._add_factor(item)
            elif isinstance(item, Iterable):
                self.add(*item)
            else:
                raise FieldlibError(f"cannot add {type(item).__name__} to a FactorGraph")
        return items[-1] if items else None

    def _add_variable(self, v: Variable) -> None:
        if v.name in self.variables:
            if self.variables[v.name] is v:
                return
            raise FieldlibError(f"the graph already has a variable named {v.name!r}")
        self._index[v.name] = len(self.variables)
        self.variables[v.name] = v

    def _add_array(self, a: VariableArray) -> None:
        if a.name in self.arrays:
            if self.arrays[a.name] is a:
                return
            raise FieldlibError(f"the graph already has an array named {a.name!r}")
        if a.lengths is not None:
            self._set_batch(len(a.lengths), f"array {a.name!r} lengths")
        self.arrays[a.name] = a
        for v in a:
            self._add_variable(v)

    def _add_factor(self, f: Factor) -> None:
        if f.name is None:
            f.name = f"{f.kind}{len(self.factors)}"
        seen = set()
        for v in ([] if self._scope_known(f) else f.variables()):  # names the culprit
            if id(v) in seen:
                raise FieldlibError(f"{f.label} uses variable {v.name!r} twice in its scope")
            seen.add(id(v))
            if self.variables.get(v.name) is not v:
                raise UnknownVariableError(
                    f"{f.label} uses variable {v.name!r}, which is not in this graph "
                    f"(add it, or its array, before the factor)"
                )
        if f.batch_size is not None:
            self._set_batch(f.batch_size, f.label)
        self._check_tensors(f)
        self.factors.append(f)

    def _scope_known(self, f: Factor) -> bool:
        """Whether every variable of ``f`` is in this graph, each once, decided per scope
        item (an array of the graph holds its variables) without a pass over positions."""
        arrays = [s for s in f.scope if isinstance(s, VariableArray)]
        lone = [s for s in f.scope if not isinstance(s, VariableArray)]
        ids = {id(a) for a in arrays}
        return (len(ids) == len(arrays) and len({id(v) for v in lone}) == len(lone)
                and all(self.arrays.get(a.name) is a for a in arrays)
                and all(self.variables.get(v.name) is v for v in lone)
                and not any(v.array is not None and id(v.array) in ids for v in lone))

    def _set_batch(self, n: int, what: str) -> None:
        if self.batch_size is not None and self.batch_size != n:
            raise ShapeError(f"{what} has batch size {n}, but the graph's is {self.batch_size}")
        self.batch_size = n

    def _check_tensors(self, f: Factor) -> None:
        if not self.factors:
            return
        device = self.device
        for t in f.tensors():
            if t.device != device:
                raise FieldlibError(
                    f"{f.label} is on {t.device} but the graph's factors are on {device}"
                )

    # -- queries --------------------------------------------------------------------------
    def standalone_variables(self) -> list[Variable]:
        """The variables added on their own (not through an array), in insertion order:
        what an engine pools, without a pass over every array position."""
        return list(self._standalone.values())

    def index(self, v: Variable) -> int:
        """Position of ``v`` in :attr:`variables` (keyed by name, so a copy of the graph made
        with ``copy.deepcopy``, ``pickle`` or ``torch.save`` indexes its own variables).

        Raises UnknownVariableError when ``v`` is not this graph's variable."""
        if self.variables.get(v.name) is not v:
            raise UnknownVariableError(f"{v!r} is not in this graph")
        return self._index[v.name]

    def resolve(self, key) -> Variable | VariableArray:
        """A Variable/VariableArray of this graph from itself or its name."""
        if isinstance(key, Variable | VariableArray):
            name = key.name
            found = self.arrays.get(name) if isinstance(key, VariableArray) else \
                self.variables.get(name)
            if found is key:
                return key
            raise UnknownVariableError(f"{key!r} is not in this graph")
        if not isinstance(key, str):
            raise UnknownVariableError(
                f"expected a Variable, a VariableArray or a name, got {type(key).__name__} "
                f"{key!r}"
            )
        if key in self.arrays:
            return self.arrays[key]
        if key in self.variables:
            return self.variables[key]
        raise UnknownVariableError(
            f"unknown variable {key!r}; the graph has {_preview(self.variables)}"
        )

    @property
    def device(self) -> torch.device:
        for f in self.factors:
            for t in f.tensors():
                return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        dtype = None
        for f in self.factors:
            for t in f.tensors():
                if t.is_floating_point():
                    dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
        return dtype or getattr(self, "_dtype", None) or torch.get_default_dtype()

    def active(self, v: Variable) -> torch.Tensor | None:
        """``BoolTensor (N,)``: whether ``v`` is a real (not padded) variable per batch
        element; None when it is never padded."""
        a = v.array
        if a is None or a.lengths is None:
            return None
        return v.position < a.lengths.to(self.device)

    # -- evidence -------------------------------------------------------------------------
    def evidence(self, evidence: Mapping | None) -> dict[Variable, torch.Tensor]:
        """Normalise evidence to ``{Variable: LongTensor ()}`` or ``(N,)`` per batch element.

        Keys are Variables, VariableArrays or their names; an array takes a ``(T,)`` or
        ``(N, T)`` value. A value is an integer state (a tensor, number or list), or a state
        label (a string, or a list of them) of a variable whose domain has labels; floats
        are accepted only when they are exact integers.

        Partial evidence: in a tensor of values (an array's ``(T,)`` / ``(N, T)``, or one
        variable's ``(N,)``), -1 marks an entry unobserved. The other form is a pair
        ``(states, observed)`` with ``observed`` a boolean tensor of the states' shape (or
        broadcastable to it), True where observed; the states elsewhere are ignored (and
        -1 is unobserved there too). A
        variable observed in some batch elements only is returned with -1 in the others
        (engines clamp it where observed and leave it free elsewhere); one observed in no
        element is left out. A lone -1 for one variable is refused: leave it out instead.

        Padding (an array made with ``lengths``): a padded position takes no evidence. In
        evidence for a whole array, and for an element, the value there must be -1 (what
        MAP reports on padding) or 0 (the state padding is clamped to), or be marked
        unobserved; it is then ignored. Any other value there raises, naming the variable
        and the batch element. Every engine shares this rule.

        Raises:
            EvidenceError: a state out of range, a label the domain does not have, a
                fraction / NaN / boolean / None / empty value, a bad shape (of the states or
                of the mask), evidence on a padded position, or one variable given two
                different values (e.g. by ``"x"`` and ``"x[1]"``).
            UnknownVariableError: a key that is not a variable or array of this graph.
        """
        out: dict[Variable, torch.Tensor] = {}
        source: dict[Variable, str] = {}
        if evidence is None:
            return out
        if not isinstance(evidence, Mapping):
            raise EvidenceError(
                f"evidence must be a mapping from variables (or arrays, or their names) to "
                f"states, got {type(evidence).__name__}"
            )
        for key, value in evidence.items():
            target = self.resolve(key)
            value, observed = self.evidence_tensor(target, value)
            if isinstance(target, VariableArray):
                if value.shape[-1:] != (target.size,) or value.dim() > 2:
                    raise EvidenceError(
                        f"evidence for array {target.name!r} must have shape "
                        f"({target.size},) or (N, {target.size}), got {tuple(value.shape)}"
                    )
                pairs = [(v, value[..., t], observed[..., t]) for t, v in enumerate(target)]
            else:
                pairs = [(target, value, observed)]
            for v, val, obs in pairs:
                if val.dim() > 1:
                    raise EvidenceError(f"evidence for {v.name!r} must be a scalar or (N,)")
                if val.dim() == 1:
                    self._check_evidence_batch(v, len(val))
                active = self.active(v)
                wrong = obs & ((val < 0) | (val >= v.cardinality))
                if active is not None:
                    wrong = wrong & active  # padding has its own rule
                if bool(wrong.any()):
                    bad = int(val.expand_as(wrong)[wrong].flatten()[0])
                    raise EvidenceError(
                        f"evidence {v.name}={bad} is outside its states 0..{v.cardinality - 1}"
                        + (" (a lone -1 is no state: leave the variable out)" if bad == -1
                           and val.dim() == 0 else "")
                    )
                val = self._evidence_on_padding(v, val, obs)
                if val is None:
                    continue  # observed in no batch element
                if v in out:
                    val = _merge_evidence(v, out[v], val, source[v], target.name)
                out[v], source[v] = val, target.name
        return out

    def evidence_tensor(self, target, value) -> tuple[torch.Tensor, torch.Tensor]:
        """One evidence value of :meth:`evidence`, for ``target`` (a variable or array of
        this graph, e.g. from :meth:`resolve`), as ``(states, observed)``: a LongTensor on
        the graph's device (labels mapped) and a BoolTensor of its shape, False where the
        value is unobserved (the mask of a ``(states, observed)`` pair; -1 in a tensor of
        values). Shapes and ranges are checked by :meth:`evidence`, not here; EvidenceError
        for None, an empty value, a fraction, an unknown label or a malformed mask."""
        name = target.name
        if value is None:
            raise EvidenceError(f"evidence for {name!r} is None; give a state (an integer)")
        mask = None
        if isinstance(value, tuple | list) and len(value) == 2 and _is_bool_mask(value[1]):
            value, mask = value
        value = _map_labels(target, value)
        big = _beyond_int64(value)
        if big is not None:
            raise EvidenceError(
                f"evidence {name}={big} is outside its states 0..{target.cardinality - 1}")
        try:
            value = integer_tensor(value, f"evidence for {name!r}")
        except FieldlibError as exc:
            raise EvidenceError(f"{exc} (states 0..{target.cardinality - 1})") from None
        if value.numel() == 0:
            raise EvidenceError(f"evidence for {name!r} is empty (shape "
                                f"{tuple(value.shape)}); leave the variable out instead")
        value = value.to(self.device)
        if mask is None:  # -1 marks an entry unobserved, except as a lone value
            return value, (value != -1) if value.dim() else torch.ones_like(value, dtype=bool)
        mask = torch.as_tensor(mask, device=self.device)
        try:
            mask = mask.expand(value.shape)
        except RuntimeError:
            raise EvidenceError(
                f"evidence for {name!r}: the observed mask has shape {tuple(mask.shape)}, "
                f"the states {tuple(value.shape)}; give one of the states' shape") from None
        if value.dim():
            mask = mask & (value != -1)  # -1 stays "unobserved" in the pair form too
        return torch.where(mask, value, value.new_full((), -1)), mask

    def _evidence_on_padding(self, v: Variable, val: torch.Tensor,
                             observed: torch.Tensor) -> torch.Tensor | None:
        """Apply the padding rule of :meth:`evidence` to one variable's values (-1 where
        ``observed`` is False): -1 or 0 on padding, or unobserved there. Returns the values
        with padding set to the clamp state 0 when every real entry is observed, to -1 when
        only some are, and None when none is."""
        active = self.active(v)
        if active is not None and not bool(active.all()):
            full, seen = val.expand(len(active)), observed.expand(len(active))
            bad = ~active & seen & (full != -1) & (full != 0)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise EvidenceError(
                    f"evidence {v.name}={int(full[b])} in batch element {b}, where {v.name} is "
                    f"padding (lengths[{b}] = {int(v.array.lengths[b])}); a padded position "
                    f"takes no evidence: give -1 there or leave it out"
                )
            real = active & seen
            if not bool(real.any()):
                return None
            if bool((real | ~active).all()):
                return torch.where(active, full, full.new_zeros(()))
            return torch.where(real, full, full.new_full((), -1))
        if not bool(observed.any()):
            return None
        return val

    def batch_of(self, evidence: dict[Variable, torch.Tensor]) -> tuple[int, bool]:
        """``(N, batched)`` of a query: the graph's batch size, or the length of per-batch
        evidence (normalised by :meth:`evidence`); ``(1, False)`` when neither is batched.

        Raises FieldlibError when evidence tensors disagree on N.
        """
        sizes = {len(v) for v in evidence.values() if v.dim() == 1}
        if self.batch_size is not None:
            sizes.add(self.batch_size)
        if len(sizes) > 1:
            raise FieldlibError(f"evidence tensors disagree on the batch size: {sorted(sizes)}")
        return (sizes.pop(), True) if sizes else (1, False)

    def _check_evidence_batch(self, v: Variable, n: int) -> None:
        if self.batch_size is not None and self.batch_size != n:
            raise EvidenceError(
                f"evidence for {v.name!r} has {n} values; the graph's batch size is "
                f"{self.batch_size}"
            )

    # -- dense terms for exact engines ----------------------------------------------------
    def terms(self, max_elements: int | None = DEFAULT_MAX_DENSE_ELEMENTS) -> list[Term]:
        """Every factor as dense log-tables, padding masked out (see module docstring).

        Raises TooLargeError when a factor's dense tables exceed ``max_elements``.
        """
        out: list[Term] = []
        padded = self._padding()
        for f in self.factors:
            f._refuse_if_large(max_elements)
            for term in f.terms():
                out.append(self._mask_term(term, padded))
        out.extend(self._padding_clamps(padded))
        return out

    def _padding(self) -> dict:
        """``{array: (mask (N, T) on the device, [position t real in every element], its
        columns)}`` for the arrays made with ``lengths``: computed once per call of
        :meth:`terms`, so that a term is masked without a tensor operation per variable."""
        out = {}
        for a in self.arrays.values():
            if a.lengths is not None:
                mask = a.mask().to(self.device)
                out[a] = (mask, mask.all(0).tolist(), mask.t().unbind(0))
        return out

    def term_active(self, term: Term, padded: dict | None = None) -> torch.Tensor | None:
        """``BoolTensor (N,)``: whether every variable of ``term`` is real (not padding) per
        batch element; None when no variable of its scope is ever padded. A term that is
        not active is masked to zero and its factor marginal is zero."""
        active = None
        for v in term.variables:
            if padded is None:
                a = self.active(v)
            elif v.array in padded:
                a = padded[v.array][2][v.position]
            else:
                continue
            if a is not None:
                active = a if active is None else active & a
        return active

    def _mask_term(self, term: Term, padded: dict) -> Term:
        if all(v.array not in padded or padded[v.array][1][v.position]
               for v in term.variables):
            return term  # no variable of the term is padding in any element
        active = self.term_active(term, padded)
        shape = (-1,) + (1,) * len(term.variables)
        table = torch.where(active.view(shape), term.table, 0.0)
        return Term(term.variables, table, True, term.factor)

    def _padding_clamps(self, padded: dict) -> list[Term]:
        """A ``(N, d)`` table for each position that is padding in some element: 0 at state
        0, -inf at the others where it is padding (made for a whole array at once)."""
        clamps = []
        for a, (mask, real, _) in padded.items():
            where = [t for t, r in enumerate(real) if not r]
            if not where:
                continue
            pad = ~mask[:, where].t()                                         # (k, N)
            tables = torch.zeros(len(where), len(mask), a.cardinality, dtype=self.dtype,
                                 device=self.device)
            tables[..., 1:].masked_fill_(pad[..., None], float("-inf"))
            clamps.extend(Term((a[t],), table, True, None)
                          for t, table in zip(where, tables.unbind(0)))
        return clamps

    # -- views ----------------------------------------------------------------------------
    def to_networkx(self):
        """Bipartite ``networkx.Graph``: variable nodes (``kind='variable'``, cardinality)
        and factor nodes (``kind='factor'``, factor kind), an edge for each membership."""
        import networkx as nx

        g = nx.Graph()
        for v in self.variables.values():
            g.add_node(v.name, kind="variable", cardinality=v.cardinality)
        for i, f in enumerate(self.factors):
            node = f"{f.name}#{i}"
            g.add_node(node, kind="factor", factor=f.kind)
            for v in f.variables():
                g.add_edge(node, v.name)
        return g

    def draw(self, ax=None, seed: int = 0, path: str | None = None):
        """Draw the factor graph with matplotlib (circles: variables, squares: factors).

        Returns the Axes; with ``path`` the figure is also saved there.
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import networkx as nx

        g = self.to_networkx()
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 5))
        pos = nx.spring_layout(g, seed=seed)
        var_nodes = [n for n, d in g.nodes(data=True) if d["kind"] == "variable"]
        fac_nodes = [n for n, d in g.nodes(data=True) if d["kind"] == "factor"]
        nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.4)
        nx.draw_networkx_nodes(g, pos, nodelist=var_nodes, node_color="#9ecae1",
                               node_shape="o", ax=ax)
        nx.draw_networkx_nodes(g, pos, nodelist=fac_nodes, node_color="#fdae6b",
                               node_shape="s", node_size=120, ax=ax)
        nx.draw_networkx_labels(g, pos, labels={n: n for n in var_nodes}, font_size=8, ax=ax)
        ax.set_axis_off()
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax

    def __repr__(self) -> str:
        return (f"FactorGraph({len(self.variables)} variables, {len(self.factors)} factors"
                f"{', batch ' + str(self.batch_size) if self.batch_size else ''})")


def _map_labels(target, value):
    """Replace state labels (strings) in ``value`` by their states; other items pass."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        labels = target.domain.labels
        try:
            return target.domain.state(value)
        except KeyError:
            if labels is None or not any(isinstance(x, str) for x in labels):
                raise EvidenceError(
                    f"evidence {target.name}={value!r}: a string names a state label, and "
                    f"{target.name!r} has no labels; give an integer state "
                    f"0..{target.cardinality - 1}"
                ) from None
            raise EvidenceError(
                f"evidence {target.name}={value!r}: not a state label of {target.name!r}; "
                f"its labels are {_preview(labels)}"
            ) from None
    if getattr(getattr(value, "dtype", None), "kind", None) in ("U", "S", "O") \
            and hasattr(value, "tolist"):
        value = value.tolist()  # a numpy array of strings (or objects)
    if isinstance(value, list | tuple):
        return [_map_labels(target, x) for x in value]
    return value


def _beyond_int64(value):
    """The first Python int in ``value`` (nested lists) outside int64, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if not -(2**63) <= value < 2**63 else None
    if isinstance(value, list | tuple):
        for x in value:
            big = _beyond_int64(x)
            if big is not None:
                return big
    return None


def _is_bool_mask(x) -> bool:
    """Whether ``x`` is a boolean tensor or numpy array (the mask of ``(states, mask)``)."""
    dtype = getattr(x, "dtype", None)
    return dtype == torch.bool or getattr(dtype, "kind", None) == "b"


def _merge_evidence(v: Variable, old: torch.Tensor, new: torch.Tensor, first: str,
                    second: str) -> torch.Tensor:
    """One variable's values given twice (e.g. by ``"x"`` and ``"x[1]"``): where both
    observe it they must agree; the result observes it where either does.

    Raises EvidenceError naming both sources when they disagree."""
    try:
        a, b = torch.broadcast_tensors(old, new)
        same = bool(((a == b) | (a < 0) | (b < 0)).all())
    except RuntimeError:
        same = False
    if not same:
        by = f"by {first!r} and by {second!r}" if first != second else f"twice by {first!r}"
        raise EvidenceError(
            f"conflicting evidence for {v.name!r}: given {by} with different values "
            f"({old.tolist()} and {new.tolist()})"
        )
    return torch.where(a >= 0, a, b)


def _preview(names, k: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more
