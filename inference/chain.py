"""The exact engine's path for chains: the forward recursion in log space.

When every prepared operand of an exact query spans at most two free variables and those
pairs link the variables into simple paths (a linear-chain CRF over an array, with any
unaries, padding clamps, probes and evidence slices), the contraction is the forward
algorithm of pytorch-crf and torch-struct: per step one broadcast sum ``(N, d, d)`` and one
log-sum-exp. :func:`find_chain` detects that shape from the operands' labels alone;
:func:`chain_log_z` and :func:`chain_map` run it. The general executor
(``contract.contract_path``) computes the same contraction along the same order (the chain
eliminated from one end), but through scaled linear operands made for every table before
the first step: on a padded chain of 512 steps that set-up alone costs as much as the whole
recursion (docs/benchmarks.md, "Linear chains").

Exact at any scale: each log-sum-exp is shifted by its own row maximum (its largest term is
exp(0) = 1), so potentials of hundreds or thousands of nats lose nothing; an all -inf row
gives -inf with a zero, not NaN, gradient. Marginals are gradients of log Z with respect to
the probes, as on the general path; MAP is max-sum with back-pointers (``argmax``: the first
maximal state on ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import BATCH
from .scaled import safe_log

__all__ = ["Chain", "find_chain", "chain_cost", "chain_log_z", "chain_map"]


@dataclass(frozen=True)
class Chain:
    """Where each operand goes in the recursion.

    Attributes:
        paths: the free variables' labels, one list per path, in elimination order.
        unary: label -> indices of the operands over that label alone.
        pair: ``(u, v)`` consecutive on a path -> ``[(index, transposed)]``, the operands
            over both (``transposed``: laid out ``(v, u)``).
        constant: indices of the operands over the batch label only.
    """

    paths: tuple[tuple[int, ...], ...]
    unary: dict
    pair: dict
    constant: tuple[int, ...]


def find_chain(labels) -> Chain | None:
    """The :class:`Chain` of operands labelled ``labels`` (each ``(BATCH, ...)``), or None
    when they do not form paths: an operand over three or more variables, a variable with
    three neighbours, or a cycle. Linear in the number of operands."""
    unary: dict = {}
    pair: dict = {}
    constant = []
    neighbours: dict = {}
    for k, lab in enumerate(labels):
        if not lab or lab[0] != BATCH:
            return None
        free = lab[1:]
        if len(free) > 2 or (len(free) == 2 and free[0] == free[1]):
            return None
        if not free:
            constant.append(k)
        elif len(free) == 1:
            unary.setdefault(free[0], []).append(k)
            neighbours.setdefault(free[0], set())
        else:
            u, v = free
            pair.setdefault(frozenset(free), []).append((k, u, v))
            neighbours.setdefault(u, set()).add(v)
            neighbours.setdefault(v, set()).add(u)
            if len(neighbours[u]) > 2 or len(neighbours[v]) > 2:
                return None
    paths, seen = [], set()
    for start in sorted(neighbours):
        if start in seen or len(neighbours[start]) > 1:
            continue
        path, prev, at = [start], None, start
        seen.add(start)
        while True:
            nxt = [x for x in neighbours[at] if x != prev]
            if not nxt:
                break
            prev, at = at, nxt[0]
            path.append(at)
            seen.add(at)
        paths.append(tuple(path))
    if len(seen) != len(neighbours):
        return None  # the rest lies on cycles
    ordered = {}
    for path in paths:
        for u, v in zip(path, path[1:]):
            ordered[(u, v)] = [(k, a != u) for k, a, _ in pair[frozenset((u, v))]]
    return Chain(tuple(paths), unary, ordered, tuple(constant))


def chain_cost(chain: Chain, cards: dict, inputs: int, query: str = "grad") -> dict:
    """What running ``chain`` holds at its peak beyond its operands, in elements (the exact
    engine adds the operands, the allocator margin and torch's fixed overhead, as for the
    general path's estimate).

    With ``S_i = N d_u d_v`` the broadcast table of step i, ``top = max S_i``, ``D = Σ_v N
    d_v`` and ``width = N max d_v``, by ``query``:

    * ``"grad"`` (marginals, or log Z differentiable in the potentials): autograd keeps
      each step's exponentials and a table per variable, and a step makes about three
      tables at a time: Σ S_i + 3 top + 2 D; ``"factor"`` (factor marginals too): Σ S_i +
      3 top + 3 D (the pairwise gradients replace the exponentials backward frees);
    * ``"sum"`` (log Z, nothing to differentiate): one step's tables at a time, 4 top +
      4 width;
    * ``"map"``: the back-pointers and two step tables at a time: 3 top + 2 D;

    plus 64 for scalars. Measured against the live-tensor peak in tests/test_chain.py
    (within 1x-2x). ``inputs``: the operands' elements, added to ``peak``."""
    steps = [cards[BATCH] * cards[u] * cards[v] for path in chain.paths
             for u, v in zip(path, path[1:])]
    variables = [cards[BATCH] * cards[v] for path in chain.paths for v in path]
    top, total, per_variable = max(steps, default=0), sum(steps), sum(variables)
    held = 64 + {
        "grad": lambda: total + 3 * top + 2 * per_variable,
        "factor": lambda: total + 3 * top + 3 * per_variable,
        "sum": lambda: 4 * top + 4 * max(variables, default=0),
        "map": lambda: 3 * top + 2 * per_variable,
    }[query]()
    return {"peak": inputs + held, "held": held, "largest_intermediate": top,
            "flops": total}


def _lse(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp along ``dim``, each row shifted by its own max (-inf clamped to the lowest
    float): exact for any finite or -inf entries, zero gradient on an all -inf row."""
    s = t.detach().amax(dim, keepdim=True).clamp(min=torch.finfo(t.dtype).min)
    return safe_log((t - s).exp().sum(dim)) + s.squeeze(dim)


def _unary(operands, chain: Chain, v: int, like: torch.Tensor, size: int) -> torch.Tensor:
    members = chain.unary.get(v, ())
    if not members:
        return like.new_zeros(like.shape[0], size)
    total = operands[members[0]]
    for k in members[1:]:
        total = total + operands[k]
    return total


def _pair(operands, chain: Chain, u: int, v: int) -> torch.Tensor:
    """``(N, d_u, d_v)``: the sum of the operands over (u, v)."""
    total = None
    for k, transposed in chain.pair[(u, v)]:
        t = operands[k].transpose(1, 2) if transposed else operands[k]
        total = t if total is None else total + t
    return total


def _start(operands, chain: Chain):
    like = operands[0]
    total = like.new_zeros(like.shape[0])
    for k in chain.constant:
        total = total + operands[k]
    return like, total


def chain_log_z(operands, chain: Chain, cards: dict) -> torch.Tensor:
    """``(N,)`` log Z: per path, α_{i+1}(y) = log Σ_x exp(α_i(x) + φ_i(x, y)) + u_{i+1}(y)."""
    like, log_z = _start(operands, chain)
    for path in chain.paths:
        alpha = _unary(operands, chain, path[0], like, cards[path[0]])
        for u, v in zip(path, path[1:]):
            step = alpha[:, :, None] + _pair(operands, chain, u, v)
            alpha = _lse(step, 1) + _unary(operands, chain, v, like, cards[v])
        log_z = log_z + _lse(alpha, 1)
    return log_z


def chain_map(operands, chain: Chain, cards: dict):
    """``(score (N,), {label: LongTensor (N,)})``: the best configuration by max-sum with
    back-pointers, and its score."""
    like, score = _start(operands, chain)
    value: dict[int, torch.Tensor] = {}
    for path in chain.paths:
        best = _unary(operands, chain, path[0], like, cards[path[0]])
        pointers = []
        for u, v in zip(path, path[1:]):
            step = best[:, :, None] + _pair(operands, chain, u, v)
            arg = step.argmax(1)
            best = step.gather(1, arg[:, None]).squeeze(1) + \
                _unary(operands, chain, v, like, cards[v])
            pointers.append(arg)
        state = best.argmax(-1)
        score = score + best.gather(1, state[:, None]).squeeze(1)
        value[path[-1]] = state
        for v, arg in zip(reversed(path[:-1]), reversed(pointers)):
            state = arg.gather(1, state[:, None]).squeeze(1)
            value[v] = state
    return score, value
