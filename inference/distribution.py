"""The field as a ``torch.distributions.Distribution``: :class:`FieldDistribution`.

``FieldDistribution(graph, evidence, engine="exact")`` is the distribution the graph
defines over its variables, P(x | evidence) = exp(score(x)) / Z(evidence), as a pyro
``TorchDistribution`` (a subclass of ``torch.distributions.Distribution``), so it validates
as torch expects and ``pyro.sample`` takes it, as a likelihood (``obs=``) or a latent site.

Shapes: ``batch_shape`` is ``(N,)`` for a batched graph (or batched evidence), ``()``
otherwise; ``event_shape`` is ``(V,)``, one integer state per variable of ``variables``
(default: every variable of the graph, in graph order; an array contributes its positions
in order). A value is a LongTensor ``(*sample_shape, *batch_shape, V)`` or a dict of
states keyed by variables / arrays / names. Padded positions read -1 in samples and MAP
(as :class:`~.base.Result` gives them); ``log_prob`` accepts -1 or 0 there.

What each engine gives, stated by the ``*_kind`` attributes (never mixed silently):

================  =====================================  ==================================
query             exact engines (exact, bruteforce)      approximate engines (meanfield...)
================  =====================================  ==================================
log_partition     log Z (exact)                          the ELBO, a lower bound on log Z
log_prob(x)       log P(x) exact; a partial assignment   score(x) - ELBO, an UPPER bound on
                  gives its marginal log-probability     log P(x) (equal iff Q = P)
sample            exact draws (FFBS, :mod:`.sampling`)   draws from Q, the product of the
                                                         engine's marginals
entropy, mode     H(P); the joint MAP                    H(Q); the mode of Q
marginals         exact                                  Q's
kl_divergence     exact, between two exact fields        refused
================  =====================================  ==================================

Log space throughout: a configuration with a ``-inf`` potential has log_prob ``-inf`` (never
NaN) and is never sampled; impossible evidence raises ZeroProbabilityError ("the evidence
has probability zero") when the distribution is first queried.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from pyro.distributions.torch import Categorical
from pyro.distributions.torch_distribution import ExpandedDistribution, TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from fieldlib.errors import (
    FieldlibError,
    ShapeError,
    TooLargeError,
    UnsupportedQueryError,
)
from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS
from fieldlib.variables import Variable, VariableArray

from .base import Engine, get_engine
from .contract import BATCH, FIXED_OVERHEAD, contract_path
from .exact import BruteForce, VariableElimination, available_memory
from .prepare import check_finite, prepare
from .sampling import backward_sample, forward, gumbel_argmax, sampling_elements

__all__ = ["FieldDistribution", "ApproximateFieldWarning", "log_potential"]

_NO_SHAPE = torch.Size()


class ApproximateFieldWarning(UserWarning):
    """A FieldDistribution over an approximate engine answered with its approximation (Q,
    a bound): said once per distribution and query."""


class _LogPotential(constraints.Constraint):
    """A log-potential: any real number or ``-inf`` (an impossible state); not NaN, not
    ``+inf``."""

    def check(self, value):
        return ~(torch.isnan(value) | torch.isposinf(value))

    def __repr__(self):
        return "log_potential"


#: the constraint on every entry of a field's potentials
log_potential = _LogPotential()


class _FieldSupport(constraints.Constraint):
    """Integer states ``0 .. d_k - 1`` per event entry k, and -1 where it is padding (as
    a Categorical's support holds its zero-probability categories, a padded entry's
    states 1.. are in the support with probability zero; 0 and -1 both mean padding)."""

    is_discrete = True
    event_dim = 1

    def __init__(self, cards: torch.Tensor, padded: torch.Tensor | None):
        self.cards, self.padded = cards, padded
        super().__init__()

    def check(self, value):
        ok = (value >= 0) & (value < self.cards)
        if self.padded is not None:
            ok = ok | (self.padded & (value == -1))
        return ok.all(-1)

    def __repr__(self):
        return f"field_support(cards={self.cards.tolist()})"


def _take(table: torch.Tensor, axis: int, state: torch.Tensor) -> torch.Tensor:
    """``table (M, ...)`` at ``state (M,)`` along ``axis`` (>= 1), the axis removed."""
    shape = list(table.shape)
    shape[axis] = 1
    index = state.view([len(state)] + [1] * (table.dim() - 1)).expand(shape)
    return table.gather(axis, index).squeeze(axis)


def _expectation(marginal: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(N,)`` Σ marginal · table, 0 · (-inf) = 0, and -inf where the marginal puts mass on
    a -inf entry (no NaN in value or gradient)."""
    dims = tuple(range(1, marginal.dim()))
    bad = ~torch.isfinite(table)
    finite = table.masked_fill(bad, 0.0)
    value = (marginal * finite).sum(dims) if dims else marginal * finite
    hit = ((marginal > 0) & bad).expand(marginal.shape)
    hit = hit.flatten(1).any(-1) if dims else hit
    return value.masked_fill(hit, float("-inf"))


def _states(target, value, device) -> torch.Tensor:
    """A dict entry's states as a LongTensor (state labels of a labelled domain mapped)."""
    def mapped(x):
        if isinstance(x, str):
            return target.domain.state(x)
        if isinstance(x, list | tuple):
            return [mapped(y) for y in x]
        return x

    try:
        return torch.as_tensor(mapped(value), device=device).long()
    except KeyError as exc:
        raise FieldlibError(f"{exc.args[0]!r} is not a state label of {target.name!r}") from None


class FieldDistribution(TorchDistribution):
    """The distribution a factor graph defines, P(x | evidence), as a torch / pyro
    distribution (module docstring: shapes, and what each engine gives).

    Args:
        graph: the FactorGraph (its tensors are the distribution's parameters: build a new
            distribution after changing them, as with any torch distribution).
        evidence: observed states (as an engine takes them); the distribution is the
            conditional over the rest, and its samples carry the evidence.
        engine: an Engine or a spec string (``"exact"``, ``"bruteforce"``,
            ``"meanfield[schedule=synchronous]"``, ...). Exact engines give exact answers;
            any other engine that gives marginals gives its approximation, said by
            :attr:`exact` and the ``*_kind`` attributes, with an ApproximateFieldWarning.
        variables: what the event is over: Variables, VariableArrays or names (default:
            every variable). The others are latent: summed out of ``log_prob`` (the
            marginal likelihood of labelled frames with a latent intent) and dropped from
            samples. Exact engines only.
        max_support: the most joint states :meth:`enumerate_support` lists.
        validate_args: torch's argument validation (default: torch's default).

    Raises:
        UnsupportedQueryError: an engine that gives no marginals, or latent variables with
            an approximate engine (it bounds no marginal probability).
        EvidenceError, UnknownVariableError: bad evidence or variables.
    """

    arg_constraints = {"log_potentials": log_potential}
    has_enumerate_support = True
    has_rsample = False

    def __init__(self, graph, evidence=None, *, engine: Engine | str = "exact",
                 variables=None, max_support: int = 2**16, validate_args: bool | None = None):
        self.graph = graph
        self.engine = get_engine(engine) if isinstance(engine, str) else engine
        self.exact = isinstance(self.engine, VariableElimination | BruteForce) or \
            bool(getattr(self.engine, "exact", False))
        if not self.exact and "marginals" not in self.engine.supports:
            raise UnsupportedQueryError(
                f"FieldDistribution needs an exact engine or one that gives marginals; "
                f"{self.engine.name!r} supports {', '.join(sorted(self.engine.supports))}")
        self.evidence = graph.evidence(evidence) if graph.variables else {}
        n, batched = graph.batch_of(self.evidence)
        self._n, self._batched = n, batched
        self.variables = self._resolve(variables)
        self.max_support = int(max_support)
        index = {v: graph.index(v) for v in graph.variables.values()}
        self._cols = torch.tensor([index[v] for v in self.variables], dtype=torch.long,
                                  device=graph.device)
        self._latent = [v for v in graph.variables.values()
                        if not self._fixed(v) and v not in set(self.variables)]
        if self._latent and not self.exact:
            raise UnsupportedQueryError(
                f"latent variables ({self._latent[0].name!r}, ...) need an exact engine: "
                f"{self.engine.name!r} bounds log Z, not a marginal probability")
        self._warned: set[str] = set()
        batch_shape = torch.Size([n]) if batched else torch.Size()
        validate = validate_args if validate_args is not None else \
            torch.distributions.Distribution._validate_args
        if validate:
            self.log_potentials  # noqa: B018 - computed now so torch validates it
        super().__init__(batch_shape, torch.Size([len(self.variables)]),
                         validate_args=validate_args)

    # -- what the distribution is over ----------------------------------------------------
    def _fixed(self, v: Variable) -> bool:
        """Whether ``v`` is observed in every batch element (evidence may mark some
        elements unobserved with -1)."""
        return v in self.evidence and bool((self.evidence[v] >= 0).all())

    def _resolve(self, variables) -> list[Variable]:
        graph = self.graph
        if variables is None:
            return list(graph.variables.values())
        if isinstance(variables, str | Variable | VariableArray) or \
                not isinstance(variables, Iterable):
            variables = [variables]
        out: list[Variable] = []
        for item in variables:
            target = graph.resolve(item)
            for v in (target.variables if isinstance(target, VariableArray) else [target]):
                if v in out:
                    raise FieldlibError(f"variables names {v.name!r} twice")
                out.append(v)
        if not out:
            raise FieldlibError("variables is empty")
        return out

    @lazy_property
    def log_potentials(self) -> torch.Tensor:
        """Every potential entry of the graph, flattened (detached): what ``arg_constraints``
        validates (``log_potential``: real or -inf)."""
        parts = [p.detach().reshape(-1) for f in self.graph.factors
                 for p in f.parameters().values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.graph.dtype)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        cards = torch.tensor([v.cardinality for v in self.variables], device=self.graph.device)
        return _FieldSupport(cards, self._padded())

    def _padded(self) -> torch.Tensor | None:
        """``BoolTensor (N, V)``: event entries that are padding; None when none is."""
        cols = [self.graph.active(v) for v in self.variables]
        if all(a is None for a in cols):
            return None
        full = torch.ones(self._n, dtype=torch.bool, device=self.graph.device)
        return ~torch.stack([full if a is None else a for a in cols], -1)

    @property
    def log_partition_kind(self) -> str:
        if self.exact:
            return "exact"
        return "lower bound (ELBO)" if self._approx.log_z is None else \
            f"approximate ({self.engine.name}): not a bound"

    @property
    def log_prob_kind(self) -> str:
        if self.exact:
            return "exact"
        if self._approx.log_z is None:
            return "upper bound: score(x) - ELBO >= log P(x)"
        return f"approximate ({self.engine.name}): score(x) - its log Z, not a bound"

    @property
    def sample_kind(self) -> str:
        return "exact" if self.exact else \
            f"approximate: draws from the product of the {self.engine.name} marginals (Q)"

    def _say(self, query: str, what: str) -> None:
        if not self.exact and query not in self._warned:
            self._warned.add(query)
            warnings.warn(f"FieldDistribution(engine={self.engine.name!r}).{query}: {what}",
                          ApproximateFieldWarning, stacklevel=3)

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` -> ``batch_shape + (...)``."""
        return t if self._batched else t[0]

    # -- engine answers -------------------------------------------------------------------
    @lazy_property
    def _approx(self):
        return self.engine(self.graph, self.evidence, marginals=True)

    @lazy_property
    def log_partition(self) -> torch.Tensor:
        """``batch_shape``: log Z(evidence) (exact engines; differentiable), or the
        approximate engine's figure (:attr:`log_partition_kind`: the ELBO for mean-field)."""
        if self.exact:
            return self.engine(self.graph, self.evidence, marginals=False).log_z
        r = self._approx
        return r.log_z if r.log_z is not None else r.elbo

    @lazy_property
    def marginals(self) -> dict[str, torch.Tensor]:
        """``{name: ([N,] d)}`` for every variable and ``{array: ([N,] T, d)}`` (padding rows
        zero), as :class:`~.base.Result` gives them: exact, or the approximation's."""
        if self.exact:
            return self.engine(self.graph, self.evidence, marginals=True).marginals
        return self._approx.marginals

    @property
    def mode(self) -> torch.Tensor:
        """``batch_shape + event_shape``: the MAP assignment (exact engines: the joint
        maximiser; approximate: the mode of Q, each variable's most probable state)."""
        self._no_latent("mode")
        if self.exact:
            found = self.engine(self.graph, self.evidence, marginals=False, map=True).map
            return torch.stack([found[v.name] for v in self.variables], -1)
        self._say("mode", "the mode of Q (each variable's most probable state)")
        m = self.marginals
        out = torch.stack([m[v.name].argmax(-1) for v in self.variables], -1)
        padded = self._padded()
        return out if padded is None else out.masked_fill(self._squeeze(padded), -1)

    @property
    def argmax(self) -> torch.Tensor:
        """Alias of :attr:`mode` (torch-struct's name)."""
        return self.mode

    def _no_latent(self, query: str) -> None:
        if self._latent:
            raise UnsupportedQueryError(
                f"{query} of a marginal over some variables (latent: "
                f"{self._latent[0].name!r}, ...) is not available: build the "
                f"FieldDistribution over every variable")

    # -- log_prob -------------------------------------------------------------------------
    def log_prob(self, value) -> torch.Tensor:
        """``sample_shape + batch_shape``: log P(value | evidence) (see :attr:`log_prob_kind`).

        ``value``: a LongTensor ``(..., V)`` over :attr:`variables`, or a dict of states
        (arrays ``(..., T)``, variables ``(...)``). An assignment of fewer variables (a
        dict naming a subset, or a distribution with latent variables) gives the marginal
        log-probability of those states (exact engines). Impossible assignments (a -inf
        potential, disagreeing with the evidence, a state outside the support) give -inf;
        with validation on, a state outside the support raises ValueError instead.
        """
        checked = False
        if isinstance(value, Mapping):
            variables, value = self._from_dict(value)
            checked = bool(self._validate_args)
        else:
            variables = self.variables
            value = torch.as_tensor(value, device=self.graph.device)
            if self._validate_args:
                self._validate_sample(value)
        self._say("log_prob", self.log_prob_kind)
        return self._log_prob_over(variables, value, checked)

    def _from_dict(self, value: Mapping):
        graph = self.graph
        columns: dict[Variable, torch.Tensor] = {}
        for key, states in value.items():
            target = graph.resolve(key)
            t = _states(target, states, graph.device)
            if isinstance(target, VariableArray):
                if t.shape[-1:] != (target.size,):
                    raise ShapeError(f"{target.name!r} takes states (..., {target.size}), got "
                                     f"{tuple(t.shape)}")
                pairs = [(v, t[..., k]) for k, v in enumerate(target)]
            else:
                pairs = [(target, t)]
            for v, col in pairs:
                if v in columns:
                    raise FieldlibError(f"{v.name!r} is given twice")
                columns[v] = col
        unknown = [v for v in columns if v not in set(self.variables)]
        if unknown:
            raise FieldlibError(f"{unknown[0].name!r} is not among this distribution's "
                                f"variables")
        variables = [v for v in self.variables if v in columns]
        cols = torch.broadcast_tensors(*(columns[v] for v in variables))
        return variables, torch.stack(cols, -1)

    def _log_prob_over(self, variables, value: torch.Tensor, checked=False) -> torch.Tensor:
        graph, n = self.graph, self._n
        k = len(variables)
        if value.shape[-1:] != (k,):
            raise ShapeError(f"a value over {k} variables must end in ({k},), got "
                             f"{tuple(value.shape)}")
        batch = tuple(self.batch_shape)
        shape = torch.broadcast_shapes(tuple(value.shape[:-1]), batch)
        sample_shape = shape[: len(shape) - len(batch)]
        x = value.long().expand(shape + (k,)).reshape(-1, n, k)
        valid, in_support, x = self._clean(variables, x)
        if checked and not bool(in_support.all()):
            raise ValueError(f"a value outside the support of {self!r} (states 0..d-1, -1 "
                             f"on padding)")
        free = {v for v in graph.variables.values() if not self._fixed(v)}
        if free <= set(variables):
            lp = self._score(variables, x) - self.log_partition
        else:
            if not self.exact:
                raise UnsupportedQueryError(
                    f"a marginal log-probability needs an exact engine; "
                    f"{self.engine.name!r} bounds no marginal")
            lp = self._clamped_log_z(variables, x) - self.log_partition
        lp = lp.masked_fill(~valid, float("-inf"))
        return lp.reshape(sample_shape + batch)

    def _clean(self, variables, x):
        """``(valid (M, N), in_support (M, N), x)``: whether each assignment has positive
        probability as far as its values go (in range, 0 or -1 on padding, agreeing with
        the evidence), whether it is in the support, and x with padding set to its clamp 0
        (entries outside the support also 0)."""
        graph = self.graph
        cards = torch.tensor([v.cardinality for v in variables], device=x.device)
        ok = (x >= 0) & (x < cards)
        active = [graph.active(v) for v in variables]
        valid = None
        if any(a is not None for a in active):
            full = torch.ones(self._n, dtype=torch.bool, device=x.device)
            pad = ~torch.stack([full if a is None else a for a in active], -1)   # (N, k)
            ok = ok | (pad & (x == -1))
            valid = ~(pad & (x > 0)).any(-1)     # padding is its clamp: 0 (or -1) only
            x = x.masked_fill(pad.expand_as(x), 0)
        in_support = ok.all(-1)
        valid = in_support if valid is None else in_support & valid
        for j, v in enumerate(variables):
            if v in self.evidence:                      # -1: unobserved in that element
                ev = self.evidence[v].to(x.device)
                valid = valid & ((ev < 0) | (x[..., j] == ev))
        return valid, in_support, x.masked_fill(~ok, 0)

    def _full(self, variables, x) -> torch.Tensor:
        """``(M, N, V_graph)``: x over ``variables`` with the evidence filled in."""
        graph = self.graph
        m, n, _ = x.shape
        full = x.new_zeros(m, n, len(graph.variables))
        for v, s in self.evidence.items():
            full[..., graph.index(v)] = s
        idx = torch.tensor([graph.index(v) for v in variables], device=x.device)
        full[..., idx] = x
        return full

    @lazy_property
    def _term_groups(self):
        """The graph's dense terms stacked by shape: ``[(tables (N|1, G, D), columns (G, k),
        strides (k,))]``, so a score is one gather per group."""
        graph = self.graph
        groups: dict = {}
        for term in graph.terms(self._ve.max_dense or DEFAULT_MAX_DENSE_ELEMENTS):
            shape = tuple(term.table.shape[1:] if term.batched else term.table.shape)
            groups.setdefault((shape, term.batched), []).append(term)
        out = []
        for (shape, batched), terms in groups.items():
            tables = torch.stack([t.table for t in terms], 1 if batched else 0)
            tables = tables.reshape(tables.shape[0], len(terms), -1) if batched else \
                tables.reshape(1, len(terms), -1)
            cols = torch.tensor([[graph.index(v) for v in t.variables] for t in terms],
                                dtype=torch.long, device=graph.device).reshape(len(terms), -1)
            strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
            out.append((tables, cols, torch.tensor(strides, dtype=torch.long,
                                                   device=graph.device)))
        return out

    def _score(self, variables, x) -> torch.Tensor:
        """``(M, N)`` score(x) = Σ_f log φ_f(x) of full assignments (padding masked)."""
        full = self._full(variables, x)
        m, n, _ = full.shape
        total = None
        for tables, cols, strides in self._term_groups:
            flat = (full[..., cols] * strides).sum(-1)                  # (M, N, G)
            t = tables.expand(n, *tables.shape[1:]).unsqueeze(0)
            s = t.expand(m, *t.shape[1:]).gather(-1, flat.unsqueeze(-1)).squeeze(-1).sum(-1)
            total = s if total is None else total + s
        if total is None:
            total = torch.zeros(m, n, dtype=self.graph.dtype, device=self.graph.device)
        return total

    # -- exact contractions beyond the engine's own -----------------------------------
    @lazy_property
    def _ve(self) -> VariableElimination:
        return self.engine if isinstance(self.engine, VariableElimination) else \
            VariableElimination()

    def _prepare(self, **kwargs):
        ve = self._ve
        extra = {} if ve.max_dense is None else {"max_dense": ve.max_dense}
        return prepare(self.graph, self.evidence, probes=False, **extra, **kwargs)

    def _plan(self, labels, cards, dtype, what: str, map_pass: bool = False,
              extra=None):
        """The exact engine's plan for operands with ``labels``, refused (TooLargeError
        naming the bytes) when it cannot fit the engine's memory budget: its peak (the MAP
        pass's with ``map_pass``) plus ``extra(plan)`` elements."""
        ve = self._ve
        free = [x for x in cards if x != BATCH]
        plan, cost, _ = ve.plan(labels, cards, free)
        itemsize = torch.empty((), dtype=dtype).element_size()
        more = extra(plan) if extra is not None else 0
        need = ((cost.map_peak if map_pass else cost.peak) + more) * itemsize + FIXED_OVERHEAD
        budget = ve.memory_budget
        if budget is None:
            budget = available_memory(self.graph.device) // 2
        if need > budget:
            raise TooLargeError(
                f"{what} would need about {need:,} bytes ({need / 2**30:.2f} GiB) but the "
                f"memory budget is {budget:,} bytes; use fewer samples or raise memory_budget")
        return plan

    def _clamped_log_z(self, variables, x) -> torch.Tensor:
        """``(M, N)`` log Σ_latent exp score(x, latent): the free variables of ``variables``
        clamped at x (per assignment and batch element), in one contraction."""
        graph = self.graph
        prep = self._prepare()
        m, n, _ = x.shape
        where = {graph.index(v): j for j, v in enumerate(variables)
                 if graph.index(v) in prep.cards}            # still a label: clamp it
        xs = x.permute(2, 0, 1).reshape(x.shape[2], m * n)              # (k, M*N)
        ops, labels = [], []
        for t, lab in zip(prep.operands, prep.labels):
            t = t.unsqueeze(0).expand(m, *t.shape).reshape(m * n, *t.shape[1:])
            lab = list(lab)
            for axis in reversed(range(1, len(lab))):
                if lab[axis] in where:
                    t = _take(t, axis, xs[where[lab[axis]]])
                    lab.pop(axis)
            ops.append(t)
            labels.append(tuple(lab))
        cards = {x_: c for x_, c in prep.cards.items() if x_ not in where}
        cards[BATCH] = m * n
        plan = self._plan(labels, cards, prep.dtype, "the marginal log-probability")
        log_z, _ = contract_path(ops, plan, "sum")
        return log_z.reshape(m, n)

    def _expected_scores(self, extra=()):
        """``(log Z (N,), E_P[score] (N,), [E_P[table] (N,) for each extra])``: one
        contraction whose gradients with respect to zero probes are P's marginals on each
        term's scope (``extra``: ``(variables, table, batched)`` over this graph's variables,
        e.g. another field's terms for a KL divergence). Differentiable (double backward)
        when the potentials require grad."""
        graph = self.graph
        prep = self._prepare(factor_marginals=True)
        n = prep.batch
        ops, labels = list(prep.operands), list(prep.labels)
        probes, tables = list(prep.term_probes), \
            [t.table for t in prep.terms if t.factor is not None]
        own = len(probes)
        for scope, table, batched in extra:
            full = table.to(prep.dtype)
            shape = full.shape[1:] if batched else full.shape
            z = torch.zeros((n, *shape), dtype=prep.dtype, device=prep.device,
                            requires_grad=True)
            t = z                         # a zero probe: its gradient is P's marginal
            scope = list(scope)
            for axis in reversed(range(len(scope))):
                if graph.index(scope[axis]) not in prep.cards:   # observed: sliced away
                    t = _take(t, axis + 1, prep.evidence[scope[axis]])
                    scope.pop(axis)
            ops.append(t)
            labels.append((BATCH, *(graph.index(v) for v in scope)))
            probes.append(z)
            tables.append(full)
        plan = self._plan(labels, prep.cards, prep.dtype, "the expectation")
        grad_on = torch.is_grad_enabled() and any(t.requires_grad for t in tables)
        with torch.enable_grad():
            log_z, _ = contract_path(ops, plan, "sum")
            check_finite(prep, log_z)
            grads = torch.autograd.grad(log_z.sum(), probes, create_graph=grad_on,
                                        allow_unused=True) if probes else []
        expect = []
        for g, t in zip(grads, tables):
            if g is None:
                g = torch.zeros_like(t)
            expect.append(_expectation(g, t))
        score = sum(expect[:own]) if own else log_z.new_zeros(n)
        if not grad_on:
            log_z = log_z.detach()
        return log_z, score, expect[own:]

    # -- entropy, sampling, enumeration -------------------------------------------------
    def entropy(self) -> torch.Tensor:
        """``batch_shape``: H(P) = log Z - E_P[score] (exact; differentiable), or H(Q) for
        an approximate engine (the entropy of its product of marginals)."""
        self._no_latent("entropy")
        if self.exact:
            log_z, score, _ = self._expected_scores()
            return self._squeeze(log_z - score)
        self._say("entropy", "H(Q), the entropy of the approximation")
        m = self.marginals
        total = 0.0
        for v in self.graph.standalone_variables():
            total = total - torch.special.xlogy(m[v.name], m[v.name]).sum(-1)
        for a in self.graph.arrays.values():
            total = total - torch.special.xlogy(m[a.name], m[a.name]).sum((-1, -2))
        return torch.as_tensor(total, dtype=self.graph.dtype, device=self.graph.device)

    def sample(self, sample_shape=_NO_SHAPE) -> torch.Tensor:
        """``sample_shape + batch_shape + event_shape`` LongTensor: exact joint draws
        (forward filtering, backward sampling along the exact plan: :mod:`.sampling`), or
        draws from Q for an approximate engine (:attr:`sample_kind`). Evidence is carried,
        padding reads -1; a -inf state is never drawn."""
        sample_shape = torch.Size(sample_shape)
        s = sample_shape.numel()
        with torch.no_grad():
            if self.exact:
                full = self._exact_draws(s)
            else:
                self._say("sample", self.sample_kind)
                full = self._q_draws(s)
        x = full[..., self._cols]
        padded = self._padded()
        if padded is not None:
            x = x.masked_fill(padded, -1)
        return x.reshape(sample_shape + self.batch_shape + self.event_shape)

    def _exact_draws(self, s: int) -> torch.Tensor:
        graph = self.graph
        prep = self._prepare()
        plan = self._plan(prep.labels, prep.cards, prep.dtype, f"drawing {s:,} samples",
                          map_pass=True, extra=lambda plan: sampling_elements(plan, s))
        log_z, kept, final = forward(prep.operands, plan)
        check_finite(prep, log_z)
        values = backward_sample(plan, kept, final, s)
        full = torch.zeros(s, prep.batch, len(graph.variables), dtype=torch.long,
                           device=prep.device)
        for v in graph.variables.values():
            i = graph.index(v)
            if i in values and v in prep.evidence:       # observed in some elements only
                ev = prep.evidence[v].expand(prep.batch)
                full[..., i] = torch.where(ev >= 0, ev, values[i])
            else:
                full[..., i] = values[i] if i in values else prep.evidence[v]
        return full

    def _q_draws(self, s: int) -> torch.Tensor:
        graph, n = self.graph, self._n
        m = self.marginals
        full = torch.zeros(s, n, len(graph.variables), dtype=torch.long, device=graph.device)

        def draw(q):                      # q: (N, ..., d) -> (S, N, ...)
            q = q if self._batched else q.unsqueeze(0)
            logits = torch.log(q.to(graph.dtype)).unsqueeze(0)
            return gumbel_argmax(logits.expand(s, *logits.shape[1:]))

        for v in graph.standalone_variables():
            full[..., graph.index(v)] = draw(m[v.name])
        for a in graph.arrays.values():
            idx = torch.tensor([graph.index(v) for v in a], device=graph.device)
            full[..., idx] = draw(m[a.name])
        return full

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """Every joint state of the free variables of :attr:`variables`: ``(K,) +
        batch_shape + event_shape`` (``expand=False``: batch axes of size 1 where every
        batch element has the same values there), K = Π of their cardinalities.

        Enumeration is in lock-step over the batch (torch's convention): an entry that is
        padding in every batch element reads -1; one that is padding in some elements
        only runs over its states like the others, and in those elements every state but
        0 (the padding clamp) has probability zero (log_prob -inf), as a Categorical's
        zero-probability categories do.

        Raises TooLargeError above ``max_support`` states."""
        graph, n = self.graph, self._n
        padded = self._padded()
        always = padded.all(0) if padded is not None else None
        free = [j for j, v in enumerate(self.variables)
                if not self._fixed(v) and (always is None or not bool(always[j]))]
        k = math.prod(self.variables[j].cardinality for j in free)
        if k > self.max_support:
            raise TooLargeError(f"enumerate_support would list {k:,} joint states, above "
                                f"max_support={self.max_support:,}")
        base = torch.zeros(n, len(self.variables), dtype=torch.long, device=graph.device)
        varies = False
        for j, v in enumerate(self.variables):
            if self._fixed(v):
                ev = self.evidence[v].expand(n)
                base[:, j] = ev
                varies = varies or bool((ev != ev[0]).any())
            elif always is not None and bool(always[j]):
                base[:, j] = -1
        ranges = [torch.arange(self.variables[j].cardinality, device=graph.device)
                  for j in free]
        if ranges:
            grid = torch.stack(torch.meshgrid(*ranges, indexing="ij"), -1).reshape(k, len(free))
        else:
            grid = torch.zeros(1, 0, dtype=torch.long, device=graph.device)
        rows = n if (expand or varies) else 1
        out = base[:rows].unsqueeze(0).repeat(k, 1, 1)
        if free:
            out[..., torch.tensor(free, device=graph.device)] = grid[:, None, :]
        if not self._batched:
            return out[:, 0]
        return out

    def enumerated(self):
        """``(support, categorical)``: the field as ONE categorical over its joint states,
        ``support`` from :meth:`enumerate_support` ``(K, *batch_shape, V)`` and a pyro
        ``Categorical`` with ``batch_shape`` whose logits are their log-probabilities.
        For pyro tools that take only scalar discrete sites (``infer_discrete``): sample the
        index ``k`` there and read the assignment ``support[k]`` (docs/distribution.md)."""
        support = self.enumerate_support(expand=True)
        logits = self.log_prob(support)                     # (K, *batch)
        return support, Categorical(logits=logits.movedim(0, -1))

    def expand(self, batch_shape, _instance=None):
        """Itself when ``batch_shape`` is its own (pyro's plates ask for that), else pyro's
        ExpandedDistribution (independent copies), whose enumeration keeps the event
        axis."""
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return _ExpandedField(self, batch_shape)

    # -- helpers for users ------------------------------------------------------------------
    def to_dict(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """A value ``(..., V)`` as ``{array: (..., T), variable: (...)}`` by name (arrays
        whose positions are all among :attr:`variables`, then the other variables)."""
        pos = {v: j for j, v in enumerate(self.variables)}
        out, done = {}, set()
        for a in self.graph.arrays.values():
            if all(v in pos for v in a):
                out[a.name] = value[..., [pos[v] for v in a]]
                done.update(a)
        for v in self.variables:
            if v not in done:
                out[v.name] = value[..., pos[v]]
        return out

    def __repr__(self) -> str:
        kind = "exact" if self.exact else "approximate"
        return (f"FieldDistribution({self.graph!r}, engine={self.engine.name!r} ({kind}), "
                f"batch_shape={tuple(self.batch_shape)}, event_shape="
                f"{tuple(self.event_shape)})")


class _ExpandedField(ExpandedDistribution):
    """pyro's ExpandedDistribution, with an :meth:`enumerate_support` that keeps the event
    axis (pyro's assumes scalar events)."""

    def enumerate_support(self, expand=True):
        samples = self.base_dist.enumerate_support(expand=False)     # (K, *base batch, V)
        k, base = samples.shape[0], samples.shape[1:-1]
        lead = (1,) * (len(self.batch_shape) - len(base))
        samples = samples.reshape((k, *lead, *base) + tuple(self.event_shape))
        if expand:
            samples = samples.expand((k, *self.batch_shape) + tuple(self.event_shape))
        return samples


@register_kl(FieldDistribution, FieldDistribution)
def _kl_field_field(p: FieldDistribution, q: FieldDistribution) -> torch.Tensor:
    """KL(p || q) = E_p[score_p - score_q] - log Z_p + log Z_q, exact, for two exact fields
    over the same variables (names and cardinalities); +inf where p puts mass on states q
    forbids (a -inf potential, q's evidence or padding). One contraction of p, with q's
    terms as probes (p's marginals on q's scopes)."""
    for d in (p, q):
        if not d.exact:
            raise UnsupportedQueryError(
                f"kl_divergence needs two exact fields; {d.engine.name!r} is approximate")
        d._no_latent("kl_divergence")
    names_p = sorted((v.name, v.cardinality) for v in p.graph.variables.values())
    names_q = sorted((v.name, v.cardinality) for v in q.graph.variables.values())
    if names_p != names_q:
        raise FieldlibError("kl_divergence: the two fields must be over the same variables "
                            "(names and cardinalities)")
    if q._batched and (not p._batched or p._n != q._n):
        raise FieldlibError(f"kl_divergence: batch shapes {tuple(p.batch_shape)} and "
                            f"{tuple(q.batch_shape)} differ")
    mine = p.graph.variables
    extra = []
    for term in q.graph.terms():
        extra.append((tuple(mine[v.name] for v in term.variables), term.table, term.batched))
    for v, s in q.evidence.items():         # q's evidence: 0 at its state, -inf elsewhere
        s = s.expand(q._n).to(p.graph.device)
        table = torch.full((q._n, v.cardinality), float("-inf"), dtype=p.graph.dtype,
                           device=p.graph.device)
        table.scatter_(1, s.clamp_min(0)[:, None], 0.0)
        table = table.masked_fill((s < 0)[:, None], 0.0)  # -1: unobserved there
        extra.append(((mine[v.name],), table if q._batched else table[0], q._batched))
    log_z, score, cross = p._expected_scores(extra)
    kl = score - log_z - sum(cross, log_z.new_zeros(())) + \
        q.log_partition.reshape(-1).to(log_z.dtype)
    return p._squeeze(kl)
