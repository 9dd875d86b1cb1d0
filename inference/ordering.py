"""Elimination orders for exact inference: greedy heuristics with randomised restarts.

The order decides everything: on ObjectDetection_11 opt_einsum's plain greedy path needs
gigabytes where a good elimination order needs megabytes. We search orders on the
interaction graph (variables adjacent when they share a factor) with two classic greedy
scores, both cardinality-aware:

* ``fill``: eliminate the variable whose elimination adds the least fill-in, each new edge
  weighted by the product of its endpoints' cardinalities (weighted min-fill); ties go to
  the smaller clique;
* ``weight``: eliminate the variable whose clique (itself and its neighbours) has the
  fewest joint states (min-weight).

An order's cost is Σ_v |clique(v)| in joint states: the work of the contraction (each
bucket step is one batched matmul over its clique, see contract.py); ties go to the smaller
largest clique (its memory).

Strategy (docs/benchmarks.md): the two deterministic runs always happen. When the better
of them meets :func:`_lower_bounds` (no order can do better: a chain, a forest of one
cardinality) the search stops there, with the order the restarts would have kept. Else
randomised runs (each score multiplied by ``exp(noise * U)``, U uniform) repeat while they may pay
off: the search stops when its *work* reaches ``search_fraction`` of the predicted
contraction time of the best order so far, or ``max_work``, whichever is first. Work is
counted, not timed: one unit per variable score evaluated or neighbour visited (about
0.3 µs each, :data:`SECONDS_PER_WORK`), so the same problem gets the same restarts, the
same order and the same answer or refusal on a busy machine as on a quiet one. Small
problems therefore stop after the deterministic runs, large ones search longer. A run is
abandoned as soon as its running cost exceeds the best (branch and bound). Graphs are
bitsets (Python ints) so a run on a few hundred variables takes milliseconds.
"""

from __future__ import annotations

import heapq
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OrderSearch", "elimination_order", "predicted_seconds", "DEFAULT_MAX_WORK",
           "SECONDS_PER_WORK"]

#: Calibrated on the UAI problems (2 CPU cores, float64, log Z and all marginals): seconds
#: per clique element of the order's cost, and per elimination step.
SECONDS_PER_ELEMENT = 1e-8
SECONDS_PER_STEP = 1e-3

#: Seconds per unit of search work (a score evaluated, a neighbour visited), measured on the
#: same machine: 0.17-0.38 µs over the fourteen deterministic runs on the UAI problems. It
#: only converts the contraction's predicted time into a work budget; nothing is timed.
SECONDS_PER_WORK = 3e-7

#: Default cap on the work of one search: what 0.3 s of restarts did on the reference
#: machine (the former ``time_budget``).
DEFAULT_MAX_WORK = 1_000_000


@dataclass
class OrderSearch:
    """The chosen order and how it was found."""

    order: list[int]
    cost: float          # Σ_v |clique(v)| in joint states
    max_clique: float    # largest |clique(v)|
    heuristic: str
    restarts: int
    seconds: float       # wall time taken (information only: no decision depends on it)
    work: int = 0        # search work spent, in the units of SECONDS_PER_WORK


def predicted_seconds(cost: float, steps: int) -> float:
    """Predicted time to contract (log Z and marginals) along an order of this cost."""
    return cost * SECONDS_PER_ELEMENT + steps * SECONDS_PER_STEP


class _Graph:
    """Interaction graph on local ids 0..n-1 as bitsets, with cardinality classes."""

    def __init__(self, scopes: Sequence[Sequence[int]], cards: dict[int, int],
                 variables: Sequence[int]):
        self.labels = list(dict.fromkeys(variables))
        local = {v: i for i, v in enumerate(self.labels)}
        self.n = len(self.labels)
        self.cards = [int(cards[v]) for v in self.labels]
        adj = [0] * self.n
        for scope in scopes:
            ids = [local[v] for v in scope if v in local]
            mask = 0
            for i in ids:
                mask |= 1 << i
            for i in ids:
                adj[i] |= mask
        self.adj = [a & ~(1 << i) for i, a in enumerate(adj)]
        classes: dict[int, int] = {}
        for i, c in enumerate(self.cards):
            classes[c] = classes.get(c, 0) | (1 << i)
        self.classes = list(classes.items())   # (cardinality, bitmask of its variables)


def _greedy(g: _Graph, heuristic: str, rng: random.Random | None, noise: float,
            bound: float = math.inf):
    """One greedy elimination: ``(found, work)``, ``found`` = ``(order, cost, largest)`` or
    None past ``bound``; ``work`` counts scores evaluated and neighbours visited."""
    adj = list(g.adj)
    work = 0
    cards, classes = g.cards, g.classes

    single = classes[0][0] if len(classes) == 1 else None

    def clique(v: int) -> int:
        if single is not None:
            return single ** (adj[v].bit_count() + 1)
        size = cards[v]
        for c, mask in classes:
            k = (adj[v] & mask).bit_count()
            if k:
                size *= c ** k
        return size

    def score(v: int) -> float:
        nonlocal work
        work += 1 + (adj[v].bit_count() if heuristic == "fill" else len(classes))
        size = clique(v)
        if heuristic == "fill":
            nb, x, fill = adj[v], adj[v], 0
            while x:
                low = x & -x
                x ^= low
                missing = nb & ~adj[low.bit_length() - 1] & ~low
                if missing:
                    if single is not None:
                        fill += missing.bit_count()
                    else:
                        fill += cards[low.bit_length() - 1] * sum(
                            c * (missing & mask).bit_count() for c, mask in classes)
            if single is not None:
                fill *= single * single
            s = math.log1p(fill / 2) + 1e-3 * math.log(size)
        else:
            s = math.log(size)
        if rng is not None:
            s += noise * rng.random()
        return s

    version = [0] * g.n
    heap = [(score(v), v, 0) for v in range(g.n)]
    heapq.heapify(heap)
    done = [False] * g.n
    order, total, largest = [], 0, 0
    while heap:
        _, v, ver = heapq.heappop(heap)
        if done[v] or ver != version[v]:
            continue
        size = clique(v)
        total += size
        if total > bound:
            return None, work
        largest = max(largest, size)
        done[v] = True
        order.append(v)
        nb, bit = adj[v], 1 << v
        around = 0
        x = nb
        while x:
            low = x & -x
            x ^= low
            a = low.bit_length() - 1
            adj[a] = (adj[a] | nb) & ~low & ~bit
            if heuristic == "fill":
                around |= adj[a]
        touched = nb
        # a non-neighbour's fill changes only if it sees two of v's neighbours (a new edge)
        x = around & ~nb & ~bit
        work += nb.bit_count() + x.bit_count()
        while x:
            low = x & -x
            x ^= low
            if (adj[low.bit_length() - 1] & nb).bit_count() >= 2:
                touched |= low
        x = touched
        while x:
            low = x & -x
            x ^= low
            a = low.bit_length() - 1
            if not done[a]:
                version[a] += 1
                heapq.heappush(heap, (score(a), a, version[a]))
    return (order, total, largest), work


def _lower_bounds(g: _Graph) -> tuple[int, int]:
    """``(cost, largest)`` that no elimination order of ``g`` can beat. Each edge {u, v} is
    in the clique of whichever endpoint goes first, so that clique holds d_u d_v states and
    a clique of u holds d_u Π d_v over the edges it takes, which is at least
    d_u (1 + Σ (d_v - 1)): cost >= Σ_v d_v + Σ_edges (d_u d_v - max(d_u, d_v)), largest >=
    max(d_u d_v, d_v). Both are reached by eliminating a chain (any forest of one
    cardinality) from its ends, so no restart can improve on such an order."""
    cost = sum(g.cards)
    largest = max(g.cards, default=0)
    for v, a in enumerate(g.adj):
        x = a >> (v + 1)
        while x:
            low = x & -x
            x ^= low
            u = v + low.bit_length()
            du, dv = g.cards[u], g.cards[v]
            cost += du * dv - max(du, dv)
            largest = max(largest, du * dv)
    return cost, largest


def elimination_order(scopes: Sequence[Sequence[int]], cards: dict[int, int],
                      variables: Sequence[int], time_budget: float | None = None,
                      seed: int = 0, min_restarts: int = 2, search_fraction: float = 0.05,
                      noise: float = 0.5, *, max_work: float | None = None,
                      effort: float = 1.0, max_restarts: int | None = None) -> OrderSearch:
    """Search an elimination order for ``variables`` given factor ``scopes``.

    The result depends only on the arguments, never on the machine's speed or load.

    Args:
        scopes: label tuples of the operands (other labels, e.g. the batch, are ignored).
        cards: label -> cardinality.
        variables: the labels to eliminate.
        time_budget: deprecated (it made the order depend on machine load); converted to
            ``max_work = time_budget / SECONDS_PER_WORK``, with a DeprecationWarning.
        seed: seeds the restarts (runs are deterministic given their count).
        min_restarts: runs always made (the first two are the deterministic ``fill`` and
            ``weight`` runs).
        search_fraction: stop once the search work, at :data:`SECONDS_PER_WORK`, reaches this
            fraction of the predicted contraction time of the best order found (see
            :func:`predicted_seconds`).
        noise: amplitude of the random perturbation of scores in restarts.
        max_work: at most this much search work (default :data:`DEFAULT_MAX_WORK`).
        effort: multiplies both work budgets (0: only the ``min_restarts`` runs; 10: ten
            times longer searches).
        max_restarts: at most this many runs in all (default: no cap beyond the work).

    Raises:
        ValueError: a negative ``effort``, ``max_work`` or ``time_budget``.
    """
    if time_budget is not None:
        warnings.warn("elimination_order(time_budget=...) is deprecated: the search is "
                      "budgeted in work (max_work, effort) so that it does not depend on "
                      "machine load", DeprecationWarning, stacklevel=2)
        if not float(time_budget) >= 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {time_budget!r}")
        if max_work is None:
            max_work = float(time_budget) / SECONDS_PER_WORK
    max_work = DEFAULT_MAX_WORK if max_work is None else max_work
    if not float(max_work) >= 0 or not float(effort) >= 0:
        raise ValueError(f"max_work and effort must be >= 0, got {max_work!r}, {effort!r}")
    start = time.perf_counter()
    g = _Graph(scopes, cards, variables)
    rng = random.Random(seed)
    best: OrderSearch | None = None
    runs = work = 0
    bounds = None
    while True:
        heuristic = ("fill", "weight")[runs % 2]
        r = rng if runs >= 2 else None
        bound = math.inf if best is None else best.cost
        found, spent = _greedy(g, heuristic, r, noise, bound if r else math.inf)
        runs += 1
        work += spent
        if found is not None:
            order, total, largest = found
            if best is None or (total, largest) < (best.cost, best.max_clique):
                best = OrderSearch([g.labels[i] for i in order], float(total), float(largest),
                                   heuristic + ("+noise" if r else ""), runs, 0.0)
        if g.n <= 1:
            break
        if runs >= min_restarts:
            if bounds is None:
                bounds = _lower_bounds(g)
            if (best.cost, best.max_clique) <= bounds:
                break  # optimal: no restart can replace it (a chain, a tree)
            allowed = effort * min(
                max_work, search_fraction * predicted_seconds(best.cost, g.n) / SECONDS_PER_WORK)
            if work > allowed or (max_restarts is not None and runs >= max_restarts):
                break
    best.restarts = runs
    best.work = work
    best.seconds = time.perf_counter() - start
    return best
