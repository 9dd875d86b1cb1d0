"""Turn a FactorGraph plus evidence into labelled log-tables, and results back into names.

Shared by the exact engines: evidence is applied by slicing every table at the observed
state (per batch element), every remaining table gets a leading batch axis, and each free
variable gets a zero "probe" table whose gradient is its marginal (log Z's gradient with
respect to a log-potential is the marginal of its scope: torch-struct's trick).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldlib.errors import FieldlibError, ZeroProbabilityError
from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS, Term
from fieldlib.variables import Variable

from .base import Result
from .contract import BATCH

__all__ = ["Prepared", "prepare", "finish"]


@dataclass
class Prepared:
    """Labelled operands of one exact query.

    Attributes:
        batch: N (1 for an unbatched graph); ``batched`` says whether to keep the axis.
        free: variables not observed, in graph order.
        operands, labels: log-tables ``(N, d...)`` and their label tuples (BATCH first).
        probes: ``{Variable: zeros (N, d)}`` (requires grad when marginals are wanted).
        terms: the graph's dense terms (padding clamps included).
        term_probes: zero tables added to each factor term when factor marginals are wanted.
        cards: label -> size (BATCH -> N).
    """

    graph: object
    batch: int
    batched: bool
    free: list[Variable]
    evidence: dict[Variable, torch.Tensor]
    operands: list[torch.Tensor]
    labels: list[tuple[int, ...]]
    probes: dict[Variable, torch.Tensor]
    terms: list[Term]
    term_probes: list[torch.Tensor]
    cards: dict[int, int]
    dtype: torch.dtype
    device: torch.device


def _take(table: torch.Tensor, axis: int, state: torch.Tensor) -> torch.Tensor:
    """``table`` (N, ...) at ``state`` (N,) along ``axis`` (>= 1), axis removed."""
    shape = list(table.shape)
    shape[axis] = 1
    view = [len(state)] + [1] * (table.dim() - 1)
    index = state.view(view).expand(shape)
    return table.gather(axis, index).squeeze(axis)


def prepare(graph, evidence=None, *, probes: bool = True, factor_marginals: bool = False,
            max_dense: int | None = DEFAULT_MAX_DENSE_ELEMENTS,
            dtype: torch.dtype | None = None) -> Prepared:
    """Labelled operands for ``graph`` under ``evidence`` (see module docstring)."""
    if not graph.variables:
        raise FieldlibError("the graph has no variables")
    ev = graph.evidence(evidence)
    batch, batched = graph.batch_of(ev)
    dtype = dtype or graph.dtype
    device = graph.device
    ev = {v: (s.expand(batch) if s.dim() == 0 else s).to(device) for v, s in ev.items()}

    terms = graph.terms(max_dense)
    operands, labels, term_probes = [], [], []
    for term in terms:
        table = term.table.to(dtype)
        if not term.batched:
            table = table.expand(batch, *table.shape)
        if factor_marginals and term.factor is not None:
            # a zero added to the table: its gradient is the per-batch scope marginal
            probe = torch.zeros(table.shape, dtype=dtype, device=device, requires_grad=True)
            table = table + probe
            term_probes.append(probe)
        scope = list(term.variables)
        for axis in reversed(range(len(scope))):
            if scope[axis] in ev:
                table = _take(table, axis + 1, ev[scope[axis]])
                scope.pop(axis)
        operands.append(table)
        labels.append((BATCH, *(graph.index(v) for v in scope)))

    free = [v for v in graph.variables.values() if v not in ev]
    covered = {x for lab in labels for x in lab}
    probe_tables = {}
    for v in free:
        if probes or graph.index(v) not in covered:
            z = torch.zeros(batch, v.cardinality, dtype=dtype, device=device)
            if probes:
                z.requires_grad_(True)
                probe_tables[v] = z
            operands.append(z)
            labels.append((BATCH, graph.index(v)))
    cards = {graph.index(v): v.cardinality for v in free}
    cards[BATCH] = batch
    return Prepared(graph, batch, batched, free, ev, operands, labels, probe_tables, terms,
                    term_probes, cards, dtype, device)


def check_finite(prep: Prepared, log_z: torch.Tensor) -> None:
    """Raise ZeroProbabilityError when log Z is -inf for some batch element."""
    bad = torch.isneginf(log_z.detach())
    if bool(bad.any()):
        which = "" if not prep.batched else f" (batch element {int(bad.nonzero()[0, 0])})"
        if prep.evidence:
            raise ZeroProbabilityError(f"the evidence has probability zero{which}")
        raise ZeroProbabilityError(f"the model gives every configuration probability zero{which}")


def finish(prep: Prepared, engine: str, log_z=None, var_marginals=None, factor_grads=None,
           assignment=None, map_score=None, info=None) -> Result:
    """Assemble a Result keyed by names: observed variables get one-hot marginals, arrays
    get stacked entries, padded positions zero rows (marginals) and -1 (MAP)."""
    graph = prep.graph

    def squeeze(t):
        return t if t is None or prep.batched else t[0]

    marginals = None
    if var_marginals is not None:
        marginals = {}
        for v in graph.variables.values():
            if v in prep.evidence:
                m = torch.nn.functional.one_hot(prep.evidence[v], v.cardinality).to(prep.dtype)
            else:
                m = var_marginals[v]
            active = graph.active(v)
            if active is not None:
                m = m * active.to(m.dtype)[:, None]
            marginals[v.name] = m
        for a in graph.arrays.values():
            marginals[a.name] = torch.stack([marginals[v.name] for v in a], dim=1)
        marginals = {k: squeeze(m) for k, m in marginals.items()}
    factor_marginals = None
    if factor_grads is not None:
        factor_marginals = {}
        factor_terms = [t for t in prep.terms if t.factor is not None]
        for term, g in zip(factor_terms, factor_grads):
            factor_marginals.setdefault(term.factor.name, []).append(squeeze(g))
    mapping = None
    if assignment is not None:
        mapping = {}
        for v in graph.variables.values():
            value = prep.evidence[v] if v in prep.evidence else assignment[v]
            active = graph.active(v)
            if active is not None:
                value = torch.where(active, value, torch.full_like(value, -1))
            mapping[v.name] = value
        for a in graph.arrays.values():
            mapping[a.name] = torch.stack([mapping[v.name] for v in a], dim=1)
        mapping = {k: squeeze(m) for k, m in mapping.items()}
    return Result(engine=engine, log_z=squeeze(log_z), marginals=marginals,
                  factor_marginals=factor_marginals, map=mapping, map_score=squeeze(map_score),
                  info=info or {})
