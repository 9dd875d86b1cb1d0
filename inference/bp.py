"""Loopy belief propagation (sum-product and max-product) on any FactorGraph: the ``bp`` engine.

Messages on the factor graph, in log space (layout and schedules: bp_schedule.py)::

    mu_{v->f}(x) = theta_v(x) + sum_{g ∋ v, g != f} m_{g->v}(x)
    m_{f->v}(x)  = log sum_{x_f: x_v = x} exp(theta_f(x_f) + sum_{u ∈ f, u != v} mu_{u->f}(x_u))

(max instead of log-sum for max-product). ``theta_v`` is the sum of the one-variable terms
of v (they send no messages); every other term is a factor. Beliefs are
``b_v ∝ exp(theta_v + sum_f m_{f->v})`` and ``b_f ∝ exp(theta_f + sum_{v ∈ f} mu_{v->f})``.

The log Z estimate is the negative Bethe free energy at the beliefs::

    -F = sum_f sum_x b_f (theta_f - log b_f) + sum_v sum_x b_v (theta_v + (d_v - 1) log b_v)

(d_v: how many multi-variable factors hold v; terms with no free variable add their value).
On a tree at convergence P = prod_f b_f prod_v b_v^(1 - d_v), so -F = log Z exactly. It is
differentiable in the potentials with the beliefs held fixed; at a fixed point F is
stationary in the beliefs, so d(-F)/d theta_f = b_f, the BP factor marginals (on trees the
exact gradient of log Z).

MAP: max-product, then each variable's most probable state under its max-marginal (ties to
the lowest state; on a tree with a unique MAP this is the MAP). ``map_score`` is the score of
the decoded assignment (``-inf`` if loopy max-product decoded an impossible one).

Hard zeros: the support of every message contains the support of the true marginal (what a
message rules out, no solution has), so a belief with every state ``-inf`` proves the model
(or the evidence) has probability zero: ZeroProbabilityError, as the exact engine raises.
"""

from __future__ import annotations

import time
import warnings

import torch

from fieldlib.errors import FieldlibError

from .base import Engine, register_engine
from .bp_schedule import Messages, broadcast, build_layout, normalise
from .meanfield import NotConvergedWarning
from .prepare import check_finite, finish, prepare

__all__ = ["BeliefPropagation", "BPNotConvergedWarning", "SCHEDULES", "SEMIRINGS"]

SCHEDULES = ("parallel", "sequential")
SEMIRINGS = ("sum", "max")
NEG_INF = float("-inf")


class BPNotConvergedWarning(NotConvergedWarning):
    """Loopy BP stopped at ``max_iter`` before every message changed by at most ``tol``
    (``info["converged"]`` is False). A NotConvergedWarning, so filters and ``fieldlib
    infer`` treat it as mean-field's."""


@register_engine("bp")
class BeliefPropagation(Engine):
    """Loopy belief propagation: sum-product (Bethe log Z, marginals) and max-product (MAP).

    Args:
        max_iter: maximum number of iterations (each one updates every message once).
        tol: stop when no message changed by more than ``tol`` (as probabilities) in an
            iteration; each batch element stops on its own.
        damping: α in [0, 1): each new message is ``(1 - α) new + α old`` in log space.
        schedule: ``"parallel"`` (every message from the previous iterate, flooding) or
            ``"sequential"`` (factors one at a time, batched by a colouring into classes that
            share no variable: a sequential sweep in class order).
        semiring: ``"sum"`` (sum-product: marginals, factor marginals, Bethe log Z; MAP runs
            max-product on request) or ``"max"`` (max-product only: marginals are the
            normalised max-marginals, no log Z).

    Raises:
        FieldlibError: a bad option. At call time: ZeroProbabilityError (the evidence or the
        model has probability zero, proved by a belief with every state impossible),
        FieldlibError from ``prepare`` (potentials beyond the dtype's range).

    Warns:
        BPNotConvergedWarning: ``max_iter`` reached with ``tol > 0`` unmet.
    """

    supports = frozenset({"log_z", "marginals", "map"})

    def __init__(self, max_iter: int = 100, tol: float = 1e-8, damping: float = 0.0,
                 schedule: str = "parallel", semiring: str = "sum"):
        if schedule not in SCHEDULES:
            raise FieldlibError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
        if semiring not in SEMIRINGS:
            raise FieldlibError(f"unknown semiring {semiring!r}; choose from {SEMIRINGS}")
        if not 0.0 <= float(damping) < 1.0:
            raise FieldlibError(f"damping must lie in [0, 1), got {damping!r}")
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or int(max_iter) < 1:
            raise FieldlibError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not float(tol) >= 0:
            raise FieldlibError(f"tol must be >= 0, got {tol!r}")
        self.max_iter, self.tol, self.damping = int(max_iter), float(tol), float(damping)
        self.schedule, self.semiring = schedule, semiring

    def run(self, graph, evidence, *, marginals, factor_marginals, map):
        t0 = time.perf_counter()
        prep = prepare(graph, evidence, probes=False)
        user_grad = torch.is_grad_enabled() and any(t.table.requires_grad for t in prep.terms)
        with torch.set_grad_enabled(user_grad):
            layout = build_layout(prep, graph, self.schedule)
        info = {"schedule": self.schedule, "damping": self.damping, "semiring": self.semiring,
                "groups": [g.shape for g in layout.groups], "phases": len(layout.phases)}
        log_z = var_marg = fmarg = assignment = score = None
        trace = None
        if self.semiring == "sum":
            msgs, stats, trace = self._iterate(layout, "sum", prep.batched)
            info.update(stats)
            var_log, fac_log, dead = _beliefs(layout, msgs, "sum")
            with torch.set_grad_enabled(user_grad):
                log_z = _bethe(layout, var_log, fac_log, dead)
            check_finite(prep, log_z)
            if not user_grad:
                log_z = log_z.detach()
        if map or self.semiring == "max":
            mmsgs, mstats, mtrace = self._iterate(layout, "max", prep.batched)
            if self.semiring == "max":
                info.update(mstats)
                trace = mtrace
                var_log, fac_log, dead = _beliefs(layout, mmsgs, "max")
                check_finite(prep, torch.where(dead, NEG_INF, 0.0))
            else:
                info.update({f"map_{k}": v for k, v in mstats.items()})
                mvar, _, mdead = _beliefs(layout, mmsgs, "max")
                check_finite(prep, torch.where(mdead, NEG_INF, 0.0))
            if map:
                pooled = {c: lb.argmax(-1) for c, lb in (mvar if self.semiring == "sum"
                                                          else var_log).items()}
                assignment = {v: pooled[c][:, pos] for v, (c, pos) in layout.where.items()}
                score = _score(layout, pooled)
        var_b = {c: normalise(lb, "sum").exp() for c, lb in var_log.items()}
        if marginals:
            var_marg = {v: var_b[c][:, pos] for v, (c, pos) in layout.where.items()}
        if factor_marginals:
            fac_b = [normalise(lb.flatten(2), "sum").exp().view(lb.shape) for lb in fac_log]
            fmarg = _factor_marginals(prep, layout, var_b, fac_b)
        info["seconds"] = time.perf_counter() - t0
        result = finish(prep, self.name, log_z, var_marg, fmarg, assignment, score, info)
        result.trace = trace
        self._warn(result)
        return result

    def _iterate(self, layout, semiring, batched):
        """Run the schedule to ``tol`` or ``max_iter``: ``(Messages, stats, trace)``. A batch
        element that has converged keeps its messages (as if run alone)."""
        msgs = Messages(layout, semiring, self.damping)
        n = layout.constant.shape[0]
        device = layout.constant.device
        done = torch.zeros(n, dtype=torch.bool, device=device)
        last = torch.zeros(n, dtype=layout.constant.dtype, device=device)
        iterations = torch.zeros(n, dtype=torch.long, device=device)
        trace = []
        with torch.no_grad():
            if layout.groups:
                for it in range(self.max_iter):
                    change = msgs.sweep(done if bool(done.any()) else None)
                    live = ~done
                    last = torch.where(live, change, last)
                    iterations += live
                    trace.append({"iteration": it + 1,
                                  "max_change": change if batched else float(change[0])})
                    done = done | (change <= self.tol)
                    if bool(done.all()):
                        break
            else:  # no factor couples two variables: the beliefs are exact already
                done[:] = True
        stats = {"iterations": int(iterations.max()) if n else 0,
                 "converged": bool(done.all()), "max_change": float(last.max()) if n else 0.0}
        if batched:
            stats["iterations_per_element"] = iterations
        return msgs, stats, trace

    def _warn(self, result):
        for prefix, what in (("", self.semiring + "-product"), ("map_", "max-product (MAP)")):
            if result.info.get(prefix + "converged", True) or self.tol == 0:
                continue
            warnings.warn(
                f"loopy BP ({what}, {self.schedule}) did not converge in {self.max_iter} "
                f"iterations: the largest message change was "
                f"{result.info[prefix + 'max_change']:.3g} > tol={self.tol:g} "
                f"(info['{prefix}converged'] is False); try damping (e.g. damping=0.5), the "
                f"sequential schedule or more iterations", BPNotConvergedWarning, stacklevel=4)


def _beliefs(layout, msgs: Messages, semiring: str):
    """Log-beliefs from the current messages: per cardinality ``(N, V_c, c)``, per group
    ``(N, G, d1..dk)`` (normalised in ``semiring``), and ``dead (N,)``: some belief has
    every state impossible."""
    with torch.no_grad():
        total, count = msgs.totals()
        var_log = {c: normalise(t if count[c] is None else t.masked_fill(count[c] > 0.5,
                                                                            NEG_INF), semiring)
                   for c, t in total.items()}
        fac_log = []
        for g, group in enumerate(layout.groups):
            k = len(group.shape)
            s = msgs.tables[g]
            for j, mu in enumerate(msgs.cavities(g, None, total, count)):
                s = s + broadcast(mu, j, k)
            fac_log.append(normalise(s.flatten(2), semiring).view(s.shape))
        dead = torch.zeros_like(layout.constant, dtype=torch.bool)
        for lb in var_log.values():
            dead |= torch.isneginf(lb).all(-1).any(-1)
        for lb in fac_log:
            dead |= torch.isneginf(lb.flatten(2)).all(-1).any(-1)
    return var_log, fac_log, dead


def _bethe(layout, var_log, fac_log, dead) -> torch.Tensor:
    """``(N,)`` -F at the (detached) beliefs; differentiable in the tables (module doc)."""
    total = layout.constant
    for group, lb in zip(layout.groups, fac_log):
        b = lb.exp()
        live = b > 0
        dims = tuple(range(2, lb.dim()))
        energy = torch.where(live, b * group.table, 0.0).sum(dims)
        negentropy = torch.where(live, b * lb, 0.0).sum(dims)
        total = total + (energy - negentropy).sum(1)
    for c, lb in var_log.items():
        b = lb.exp()
        live = b > 0
        energy = torch.where(live, b * layout.unary[c], 0.0).sum(-1)
        negentropy = torch.where(live, b * lb, 0.0).sum(-1)
        total = total + (energy + (layout.degree[c] - 1) * negentropy).sum(-1)
    return torch.where(dead, NEG_INF, total)


def _score(layout, pooled) -> torch.Tensor:
    """``(N,)`` log-score of the assignment ``{cardinality: (N, V_c) states}``."""
    with torch.no_grad():
        total = layout.constant.detach().clone()
        for c, u in layout.unary.items():
            total += u.detach().gather(2, pooled[c][..., None]).squeeze(-1).sum(1)
        for group in layout.groups:
            n, g = group.table.shape[:2]
            flat = torch.zeros(n, g, dtype=torch.long, device=total.device)
            for d, index in zip(group.shape, group.slots):
                flat = flat * d + pooled[d][:, index]
            table = group.table.detach().reshape(n, g, -1)
            total += table.gather(2, flat[..., None]).squeeze(-1).sum(1)
    return total


def _factor_marginals(prep, layout, var_b, fac_b) -> list[torch.Tensor]:
    """Per factor term, its BP marginal over the term's whole scope ``(N, d1..dk)``
    (observed variables as one-hot axes), as ``finish`` expects."""
    out = []
    n = prep.batch
    for i, term in enumerate(prep.terms):
        if term.factor is None:
            continue
        home = layout.home[i]
        if home[0] == "group":
            _, g, member = home
            perm = layout.groups[g].perms[member]
            inverse = sorted(range(len(perm)), key=perm.__getitem__)
            b = fac_b[g][:, member].permute(0, *(1 + a for a in inverse))
        elif home[0] == "unary":
            c, pos = layout.where[home[1]]
            b = var_b[c][:, pos]
        else:
            b = torch.ones(n, dtype=prep.dtype, device=prep.device)
        for a, v in enumerate(term.variables):
            if v in prep.evidence:
                onehot = torch.nn.functional.one_hot(prep.evidence[v], v.cardinality)
                b = b.unsqueeze(1 + a)
                shape = [n] + [1] * (b.dim() - 1)
                shape[1 + a] = v.cardinality
                b = b * onehot.to(b.dtype).view(shape)
        out.append(b)
    return out
