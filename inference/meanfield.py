"""Structured (block) mean-field inference on any FactorGraph (MATH.md §3, Eq. 5-6).

    Q(X) = Π_v Q_v(x_v),      Q_v(x) ∝ exp( Σ_{f ∋ v} E_{Q_{-v}}[ log φ_f | x_v = x ] )

A variable with a BlockDomain (a frame's joint states) is one factor of Q. Each factor
computes its own expected messages (``Factor.expected_messages``: vectorised for the
built-in factor types, a generic einsum over dense terms for any other) from the
:class:`~fieldlib.factors.beliefs.Beliefs` it is given (the run's MeanFieldState, its
options included), so the engine only schedules, normalises, damps and tracks. Everything
of one call lives in a per-run object (:class:`_Run`); the engine holds only its options,
so one engine can run several graphs at once (threads).

Schedules (one *iteration* = one sweep over every variable):

* ``"synchronous"``: every array position is updated at once from the previous iterate,
  then every stand-alone variable at once from the new arrays: for the temporal field
  "every Q_i, then Q_I" (Eq. 5, 6), the paper's test-time schedule. With no arrays (e.g. a
  UAI file) all variables update together (Jacobi). May oscillate; damping helps.
* ``"sequential"``: one variable at a time. Variables that share no factor do not affect
  each other's update, so the engine updates a greedy colour class of such variables in one
  tensor step: exactly a sequential sweep in colour order. Each step maximises the ELBO in
  the updated Q_v, so the ELBO never decreases (also with damping, in either space).

Damping α ∈ [0, 1) keeps a fraction of the old iterate: ``"prob"`` space (default)
Q ← (1 - α) Q* + α Q_old; ``"log"`` space Q ∝ Q*^(1-α) Q_old^α. α = 0 is the plain update.

The ELBO E_Q[score] + H(Q) <= log Z is reported in place of log Z; with evidence, it bounds
log Σ_free exp score. Marginals are Q; MAP is not supported.

Hard zeros (docs/meanfield.md, "-inf potentials"): when the initial Q gives an impossible
configuration mass, the batch element restarts from a point mass at a configuration of
positive probability (a search with arc consistency, meanfield_stack.Constraints); sequential
updates from a feasible Q stay feasible, and a synchronous step that is not is replaced by a
sequential sweep. A search that proves no configuration possible raises
ZeroProbabilityError; one that runs out of nodes leaves ``info["feasible"]`` False and warns
(InfeasibleWarning). Q is computed in the graph's (promoted) dtype.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError, ZeroProbabilityError
from fieldlib.factors.beliefs import MessageOptions, OnComponent, any_neginf

from .base import Engine, Result, register_engine
from .meanfield_stack import Constraints, TableStack, stack_tables
from .meanfield_state import Layout, MeanFieldState
from .prepare import compute_dtype

__all__ = ["InfeasibleWarning", "MeanField", "MeanFieldWarning", "NotConvergedWarning"]

SCHEDULES = ("synchronous", "sequential")

#: Default budget of the search for a feasible starting point, in search nodes per element.
DEFAULT_SEARCH_NODES = 2000

#: Penalty per unit of impossible probability in the soft messages of a row whose every
#: state is -inf (MessageOptions.penalty): the least impossible states are kept.
SOFT_PENALTY = 1e30


class MeanFieldWarning(RuntimeWarning):
    """Base class of the mean-field engine's warnings (each also leaves a flag in info)."""


class InfeasibleWarning(MeanFieldWarning):
    """No configuration of positive probability was found: the ELBO is -inf
    (``info["feasible"]`` is False)."""


class NotConvergedWarning(MeanFieldWarning):
    """The synchronous schedule stopped at ``max_iter`` before reaching ``tol``
    (``info["converged"]`` is False)."""


@dataclass
class _Run:
    """Everything one call of :class:`MeanField` holds. The engine object keeps only its
    options and is never written during a run, so one engine serves several runs at once.

    Attributes:
        layout: where each variable's Q lives (groups of ``(N, L, d)`` tensors).
        state: Q, a MeanFieldState (the factors' Beliefs, with the run's MessageOptions).
        free: per group ``(N, L)`` bool: real, unobserved positions (what updates change).
        all_free: per group, whether every position is free (updates then skip the mask).
        clamp: ``{group: (mask (N, L), states (N, L))}``: observed positions and states.
        zero: the ZeroProbabilityError to raise (its message names the model or evidence).
        batched: whether the graph carries a batch axis.
        unary: ``{group: (N, L, d)}`` summed messages of the one-variable factors.
    """

    layout: Layout
    state: MeanFieldState
    free: list
    all_free: list
    clamp: dict
    zero: ZeroProbabilityError
    batched: bool
    unary: dict = field(default_factory=dict)


@register_engine("meanfield")
class MeanField(Engine):
    """Block mean-field with a synchronous or sequential schedule.

    Args:
        schedule: ``"synchronous"`` or ``"sequential"`` (see module docstring).
        damping: α in [0, 1): fraction of the previous iterate kept.
        damping_space: ``"prob"`` or ``"log"``.
        tol: stop when no probability changed by more than ``tol`` in an iteration
            (0: always run ``max_iter`` iterations).
        max_iter: maximum number of iterations (sweeps).
        init: ``"unary"`` (Q from the factors touching one variable only, i.e. all other
            messages zero, as the paper's first pass) or ``"uniform"``.
        track_elbo: record the ELBO of every iteration in the trace (one extra energy pass
            per iteration); the final ELBO is always computed.
        kernel_method: KernelTemporal's kernel sums: ``"auto"``, ``"dense"``, ``"fft"`` or
            ``"banded"`` (fieldlib.kernels.temporal_sums).
        search_nodes: budget of the search for a configuration of positive probability,
            run when the initial Q puts mass on an impossible one (None: the module's
            ``DEFAULT_SEARCH_NODES``).

    Raises:
        FieldlibError: a bad option. At call time: UnsupportedQueryError (MAP, factor
        marginals), ZeroProbabilityError (the model or the evidence has probability zero:
        a variable with every state impossible, a factor -inf everywhere, or a search that
        proves no configuration is possible).

    Warns:
        InfeasibleWarning: no configuration of positive probability found within
        ``search_nodes`` (the ELBO is -inf; ``info["feasible"]`` False).
        NotConvergedWarning: the synchronous schedule did not reach ``tol``.
    """

    supports = frozenset({"elbo", "marginals"})

    def __init__(self, schedule: str = "sequential", damping: float = 0.0,
                 damping_space: str = "prob", tol: float = 1e-6, max_iter: int = 100,
                 init: str = "unary", track_elbo: bool = True, kernel_method: str = "auto",
                 search_nodes: int | None = None):
        if schedule not in SCHEDULES:
            raise FieldlibError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
        if not 0.0 <= float(damping) < 1.0:
            raise FieldlibError(f"damping must lie in [0, 1), got {damping!r}")
        if damping_space not in ("prob", "log"):
            raise FieldlibError(f"damping_space must be 'prob' or 'log', got {damping_space!r}")
        if init not in ("unary", "uniform"):
            raise FieldlibError(f"init must be 'unary' or 'uniform', got {init!r}")
        if int(max_iter) < 1 or float(tol) < 0:
            raise FieldlibError("max_iter must be >= 1 and tol >= 0")
        if search_nodes is not None and int(search_nodes) < 0:
            raise FieldlibError(f"search_nodes must be >= 0, got {search_nodes!r}")
        self.schedule, self.damping, self.damping_space = schedule, float(damping), damping_space
        self.tol, self.max_iter, self.init = float(tol), int(max_iter), init
        self.track_elbo, self.kernel_method = bool(track_elbo), kernel_method
        self.search_nodes = DEFAULT_SEARCH_NODES if search_nodes is None else int(search_nodes)

    # -- the run -------------------------------------------------------------------------------
    def run(self, graph, evidence, *, marginals, factor_marginals, map):
        if factor_marginals:
            raise UnsupportedQueryError("the meanfield engine gives variable marginals only")
        if not graph.variables:
            raise FieldlibError("the graph has no variables")
        t0 = time.perf_counter()
        layout = Layout(graph)
        ev = graph.evidence(evidence)
        n, batched = graph.batch_of(ev)
        dtype, device = compute_dtype(graph.dtype), graph.device  # half precision: float32
        state = MeanFieldState(layout, n, dtype, device,
                               MessageOptions(kernel_method=self.kernel_method))
        free, clamp = self._masks(graph, layout, ev, n, device)
        zero = ZeroProbabilityError("the evidence has probability zero" if ev else
                                     "the model gives every configuration probability zero")
        run = _Run(layout, state, free, [bool(f.all()) for f in free], clamp, zero, batched)
        factors = [_in_dtype(f, dtype) for f in graph.factors]
        units = _units(factors, layout)
        constant, coupled = _split_factors(units)
        phases = self._phases(layout, coupled, self.schedule)

        with torch.no_grad():
            state.set_wants(None)
            run.unary = unary = self._collect(constant, state, layout)
            offset = self._constant_energy(constant, state, zero, batched)
            self._initialise(run)
            hard, feasible, restarted = self._feasible_start(run, factors, coupled)
            sequential = (phases if self.schedule == "sequential" else
                          self._phases(layout, coupled, "sequential") if hard else None)
            trace = []
            converged, replaced = False, 0
            guard = hard and self.schedule == "synchronous"
            t_setup = time.perf_counter()
            for it in range(self.max_iter):
                damping = self.damping
                if it == 0 and bool(restarted.any()) and damping > 0:
                    # from a point mass, log-space damping would never move Q: undamped
                    damping = torch.where(restarted, 0.0, damping).to(dtype)[:, None, None]
                before = list(state.q) if guard else None  # set_group never writes into q
                change = self._sweep(run, phases, damping)
                elbo = None
                if self.track_elbo or guard:
                    elbo = self._elbo_fast(state, coupled, unary) + offset
                if guard:
                    # a Jacobi step can put mass on an impossible configuration; where it
                    # does, a sequential sweep (which cannot) replaces it
                    broke = torch.isneginf(elbo) & feasible
                    if bool(broke.any()):
                        replaced += int(broke.sum())
                        after = list(state.q)
                        for g, q in enumerate(before):
                            state.set_group(g, q)
                        change = torch.where(broke, self._sweep(run, sequential, damping),
                                             change)
                        for g, q in enumerate(after):
                            state.set_group(g, torch.where(broke[:, None, None], state.q[g], q))
                        elbo = self._elbo_fast(state, coupled, unary) + offset
                    feasible = ~torch.isneginf(elbo)
                entry = {"iteration": it + 1, "max_change": _squeeze(change, batched)}
                if self.track_elbo:
                    entry["elbo"] = _squeeze(elbo, batched)
                trace.append(entry)
                if self.tol > 0 and float(change.max()) < self.tol:
                    converged = True
                    break
        t_sweeps = time.perf_counter()
        elbo = self._elbo(units, state)  # differentiable in the potentials, Q held fixed
        _check_range(elbo, state, dtype)
        result = Result(engine=self.name, elbo=_squeeze(elbo, batched), trace=trace)
        if marginals:
            result.marginals = _marginals(graph, layout, state, batched)
        feasible = ~torch.isneginf(elbo.detach())
        result.info = {"iterations": len(trace), "converged": converged,
                       "feasible": bool(feasible.all()), "restarted": bool(restarted.any()),
                       "replaced_steps": replaced,
                       "schedule": self.schedule, "damping": self.damping,
                       "damping_space": self.damping_space, "phases": len(phases),
                       "compute_dtype": str(dtype).removeprefix("torch."),
                       "seconds": time.perf_counter() - t0,
                       "setup_seconds": t_setup - t0, "sweep_seconds": t_sweeps - t_setup}
        self._warn(result, feasible, converged, batched)
        return result

    def _warn(self, result, feasible, converged, batched):
        if not bool(feasible.all()):
            where = "" if not batched else (
                f" (batch elements {feasible.logical_not().nonzero().flatten().tolist()})")
            warnings.warn(
                f"mean-field found no configuration of positive probability{where} (its "
                f"search, of at most {self.search_nodes} nodes, found none): Q puts mass on "
                f"impossible configurations and the ELBO is -inf (info['feasible'] is "
                f"False)", InfeasibleWarning, stacklevel=4)
        if not converged and self.schedule == "synchronous" and self.tol > 0:
            warnings.warn(
                f"synchronous mean-field did not converge in {self.max_iter} sweeps "
                f"(info['converged'] is False); the synchronous schedule can oscillate: use "
                f"schedule='sequential' (its ELBO never decreases) or damping",
                NotConvergedWarning, stacklevel=4)

    # -- pieces --------------------------------------------------------------------------------
    @staticmethod
    def _masks(graph, layout, ev, n, device):
        """Per group: ``free (N, L)`` (real, unobserved) and ``clamp`` {g: (mask, states)}."""
        free, clamp = [], {}
        for g in layout.groups:
            active = torch.ones(n, g.size, dtype=torch.bool, device=device)
            if g.array is not None and g.array.lengths is not None:
                active = g.array.mask().to(device).expand(n, -1)
            free.append(active.clone())
        for v, value in ev.items():
            g, pos = layout.where[v]
            value = value.expand(n) if value.dim() == 0 else value
            mask, states = clamp.setdefault(
                g, (torch.zeros(n, layout.groups[g].size, dtype=torch.bool, device=device),
                    torch.zeros(n, layout.groups[g].size, dtype=torch.long, device=device)))
            seen = value.to(device) >= 0  # -1: unobserved in that element (partial evidence)
            mask[:, pos] = free[g][:, pos] & seen  # evidence on padding is ignored
            states[:, pos] = value.to(device).clamp(min=0)
            free[g][:, pos] = free[g][:, pos] & ~seen
        return free, clamp

    @staticmethod
    def _phases(layout, coupled, schedule):
        """``[(groups {g: position mask or None}, factors)]`` making one sweep. The
        synchronous schedule needs only the groups each factor touches (read off its scope,
        no per-position work); the sequential one colours the variables."""
        if schedule == "synchronous":
            touch = [_groups_of(f, layout) for f in coupled]
            arrays = {g.index: None for g in layout.groups if g.array is not None}
            pools = {g.index: None for g in layout.groups if g.array is None}
            phases = []
            for groups in (arrays, pools):
                if groups:
                    fs = [f for f, gs in zip(coupled, touch) if gs & groups.keys()]
                    phases.append((groups, fs))
            return phases
        touch = []  # per factor: set of (g, pos)
        for f in coupled:
            atoms = set()
            for clique in f.couplings():
                atoms.update(layout.where[v] for v in clique)
            touch.append(atoms)
        return _colour_phases(layout, coupled, touch)

    @staticmethod
    def _collect(factors, state, layout, groups=None, base=None) -> dict:
        """Sum of the factors' messages per group ``(N, L, d)`` (only ``groups`` if given),
        plus ``base[g]`` (e.g. the constant messages) where given. A tensor a factor returns
        is never written: the first sum makes a new one, later ones add into it. Messages
        on a component are summed there and gathered onto the states once per group."""
        acc: dict = {}
        on_comp: dict = {}
        mine: set = set()  # keys of tensors this call made (in-place adds allowed)

        def add(store, key, m):
            cur = store.get(key)
            if cur is None:
                store[key] = m
            elif key in mine and cur.shape == m.shape:
                cur += m
            else:
                store[key] = cur + m
                mine.add(key)

        def full(g):
            return (state.batch, layout.groups[g].size, layout.groups[g].card)

        if base is not None:
            for g in (base if groups is None else groups):
                if g in base:
                    acc[g] = base[g]
        for f in factors:
            if isinstance(f, TableStack):  # many small tables at once (meanfield_stack.py)
                for g, m in f.group_messages(state, groups).items():
                    add(acc, g, m)
                continue
            for item, m in f.expected_messages(state).items():
                g, pos = layout.locate(item)
                if groups is not None and g not in groups:
                    continue
                grp = layout.groups[g]
                comp = None
                if isinstance(m, OnComponent):
                    comp, m = m.component, m.message
                if comp is not None and pos is None:
                    add(on_comp, (g, comp), m)
                    continue
                if comp is not None:  # one block variable: gather onto its states now
                    m = m.index_select(-1, grp.component_index(comp)[0].to(m.device))
                if pos is None:
                    add(acc, g, m)
                    continue
                buf = acc.get(g)  # one position of the group: write into a full tensor
                if buf is None or g not in mine or buf.shape != full(g):
                    buf = (buf.expand(full(g)).clone() if buf is not None else
                           state.q[g].new_zeros(full(g)))
                    acc[g] = buf
                    mine.add(g)
                buf[:, pos] += m
        for (g, comp), buf in on_comp.items():
            index = layout.groups[g].component_index(comp)[0].to(buf.device)
            # gather (not index_select: several times slower along the last axis on CPU)
            gathered = buf.gather(-1, index.expand(*buf.shape[:-1], len(index)))
            cur = acc.get(g)
            if cur is not None and g not in mine and cur.shape == gathered.shape:
                gathered += cur  # a new tensor: sum into it (no third one)
                cur = None
            if cur is None:
                acc[g] = gathered
                mine.add(g)
            else:
                add(acc, g, gathered)
        for g, m in acc.items():
            if m.shape != full(g):  # a message without batch axis (or position axis)
                acc[g] = m.expand(full(g))
        return acc

    def _initialise(self, run: _Run) -> None:
        """Q from the one-variable factors (``init="unary"``) or uniform over the possible
        states; observed positions one-hot, padding all zero. Raises ``run.zero`` for a
        variable whose own factors are all -inf, or an impossible observed state."""
        state, unary, free, clamp, zero = run.state, run.unary, run.free, run.clamp, run.zero
        for g in run.layout.groups:
            i = g.index
            if i not in unary:
                unary[i] = state.q[i].new_zeros(state.batch, g.size, g.card)
            hard = any_neginf(unary[i])  # else no state is impossible: no checks
            if self.init == "unary":
                m = unary[i]
            elif hard:
                m = torch.where(torch.isneginf(unary[i]), unary[i], unary[i].new_zeros(()))
            else:
                m = torch.zeros_like(unary[i])
            dead = torch.isneginf(m).all(-1) & free[i] if hard else None
            if dead is not None and bool(dead.any()):
                n, pos = (int(x) for x in dead.nonzero()[0])
                raise type(zero)(
                    f"{zero}: every state of {g.variables[pos].name} is impossible (its own "
                    f"factors are all -inf){'' if state.batch == 1 else f' in batch element {n}'}")
            logq = torch.log_softmax(m, -1)
            if i in clamp:
                mask, states = clamp[i]
                onehot = torch.nn.functional.one_hot(states, g.card).to(logq.dtype)
                bad = mask & (onehot * torch.isneginf(m)).sum(-1).bool()
                if bool(bad.any()):
                    raise type(zero)(f"{zero} (an observed state is impossible)")
                logq = torch.where(mask[..., None], torch.log(onehot), logq)
            if i in clamp or not run.all_free[i]:
                active = free[i] | (clamp[i][0] if i in clamp else False)
                logq = torch.where(active[..., None], logq, logq.new_full((), float("-inf")))
            state.set_group(i, logq.exp(), logq)

    def _sweep(self, run: _Run, phases, damping) -> torch.Tensor:
        """One iteration over ``phases``; returns the max change per batch element."""
        state, layout, unary = run.state, run.layout, run.unary
        changes = []
        for groups, factors in phases:
            state.set_wants(groups)
            msgs = self._collect(factors, state, layout, groups, base=unary)
            soft: list = []

            def soft_messages(groups=groups, factors=factors, soft=soft):
                if not soft:  # messages with -inf replaced by a huge penalty
                    view = state.with_options(penalty=SOFT_PENALTY)
                    soft.append(self._collect(factors, view, layout, groups))
                return soft[0]

            for g, mask in groups.items():
                changes.append(self._update(run, g, msgs[g], mask, soft_messages, damping))
        state.set_wants(None)
        if not changes:
            return torch.zeros(state.batch, dtype=state.dtype, device=state.device)
        return changes[0] if len(changes) == 1 else torch.stack(changes).amax(0)

    @staticmethod
    def _constant_energy(constant, state, zero, batched) -> torch.Tensor:
        """``(N,)`` the factors over no variable (constants added to log Z); raises ``zero``
        when one is -inf."""
        total = torch.zeros(state.batch, dtype=state.dtype, device=state.device)
        for f in constant:
            if not isinstance(f, TableStack) and not f.scope:
                total = total + f.expected_energy(state)
        if bool(torch.isneginf(total).any()):
            bad = int(torch.isneginf(total).nonzero()[0, 0])
            raise type(zero)(f"{zero} (a constant factor is -inf"
                             f"{f' in batch element {bad}' if batched else ''})")
        return total

    def _feasible_start(self, run: _Run, factors, coupled):
        """Make the initial Q put no mass on impossible configurations, where one exists.

        When the coupled factors have -inf entries on states Q may take (``hard``) and the
        initial Q gives them mass, the batch element restarts from a point mass at a
        configuration of positive probability, found by a depth-first search with arc
        consistency over the -inf entries (meanfield_stack.Constraints). Sequential updates
        from there never reach an impossible configuration (the ELBO never decreases).

        Returns ``(hard, feasible (N,), restarted (N,))``. Raises ``run.zero``
        (ZeroProbabilityError) when the search proves that no configuration has positive
        probability."""
        layout, state, unary, free, clamp = run.layout, run.state, run.unary, run.free, run.clamp
        zero, batched = run.zero, run.batched
        n = state.batch
        feasible = torch.ones(n, dtype=torch.bool, device=state.device)
        restarted = torch.zeros_like(feasible)
        if not any(f.has_hard_zeros(state) for f in coupled):  # no -inf entry to avoid
            return False, feasible, restarted
        active = [free[g.index] | (clamp[g.index][0] if g.index in clamp else False)
                  for g in layout.groups]
        probe = MeanFieldState(layout, n, state.dtype, state.device, state.options)
        for g, q in enumerate(state.q):  # uniform over every state Q may take
            allowed = (~torch.isneginf(unary[g]) & free[g][..., None]).to(q.dtype)
            if g in clamp:
                mask, states = clamp[g]
                onehot = torch.nn.functional.one_hot(states, q.shape[-1]).to(q.dtype)
                allowed = torch.where(mask[..., None], onehot, allowed)
            probe.set_group(g, allowed / allowed.sum(-1, keepdim=True).clamp_min(1))
        if not bool(torch.isneginf(_energy(coupled, probe)).any()):
            return False, feasible, restarted
        need = torch.isneginf(_energy(coupled, state))
        if not bool(need.any()):
            return True, feasible, restarted
        cons = Constraints(factors, layout, n, state.device)
        domains = cons.propagate([q > 0 for q in probe.q], active)
        wiped = cons.wiped(domains, active) | cons.dead
        if bool(wiped.any()):
            raise _zero(zero, wiped, batched)
        qs = [q.clone() for q in state.q]
        look = MeanFieldState(layout, n, state.dtype, state.device, state.options)
        for e in need.nonzero().flatten().tolist():
            point, proven = cons.element(e).search(
                [d[e:e + 1] for d in domains], [a[e:e + 1] for a in active],
                self._greedy_score(run, coupled, look, e), self.search_nodes)
            if proven:
                raise _zero(zero, torch.arange(n) == e, batched)
            if point is not None:
                restarted[e] = True
                for g, q in enumerate(qs):
                    onehot = torch.nn.functional.one_hot(point[g][0], q.shape[-1]).to(q.dtype)
                    q[e] = onehot * active[g][e][..., None]
        for g, q in enumerate(qs):
            state.set_group(g, q)
        feasible = ~torch.isneginf(_energy(coupled, state))
        return True, feasible, restarted

    def _greedy_score(self, run: _Run, coupled, look, e):
        """The search's value order for batch element ``e``: a state's log-potential given
        the variables already fixed (one state left), i.e. the mean-field message under a Q
        that is a point mass on them and zero elsewhere (factors over an unfixed variable
        contribute nothing)."""
        layout, unary = run.layout, run.unary

        def score(domains, g, p):
            for h, d in enumerate(domains):
                q = look.q[h].clone()
                q[e] = (d[0] & (d[0].sum(-1, keepdim=True) == 1)).to(q.dtype)
                look.set_group(h, q)
            mask = torch.zeros(layout.groups[g].size, dtype=torch.bool)
            mask[p] = True
            look.set_wants({g: mask})
            m = self._collect(coupled, look, layout, {g: mask}).get(g)
            look.set_wants(None)
            return unary[g][e, p] if m is None else unary[g][e, p] + m[e, p]

        return score

    def _update(self, run: _Run, g, msg, mask, soft_messages, a) -> torch.Tensor:
        """Replace Q of group ``g`` at the free positions of ``mask`` (None: all) with the
        normalised ``msg``, damped; returns the max change per batch element.

        A row whose every state is -inf (the others' Q give each state probability zero)
        takes the states least often impossible instead (the messages with
        ``MessageOptions.penalty``); a row still impossible keeps its Q."""
        state, free, unary = run.state, run.free, run.unary
        old = state.q[g]
        q = torch.softmax(msg, -1)
        any_dead = bool(torch.isnan(q[..., 0].sum()))  # all -inf rows come out NaN
        dead = None
        if any_dead:
            dead = torch.isnan(q[..., :1])
            soft = soft_messages().get(g)
            if soft is not None:
                q = torch.where(dead, torch.softmax(soft + unary[g], -1), q)
            dead = torch.isnan(q[..., :1])
            any_dead = bool(dead.any())
        if isinstance(a, torch.Tensor) or a > 0:  # a: a float, or (N, 1, 1) per element
            if self.damping_space == "prob":
                damped = (1 - a) * q + a * old
            else:
                damped = torch.softmax((1 - a) * torch.log(q) + a * state.logq[g], -1)
            q = torch.where(a > 0, damped, q) if isinstance(a, torch.Tensor) else damped
        if mask is not None or not run.all_free[g] or any_dead:
            upd = free[g] if mask is None else free[g] & mask.to(free[g].device)[None, :]
            keep = ~upd[..., None] if dead is None else dead | ~upd[..., None]
            q = torch.where(keep, old, q)
        state.set_group(g, q, None)
        if not q.numel():
            return q.new_zeros(q.shape[0])
        return (q - old).abs_().reshape(q.shape[0], -1).amax(-1)  # max |change| per element

    def _elbo_fast(self, state, coupled, unary) -> torch.Tensor:
        """ELBO with the constant (one-variable) factors' energy read off their messages."""
        total = state.entropy()
        for i, q in enumerate(state.q):
            u = unary[i]
            total = total + torch.where(q > 0, q * u, q.new_zeros(())).sum((1, 2))
        for f in coupled:
            total = total + f.expected_energy(state)
        return total

    @staticmethod
    def _elbo(units, state) -> torch.Tensor:
        total = state.entropy()
        for f in units:
            if isinstance(f, TableStack):
                total = total + f.expected_energy(state, differentiable=True)
            else:
                total = total + f.expected_energy(state)
        return total


def _energy(factors, state) -> torch.Tensor:
    """``(N,)`` Σ_f E_Q[log φ_f] (-inf where Q gives an impossible configuration mass)."""
    total = torch.zeros(state.batch, dtype=state.dtype, device=state.device)
    for f in factors:
        total = total + f.expected_energy(state)
    return total


def _zero(zero, which, batched):
    """The ZeroProbabilityError ``zero`` naming the first batch element in ``which``."""
    if not batched:
        return zero
    return type(zero)(f"{zero} (batch element {int(which.nonzero()[0, 0])})")


def _units(factors, layout):
    """The factors, with small tables over stand-alone variables stacked."""
    stacks, rest = stack_tables(factors, layout)
    return stacks + rest


def _check_range(elbo, state, dtype):
    """A NaN or +inf ELBO, or a NaN in Q, can only come from scores beyond the dtype's range
    (inf - inf): refuse as the exact engines do (prepare.check_range) instead of returning
    it."""
    bad = bool(torch.isnan(elbo).any() or torch.isposinf(elbo).any())
    bad = bad or any(q.numel() > 0 and bool(torch.isnan(q.detach().amax())) for q in state.q)
    if bad:
        raise FieldlibError(
            f"the log-potentials are too large for the range of "
            f"{str(dtype).removeprefix('torch.')}: mean-field's energies overflow (inf - inf); "
            f"rescale the potentials or use a wider dtype")


def _in_dtype(factor, dtype):
    """``factor`` computing in ``dtype`` (the graph's promoted dtype, as the exact engines
    cast their terms): itself, or a shallow copy with its floating tensors cast (autograd
    still reaches the originals)."""
    if all(t.dtype == dtype for t in factor.tensors() if t.is_floating_point()):
        return factor
    out = copy.copy(factor)
    for name, value in vars(factor).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(out, name, value.to(dtype))
    return out


def _split_factors(units):
    """``(constant, coupled)``: the factors whose couplings hold at most one variable (their
    messages do not depend on Q) and the others (Factor.coupling_arity: no per-position
    work)."""
    constant, coupled = [], []
    for f in units:
        (constant if f.coupling_arity() <= 1 else coupled).append(f)
    return constant, coupled


def _groups_of(f, layout) -> set:
    """The Q groups a factor (or TableStack) touches, from its scope."""
    if isinstance(f, TableStack):
        return set(f.groups)
    return {layout.locate(item)[0] for item in f.scope}


def _colour_phases(layout, coupled, touch):
    """Greedy colouring of the variables (no two in a class share a factor); one phase per
    class, array positions first, then stand-alone variables, each in graph order."""
    cliques_of: dict[tuple[int, int], list[int]] = {}
    cliques: list[set] = []
    for f in coupled:
        for clique in f.couplings():
            atoms = {layout.where[v] for v in clique}
            for a in atoms:
                cliques_of.setdefault(a, []).append(len(cliques))
            cliques.append(set())  # colours used so far in this clique
    order = [(g.index, p) for g in layout.groups if g.array is not None for p in range(g.size)]
    order += [(g.index, p) for g in layout.groups if g.array is None for p in range(g.size)]
    classes: list[list[tuple[int, int]]] = []
    for atom in order:
        used = set()
        for c in cliques_of.get(atom, ()):
            used |= cliques[c]
        colour = 0
        while colour in used:
            colour += 1
        for c in cliques_of.get(atom, ()):
            cliques[c].add(colour)
        if colour == len(classes):
            classes.append([])
        classes[colour].append(atom)
    phases = []
    for members in classes:
        groups: dict[int, torch.Tensor] = {}
        for g, p in members:
            if g not in groups:
                groups[g] = torch.zeros(layout.groups[g].size, dtype=torch.bool)
            groups[g][p] = True
        atoms = set(members)
        fs = [f for f, t in zip(coupled, touch) if t & atoms]
        phases.append((groups, fs))
    return phases


def _squeeze(t, batched):
    return t if batched else t[0]


def _marginals(graph, layout, state, batched) -> dict:
    out = {}
    for g in layout.groups:
        q = state.q[g.index]
        q = q if batched else q[0]
        if g.array is not None:
            out[g.array.name] = q
        # one view per variable from one unbind (not one Python indexing per position)
        out.update(zip((v.name for v in g.variables), q.unbind(-2)))
    return {k: out[k] for k in [*graph.variables, *graph.arrays]}
