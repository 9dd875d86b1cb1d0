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

Strategy (docs/benchmarks.md): the two deterministic runs always happen. Then randomised
runs (each score multiplied by ``exp(noise * U)``, U uniform) repeat while they may pay
off: the search stops when it has spent ``search_fraction`` of the predicted contraction
time of the best order so far, or ``time_budget`` seconds, whichever is first. Small
problems therefore stop after the deterministic runs, large ones search longer. A run is
abandoned as soon as its running cost exceeds the best (branch and bound). Graphs are
bitsets (Python ints) so a run on a few hundred variables takes milliseconds.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OrderSearch", "elimination_order", "predicted_seconds"]

#: Calibrated on the UAI problems (2 CPU cores, float64, log Z and all marginals): seconds
#: per clique element of the order's cost, and per elimination step.
SECONDS_PER_ELEMENT = 1e-8
SECONDS_PER_STEP = 1e-3


@dataclass
class OrderSearch:
    """The chosen order and how it was found."""

    order: list[int]
    cost: float          # Σ_v |clique(v)| in joint states
    max_clique: float    # largest |clique(v)|
    heuristic: str
    restarts: int
    seconds: float


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
    """One greedy elimination; returns ``(order, cost, largest)`` or None past ``bound``."""
    adj = list(g.adj)
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
            return None
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
    return order, total, largest


def elimination_order(scopes: Sequence[Sequence[int]], cards: dict[int, int],
                      variables: Sequence[int], time_budget: float = 0.3, seed: int = 0,
                      min_restarts: int = 2, search_fraction: float = 0.05,
                      noise: float = 0.5) -> OrderSearch:
    """Search an elimination order for ``variables`` given factor ``scopes``.

    Args:
        scopes: label tuples of the operands (other labels, e.g. the batch, are ignored).
        cards: label -> cardinality.
        variables: the labels to eliminate.
        time_budget: at most this many seconds of randomised restarts.
        seed: seeds the restarts (runs are deterministic given their count).
        min_restarts: runs always made (the first two are the deterministic ``fill`` and
            ``weight`` runs).
        search_fraction: stop once the search has taken this fraction of the predicted
            contraction time of the best order found (see :func:`predicted_seconds`).
        noise: amplitude of the random perturbation of scores in restarts.
    """
    start = time.perf_counter()
    g = _Graph(scopes, cards, variables)
    rng = random.Random(seed)
    best: OrderSearch | None = None
    runs = 0
    while True:
        heuristic = ("fill", "weight")[runs % 2]
        r = rng if runs >= 2 else None
        bound = math.inf if best is None else best.cost
        found = _greedy(g, heuristic, r, noise, bound if r else math.inf)
        runs += 1
        if found is not None:
            order, total, largest = found
            if best is None or (total, largest) < (best.cost, best.max_clique):
                best = OrderSearch([g.labels[i] for i in order], float(total), float(largest),
                                   heuristic + ("+noise" if r else ""), runs, 0.0)
        elapsed = time.perf_counter() - start
        if g.n <= 1:
            break
        if runs >= min_restarts and (
                elapsed > time_budget
                or elapsed > search_fraction * predicted_seconds(best.cost, g.n)):
            break
    best.restarts = runs
    best.seconds = time.perf_counter() - start
    return best
