"""Exact engines: BruteForce (the enumeration oracle) and VariableElimination.

Both work in log space and are differentiable: ``result.log_z`` back-propagates to every
potential that requires grad. Marginals are gradients of log Z with respect to zero probe
tables (VariableElimination) or sums of the normalised joint (BruteForce, independently).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from fieldlib.errors import FieldlibError, TooLargeError
from fieldlib.io.budget import available_memory as host_memory

from .base import Engine, register_engine
from .chain import chain_cost, chain_log_z, chain_map, find_chain
from .contract import (
    BATCH,
    FIXED_OVERHEAD,
    MARGIN,
    backtrack,
    contract_path,
    path_cost,
    plan_order,
    plan_path,
)
from .ordering import elimination_order
from .prepare import check_finite, compute_dtype, finish, prepare

__all__ = ["BruteForce", "VariableElimination", "available_memory"]


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free on ``device`` (MemAvailable on the CPU, free memory on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory()


def _grads(output, inputs, retain: bool):
    if not inputs:
        return []
    return torch.autograd.grad(output, inputs, retain_graph=retain, allow_unused=True)


@register_engine("bruteforce")
class BruteForce(Engine):
    """Enumerate every joint configuration of the free variables.

    Args:
        max_states: refuse (TooLargeError naming the count) above this many joint states
            per batch element.
    """

    supports = frozenset({"log_z", "marginals", "map"})

    def __init__(self, max_states: int = 2**22):
        if not max_states >= 1:
            raise FieldlibError(f"max_states must be >= 1, got {max_states!r}")
        self.max_states = int(max_states)

    def run(self, graph, evidence, *, marginals, factor_marginals, map):
        observed = graph.evidence(evidence) if graph.variables else {}
        states = math.prod(v.cardinality for v in graph.variables.values()
                           if v not in observed or bool((observed[v] < 0).any()))
        if states > self.max_states:  # before anything of that size is allocated
            raise TooLargeError(
                f"brute force would enumerate {states:,} joint states, above max_states="
                f"{self.max_states:,}; use the 'exact' engine (variable elimination)"
            )
        prep = prepare(graph, evidence, probes=False, factor_marginals=factor_marginals)
        free = prep.free
        position = {graph.index(v): k for k, v in enumerate(free)}
        n = len(free)
        joint = torch.zeros((prep.batch, *(v.cardinality for v in free)), dtype=prep.dtype,
                            device=prep.device)
        with torch.enable_grad() if factor_marginals else contextlib.nullcontext():
            for table, lab in zip(prep.operands, prep.labels):
                axes = [position[x] for x in lab[1:]]
                perm = [0] + [1 + i for i in sorted(range(len(axes)), key=axes.__getitem__)]
                t = table.permute(perm)
                shape = [prep.batch] + [1] * n
                for a in sorted(axes):
                    shape[1 + a] = free[a].cardinality
                joint = joint + t.reshape(shape)
            flat = joint.reshape(prep.batch, -1)
            log_z = torch.logsumexp(flat, -1)
            check_finite(prep, log_z)
            var_marg = None
            if marginals:
                # softmax, not exp(joint - log Z): at scores near the dtype's max, log Z
                # rounds to the largest score and exp would give every top state 1
                p = torch.softmax(flat.detach(), -1).reshape(joint.shape)
                var_marg = {}
                for k, v in enumerate(free):
                    others = [1 + a for a in range(n) if a != k]
                    var_marg[v] = p.sum(dim=others) if others else p
            fgrads = None
            if factor_marginals:
                fgrads = _grads(log_z.sum(), prep.term_probes, retain=log_z.requires_grad)
            assignment = score = None
            if map:
                score, arg = flat.detach().amax(-1), flat.detach().argmax(-1)
                assignment = {}
                for k in reversed(range(n)):
                    d = free[k].cardinality
                    assignment[free[k]] = arg % d
                    arg = arg // d
        return finish(prep, self.name, log_z, var_marg, fgrads, assignment, score,
                      info={"joint_states": states})


@register_engine("exact")
class VariableElimination(Engine):
    """Exact inference by log-space tensor contraction along a searched elimination order.

    Args:
        memory_budget: bytes the contraction may use (default: half the memory available on
            the device at call time; ``math.inf``: no limit). Above it the engine refuses with
            TooLargeError naming the bytes it would need; it never starts a contraction that
            cannot fit. Fractional bytes are rounded up.
        order: ``"auto"`` (greedy weight / weighted min-fill with randomised restarts, see
            ordering.py) or ``"opt_einsum:NAME"`` to use one of opt_einsum's path optimisers
            (e.g. ``"opt_einsum:greedy"``).
        search_effort: how long the ``"auto"`` order search may go on, as a multiple of its
            default budget (0: only the two deterministic greedy runs; 10: ten times more
            randomised restarts). The budget is counted in search work, not seconds, so the
            same graph gets the same order, answer or refusal on a busy machine as on a
            quiet one.
        search_time: deprecated; kept for compatibility (a DeprecationWarning): converted to
            the same amount of search work as that many seconds on the reference machine
            (``ordering.SECONDS_PER_WORK``), so it no longer depends on machine load.
        seed: seeds the restarts.
        max_dense: refuse factors whose dense tables exceed this many elements.
        chain: run a query whose free variables form paths (a linear-chain CRF, padded or
            not, with any evidence) by the forward recursion in log space
            (inference/chain.py) instead of the general contraction: the same numbers to
            rounding, with no order search (``order`` does not apply) and its own memory
            estimate. False: always the general contraction.

    Raises:
        FieldlibError: a memory_budget that is not a positive number, an unknown order, a
            negative search_effort or search_time.

    Orders are cached by graph structure (labels and cardinalities), so repeated calls on
    graphs of the same shape (a training loop) search once.
    """

    supports = frozenset({"log_z", "marginals", "map"})

    def __init__(self, memory_budget: float | None = None, order: str = "auto",
                 search_effort: float = 1.0, search_time: float | None = None,
                 seed: int = 0, max_dense: int | None = None, chain: bool = True):
        import warnings

        from .ordering import DEFAULT_MAX_WORK, SECONDS_PER_WORK

        if memory_budget is not None:
            try:
                value = float(memory_budget)
            except OverflowError:  # an int beyond the float range: no practical limit
                value = math.inf if memory_budget > 0 else -math.inf
            except (TypeError, ValueError):
                value = math.nan
            if not value > 0:
                raise FieldlibError(f"memory_budget must be a positive number of bytes, got "
                                    f"{memory_budget!r}")
            memory_budget = math.ceil(memory_budget) if math.isfinite(value) else math.inf
        if order != "auto" and not (isinstance(order, str) and order.startswith("opt_einsum:")):
            raise FieldlibError(f"unknown order strategy {order!r}; use 'auto' or "
                                f"'opt_einsum:NAME' (e.g. 'opt_einsum:greedy')")
        if not float(search_effort) >= 0:
            raise FieldlibError(f"search_effort must be >= 0, got {search_effort!r}")
        self.max_work = DEFAULT_MAX_WORK
        if search_time is not None:
            if not float(search_time) >= 0:
                raise FieldlibError(f"search_time must be >= 0 seconds, got {search_time!r}")
            warnings.warn("VariableElimination(search_time=...) is deprecated: use "
                          "search_effort (the order search is budgeted in work, not seconds)",
                          DeprecationWarning, stacklevel=2)
            self.max_work = float(search_time) / SECONDS_PER_WORK
        self.memory_budget = memory_budget
        self.order = order
        self.search_effort = float(search_effort)
        self.search_time = search_time
        self.seed = seed
        self.max_dense = max_dense
        self.chain = bool(chain)
        self._cache: dict = {}
        self._chains: dict = {}

    def plan(self, labels, cards, free_labels):
        """``(Plan, PathCost, info)`` for operands with ``labels`` (cached by structure).

        The order (and so the path and its cost) is a function of the structure and the
        options alone: the search is budgeted in work, never in wall time."""
        key = (tuple(labels), tuple(sorted(cards.items())), self.order)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        info = {}
        if self.order == "auto":
            search = elimination_order(labels, cards, free_labels, seed=self.seed,
                                       max_work=self.max_work, effort=self.search_effort)
            plan = plan_order(labels, search.order, cards)
            info.update(heuristic=search.heuristic, restarts=search.restarts,
                        search_work=search.work)
        elif self.order.startswith("opt_einsum:"):
            plan = plan_path(labels, _opt_einsum_path(labels, cards, self.order.split(":", 1)[1]),
                             cards)
        else:  # pragma: no cover - rejected in __init__
            raise FieldlibError(f"unknown order strategy {self.order!r}")
        cost = path_cost(plan)
        info["order_seconds"] = time.perf_counter() - t0
        self._cache[key] = (plan, cost, info)
        return plan, cost, info

    def _chain(self, labels):
        """The operands' :class:`~.chain.Chain` when they form paths and ``chain`` is on
        (cached by structure, like the plan), else None."""
        if not self.chain:
            return None
        key = tuple(labels)
        if key not in self._chains:
            self._chains[key] = find_chain(labels)
        return self._chains[key]

    def run(self, graph, evidence, *, marginals, factor_marginals, map):
        t0 = time.perf_counter()
        budget = self.memory_budget
        if budget is None:  # measured before anything of the problem's size is allocated
            budget = available_memory(graph.device) // 2
        kwargs = {} if self.max_dense is None else {"max_dense": self.max_dense}
        itemsize = torch.empty((), dtype=compute_dtype(graph.dtype)).element_size()
        prep = prepare(graph, evidence, probes=marginals, factor_marginals=factor_marginals,
                       # each state: its probe, the probe's gradient, the marginal, a copy
                       max_probe_elements=budget / (4 * itemsize), engine="exact inference",
                       **kwargs)
        chain = self._chain(prep.labels)
        if chain is not None:  # no order to search: the recursion's own account
            inputs = sum(t.numel() for t in prep.operands)
            differentiable = torch.is_grad_enabled() and any(t.table.requires_grad
                                                             for t in prep.terms)
            query = "factor" if factor_marginals else \
                "grad" if marginals or differentiable else "sum"
            cost = chain_cost(chain, prep.cards, inputs, query)
            peak = cost["peak"]
            if map:
                peak = max(peak, chain_cost(chain, prep.cards, inputs, "map")["peak"])
            need = int(MARGIN * peak) * itemsize + FIXED_OVERHEAD
            info = {"path": "chain", "heuristic": "chain", "restarts": 0, "search_work": 0,
                    "order_seconds": 0.0, "largest_intermediate": cost["largest_intermediate"],
                    "flops": cost["flops"]}
        else:
            free_labels = [graph.index(v) for v in prep.free]
            plan, cost, info = self.plan(prep.labels, prep.cards, free_labels)
            need = cost.peak * itemsize + FIXED_OVERHEAD
            if map:
                need = max(need, cost.map_peak * itemsize + FIXED_OVERHEAD)
            info.update(path="contraction", largest_intermediate=cost.largest_intermediate,
                        flops=cost.flops)
        info.update(estimated_bytes=need, budget_bytes=budget)
        if need > budget:
            raise TooLargeError(
                f"exact inference would need about {need:,} bytes ({need / 2**30:.2f} GiB; "
                f"largest intermediate {info['largest_intermediate']:,} elements) but the memory "
                f"budget is {budget:,} bytes ({budget / 2**30:.2f} GiB); use a mean-field "
                f"engine or raise memory_budget"
            )
        grad_needed = marginals or factor_marginals
        with torch.enable_grad() if grad_needed else contextlib.nullcontext():
            if chain is not None:
                log_z = chain_log_z(prep.operands, chain, prep.cards)
            else:
                log_z, _ = contract_path(prep.operands, plan, "sum")
        check_finite(prep, log_z)
        user_grad = any(t.table.requires_grad for t in prep.terms)
        var_marg = fgrads = None
        if grad_needed:
            probes = list(prep.probes.values())
            inputs = probes + (prep.term_probes if factor_marginals else [])
            # keep the graph when the user's potentials need log Z's gradient later
            retain = torch.is_grad_enabled() and user_grad
            grads = _grads(log_z.sum(), inputs, retain=retain)
            if marginals:
                var_marg = {v: g.detach() for v, g in zip(prep.probes, grads[: len(probes)])}
            if factor_marginals:
                fgrads = [g.detach() for g in grads[len(probes):]]
        assignment = score = None
        if map:
            with torch.no_grad():
                ops = [t.detach() for t in prep.operands]
                if chain is not None:
                    score, labels_value = chain_map(ops, chain, prep.cards)
                else:
                    score, pointers = contract_path(ops, plan, "max")
                    labels_value = backtrack(pointers, prep.batch)
            assignment = {v: labels_value.get(graph.index(v),
                                              torch.zeros(prep.batch, dtype=torch.long,
                                                          device=prep.device))
                          for v in prep.free}
        info["seconds"] = time.perf_counter() - t0
        if not (user_grad and torch.is_grad_enabled()):
            log_z = log_z.detach()
        return finish(prep, self.name, log_z, var_marg, fgrads, assignment, score, info)


def _opt_einsum_path(labels, cards, optimizer: str):
    import opt_einsum

    symbols = {}
    for lab in labels:
        for x in lab:
            symbols.setdefault(x, opt_einsum.get_symbol(len(symbols)))
    eq = ",".join("".join(symbols[x] for x in lab) for lab in labels) + "->" + symbols[BATCH]
    shapes = [tuple(cards[x] for x in lab) for lab in labels]
    path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimizer)
    return path
