"""Turn a FactorGraph plus evidence into labelled log-tables, and results back into names.

Shared by the exact engines: evidence is applied by slicing every table at the observed
state (per batch element), every remaining table gets a leading batch axis, and each free
variable gets a zero "probe" table whose gradient is its marginal (log Z's gradient with
respect to a log-potential is the marginal of its scope: torch-struct's trick).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fieldlib.errors import FieldlibError, TooLargeError, ZeroProbabilityError
from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS, Term
from fieldlib.variables import Variable

from .base import Result
from .contract import BATCH
from .scaled import table_ranges

__all__ = ["Prepared", "prepare", "finish", "compute_dtype", "check_range"]


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
    #: variables observed in some batch elements only: ``{Variable: (N,)}``, -1 where
    #: unobserved. They stay free; a clamp operand (0 at the observed state, -inf at the
    #: others, all 0 where unobserved) follows the probes.
    partial: dict = field(default_factory=dict)


def _take(table: torch.Tensor, axis: int, state: torch.Tensor) -> torch.Tensor:
    """``table`` (N, ...) at ``state`` (N,) along ``axis`` (>= 1), axis removed."""
    shape = list(table.shape)
    shape[axis] = 1
    view = [len(state)] + [1] * (table.dim() - 1)
    index = state.view(view).expand(shape)
    return table.gather(axis, index).squeeze(axis)


def prepare(graph, evidence=None, *, probes: bool = True, factor_marginals: bool = False,
            max_dense: int | None = DEFAULT_MAX_DENSE_ELEMENTS,
            dtype: torch.dtype | None = None, max_probe_elements: float = math.inf,
            engine: str = "this engine") -> Prepared:
    """Labelled operands for ``graph`` under ``evidence`` (see module docstring).

    ``max_probe_elements`` bounds the per-variable tables this function allocates itself
    (probes, and zero tables for variables no factor covers): above it, TooLargeError is
    raised before any of them is allocated (a file may declare a variable of 3e9 states)."""
    if not graph.variables:
        raise FieldlibError("the graph has no variables")
    ev = graph.evidence(evidence)
    batch, batched = graph.batch_of(ev)
    dtype = compute_dtype(dtype or graph.dtype)
    device = graph.device
    free_vars = [v for v in graph.variables.values()
                 if v not in ev or bool((ev[v] < 0).any())]  # partial evidence: free
    widest = max(free_vars, key=lambda v: v.cardinality, default=None)
    own = batch * sum(v.cardinality for v in free_vars)
    if own > max_probe_elements:
        raise TooLargeError(
            f"{engine} would allocate {own:,} elements of per-variable tables (variable "
            f"{widest.name!r} alone has {widest.cardinality:,} states x batch {batch}), above "
            f"its limit of {int(max_probe_elements):,}"
        )
    ev = {v: (s.expand(batch) if s.dim() == 0 else s).to(device) for v, s in ev.items()}
    partial = {v: s for v, s in ev.items() if bool((s < 0).any())}
    ev = {v: s for v, s in ev.items() if v not in partial}

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
    check_range(operands, terms, dtype)

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
    for v, s in partial.items():  # observed in some elements: clamped there, free elsewhere
        clamp = torch.zeros(batch, v.cardinality, dtype=dtype, device=device)
        clamp.masked_fill_((s >= 0)[:, None], float("-inf"))
        seen = (s >= 0).nonzero().flatten()
        clamp[seen, s[seen]] = 0.0
        operands.append(clamp)
        labels.append((BATCH, graph.index(v)))
    if not operands:  # every variable observed and no factor: log Z is log 1 = 0
        operands.append(torch.zeros(batch, dtype=dtype, device=device))
        labels.append((BATCH,))
    cards = {graph.index(v): v.cardinality for v in free}
    cards[BATCH] = batch
    return Prepared(graph, batch, batched, free, ev, operands, labels, probe_tables, terms,
                    term_probes, cards, dtype, device, partial)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype exact engines compute in: float16 and bfloat16 tables are upcast to
    float32 (their 5-8 bit exponents or mantissas cannot hold a log-sum-exp exactly);
    results then come back in float32 and ``Result.info["compute_dtype"]`` says so."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_range(operands, terms, dtype: torch.dtype) -> None:
    """Refuse a model whose scores could leave the dtype's range.

    Every configuration's score, and every partial sum an engine forms, is bounded by
    Σ_f max|finite φ_f| plus log(number of joint states) (each log-sum-exp adds at most the
    log of its term count). When that bound exceeds the dtype's largest number, a sum could
    overflow to inf, and inf - inf is NaN: raise a FieldlibError instead. Below it, every
    value the engines form is finite, so log Z is exact to rounding.
    """
    if not operands:
        return
    big = table_ranges(operands)  # per chunk of same-shape tables, not one by one
    bound = float(big.sum())
    states = sum(math.log(max(d, 1)) for t in operands for d in t.shape[1:])
    limit = torch.finfo(dtype).max
    if not bound + states < limit:
        k = int(big.argmax())
        name = terms[k].factor.name if k < len(terms) and terms[k].factor is not None \
            else f"term {k}"
        raise FieldlibError(
            f"the log-potentials are too large for the range of {str(dtype).split('.')[-1]}: "
            f"the sum of the factors' largest magnitudes is {bound:.3g} (largest: "
            f"{float(big[k]):.3g} in {name!r}), above the dtype's maximum {limit:.3g}, so "
            f"scores could overflow; rescale the potentials or use a wider dtype"
        )


def check_finite(prep: Prepared, log_z: torch.Tensor) -> None:
    """Raise ZeroProbabilityError when log Z is -inf for some batch element."""
    value = log_z.detach()
    broken = torch.isnan(value) | torch.isposinf(value)
    if bool(broken.any()):  # cannot happen below check_range's bound; never return it
        raise FieldlibError(f"log Z is {float(value[broken.nonzero()[0]])} in "
                            f"{str(value.dtype).removeprefix('torch.')}: the scores overflow "
                            f"the dtype's range; rescale the potentials")
    bad = torch.isneginf(value)
    if bool(bad.any()):
        which = "" if not prep.batched else f" (batch element {int(bad.nonzero()[0, 0])})"
        if prep.evidence or prep.partial:
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
                if v in prep.partial:  # exactly one-hot where observed
                    s = prep.partial[v]
                    hot = torch.nn.functional.one_hot(s.clamp(min=0), v.cardinality)
                    m = torch.where((s >= 0)[:, None], hot.to(m.dtype), m)
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
            active = graph.term_active(term)  # a term touching padding has no marginal
            if active is not None:
                g = g * active.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
            factor_marginals.setdefault(term.factor.name, []).append(squeeze(g))
    mapping = None
    if assignment is not None:
        mapping = {}
        for v in graph.variables.values():
            value = prep.evidence[v] if v in prep.evidence else assignment[v]
            if v in prep.partial:
                value = torch.where(prep.partial[v] >= 0, prep.partial[v], value)
            active = graph.active(v)
            if active is not None:
                value = torch.where(active, value, torch.full_like(value, -1))
            mapping[v.name] = value
        for a in graph.arrays.values():
            mapping[a.name] = torch.stack([mapping[v.name] for v in a], dim=1)
        mapping = {k: squeeze(m) for k, m in mapping.items()}
    return Result(engine=engine, log_z=squeeze(log_z), marginals=marginals,
                  factor_marginals=factor_marginals, map=mapping, map_score=squeeze(map_score),
                  info={"compute_dtype": str(prep.dtype).removeprefix("torch."), **(info or {})})
