"""Structured (block) mean-field inference on any FactorGraph (MATH.md §3, Eq. 5-6).

    Q(X) = Π_v Q_v(x_v),      Q_v(x) ∝ exp( Σ_{f ∋ v} E_{Q_{-v}}[ log φ_f | x_v = x ] )

A variable with a BlockDomain (a frame's joint states) is one factor of Q. Each factor
computes its own expected messages (``Factor.expected_messages``: vectorised for the
built-in factor types, a generic einsum over dense terms for any other), so the engine only
schedules, normalises, damps and tracks.

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
"""

from __future__ import annotations

import time

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError, ZeroProbabilityError
from fieldlib.factors.base import OnComponent, soft_impossible

from .base import Engine, Result, register_engine
from .meanfield_stack import stack_tables
from .meanfield_state import Layout, MeanFieldState

__all__ = ["MeanField"]

SCHEDULES = ("synchronous", "sequential")


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

    Raises:
        FieldlibError: a bad option. At call time: UnsupportedQueryError (MAP, factor
        marginals), ZeroProbabilityError (a variable with every state impossible, or
        evidence on an impossible state).
    """

    supports = frozenset({"elbo", "marginals"})

    def __init__(self, schedule: str = "sequential", damping: float = 0.0,
                 damping_space: str = "prob", tol: float = 1e-6, max_iter: int = 100,
                 init: str = "unary", track_elbo: bool = True, kernel_method: str = "auto"):
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
        self.schedule, self.damping, self.damping_space = schedule, float(damping), damping_space
        self.tol, self.max_iter, self.init = float(tol), int(max_iter), init
        self.track_elbo, self.kernel_method = bool(track_elbo), kernel_method

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
        dtype, device = graph.dtype, graph.device
        state = MeanFieldState(layout, n, dtype, device, self.kernel_method)
        free, clamp = self._masks(graph, layout, ev, n, device)
        self._all_free = [bool(f.all()) for f in free]
        units = _units(graph, layout)
        constant, coupled = _split_factors(units)
        phases = self._phases(layout, coupled)

        with torch.no_grad():
            state.set_wants(None)
            unary = self._collect(constant, state, layout)
            self._initialise(state, layout, unary, free, clamp)
            trace = []
            converged = False
            for it in range(self.max_iter):
                change = torch.zeros(n, dtype=dtype, device=device)
                for groups, factors in phases:
                    state.set_wants(groups)
                    msgs = self._collect(factors, state, layout, groups)
                    soft: list = []

                    def soft_messages(groups=groups, factors=factors, soft=soft):
                        if not soft:  # messages with -inf replaced by a huge penalty
                            with soft_impossible():
                                soft.append(self._collect(factors, state, layout, groups))
                        return soft[0]

                    for g, mask in groups.items():
                        m = msgs.get(g)
                        m = unary[g] if m is None else m + unary[g]
                        change = torch.maximum(
                            change, self._update(state, g, m, mask, free, unary, soft_messages))
                state.set_wants(None)
                entry = {"iteration": it + 1, "max_change": _squeeze(change, batched)}
                if self.track_elbo:
                    entry["elbo"] = _squeeze(self._elbo_fast(state, coupled, unary), batched)
                trace.append(entry)
                if self.tol > 0 and float(change.max()) < self.tol:
                    converged = True
                    break
        elbo = self._elbo(units, state)  # differentiable in the potentials, Q held fixed
        result = Result(engine=self.name, elbo=_squeeze(elbo, batched), trace=trace)
        if marginals:
            result.marginals = _marginals(graph, layout, state, batched)
        result.info = {"iterations": len(trace), "converged": converged,
                       "schedule": self.schedule, "damping": self.damping,
                       "damping_space": self.damping_space, "phases": len(phases),
                       "seconds": time.perf_counter() - t0}
        return result

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
            mask[:, pos] = free[g][:, pos]  # evidence on padding is ignored
            states[:, pos] = value.to(device)
            free[g][:, pos] = False
        return free, clamp

    def _phases(self, layout, coupled):
        """``[(groups {g: position mask or None}, factors)]`` making one sweep."""
        touch = []  # per factor: set of (g, pos)
        for f in coupled:
            atoms = set()
            for clique in f.couplings():
                atoms.update(layout.where[v] for v in clique)
            touch.append(atoms)
        if self.schedule == "synchronous":
            arrays = {g.index: None for g in layout.groups if g.array is not None}
            pools = {g.index: None for g in layout.groups if g.array is None}
            phases = []
            for groups in (arrays, pools):
                if groups:
                    fs = [f for f, atoms in zip(coupled, touch)
                          if any(a[0] in groups for a in atoms)]
                    phases.append((groups, fs))
            return phases
        return _colour_phases(layout, coupled, touch)

    @staticmethod
    def _collect(factors, state, layout, groups=None) -> dict:
        """Sum of the factors' messages per group ``(N, L, d)`` (only ``groups`` if given)."""
        acc: dict[int, torch.Tensor] = {}
        on_comp: dict[tuple[int, str], torch.Tensor] = {}

        def buffer(store, key, shape_like):
            if key not in store:
                store[key] = state.q[key if isinstance(key, int) else key[0]].new_zeros(
                    shape_like)
            return store[key]

        for f in factors:
            if hasattr(f, "group_messages"):  # a TableStack (meanfield_stack.py)
                for g, m in f.group_messages(state, groups).items():
                    acc[g] = acc[g] + m if g in acc else m
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
                    size = grp.component_index(comp)[1]
                    buf = buffer(on_comp, (g, comp), (state.batch, grp.size, size))
                    buf += m
                    continue
                if comp is not None:  # one block variable: gather onto its states now
                    m = m.index_select(-1, grp.component_index(comp)[0].to(m.device))
                buf = buffer(acc, g, (state.batch, grp.size, grp.card))
                if pos is None:
                    buf += m
                else:
                    buf[:, pos] += m
        for (g, comp), buf in on_comp.items():
            index = layout.groups[g].component_index(comp)[0].to(buf.device)
            # gather (not index_select: several times slower along the last axis on CPU)
            gathered = buf.gather(-1, index.expand(*buf.shape[:-1], len(index)))
            acc[g] = acc[g] + gathered if g in acc else gathered
        return acc

    def _initialise(self, state, layout, unary, free, clamp):
        for g in layout.groups:
            i = g.index
            if i not in unary:
                unary[i] = state.q[i].new_zeros(state.batch, g.size, g.card)
            m = unary[i] if self.init == "unary" else torch.where(
                torch.isneginf(unary[i]), unary[i], unary[i].new_zeros(()))
            dead = torch.isneginf(m).all(-1) & free[i]
            if bool(dead.any()):
                n, pos = (int(x) for x in dead.nonzero()[0])
                raise ZeroProbabilityError(
                    f"every state of {g.variables[pos].name} is impossible (its own factors "
                    f"are all -inf){'' if state.batch == 1 else f' in batch element {n}'}")
            logq = torch.log_softmax(m, -1)
            if i in clamp:
                mask, states = clamp[i]
                onehot = torch.nn.functional.one_hot(states, g.card).to(logq.dtype)
                bad = mask & (onehot * torch.isneginf(m)).sum(-1).bool()
                if bool(bad.any()):
                    raise ZeroProbabilityError("the evidence has probability zero (an observed "
                                               "state is impossible)")
                logq = torch.where(mask[..., None], torch.log(onehot), logq)
            active = free[i] | (clamp[i][0] if i in clamp else False)
            logq = torch.where(active[..., None], logq, logq.new_full((), float("-inf")))
            state.set_group(i, logq.exp(), logq)

    def _update(self, state, g, msg, mask, free, unary, soft_messages) -> torch.Tensor:
        """Replace Q of group ``g`` at the free positions of ``mask`` (None: all) with the
        normalised ``msg``, damped; returns the max change per batch element.

        A row whose every state is -inf (the others' Q give each state probability zero)
        takes the states least often impossible instead (messages under
        ``soft_impossible``); a row still impossible keeps its Q."""
        old = state.q[g]
        q = torch.softmax(msg, -1)
        dead = torch.isnan(q[..., :1])  # all -inf rows come out NaN
        any_dead = bool(dead.any())
        if any_dead:
            soft = soft_messages().get(g)
            if soft is not None:
                q = torch.where(dead, torch.softmax(soft + unary[g], -1), q)
            dead = torch.isnan(q[..., :1])
            any_dead = bool(dead.any())
        a = self.damping
        if a > 0:
            if self.damping_space == "prob":
                q = (1 - a) * q + a * old
            else:
                q = torch.softmax((1 - a) * torch.log(q) + a * state.logq[g], -1)
        if mask is not None or not self._all_free[g] or any_dead:
            upd = free[g] if mask is None else free[g] & mask.to(free[g].device)[None, :]
            q = torch.where(dead | ~upd[..., None], old, q)
        state.set_group(g, q, None)
        return (q - old).abs().amax((1, 2)) if q.numel() else q.new_zeros(q.shape[0])

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
            if hasattr(f, "group_messages"):
                total = total + f.expected_energy(state, differentiable=True)
            else:
                total = total + f.expected_energy(state)
        return total


def _units(graph, layout):
    """The graph's factors, with small tables over stand-alone variables stacked."""
    stacks, rest = stack_tables(graph.factors, layout)
    return stacks + rest


def _split_factors(units):
    constant, coupled = [], []
    for f in units:
        (constant if all(len(c) <= 1 for c in f.couplings()) else coupled).append(f)
    return constant, coupled


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
        for p, v in enumerate(g.variables):
            out[v.name] = q[..., p, :]
    return {k: out[k] for k in [*graph.variables, *graph.arrays]}
