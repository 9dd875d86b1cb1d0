"""Asynchronous mean-field (MATH.md §5, Algorithm 1): frames exchange messages through a store.

Each sequence of the batch is one sequence of a :class:`~fieldlib.inference.messages.
MessageStore`. Frames are visited in a configurable order (vectorised over the sequences of
the batch: position t of every sequence at once); a visited frame

1. reads its incoming messages from the store (Eq. 10: discount ``d``, scale ``h``, at most
   ``capacity`` messages a sequence);
2. alternates its Q_i and its own view of Q_I (``inner_iterations``, Eq. 5, 6;
   :func:`~fieldlib.inference.asynchronous_step.local_update`);
3. writes its outgoing messages (what its coupled factors send: K for ``KernelTemporal``,
   H for ``FrameIntent``; fieldlib.factors.stored).

With d = 1, a capacity holding one fresh message per frame (the default: each sequence's length)
and h = the number averaged (``scale="count"``) or ``normalize=False`` with h = 1, the
messages read are the exact sums of MATH.md §3, and a fixed point of this schedule is a fixed
point of :class:`~fieldlib.inference.meanfield.MeanField`: on weakly coupled fields (a unique
fixed point) both engines reach it (tested to 1e-6). With d < 1 or a small capacity it is
the paper's approximation.

The graph needs one VariableArray of frames with a coupled temporal factor
(``KernelTemporal``), every other factor either on one frame or on the intent alone, or a
coupled factor that supports stored messages (``FrameIntent``; fieldlib.factors.stored).
A UAI or .fg model (no sequences) is refused with a FieldlibError naming the engines that
apply. The reported Q_I is the exact update from every frame's final Q_i (Eq. 6); the ELBO is
computed from the final marginals.
"""

from __future__ import annotations

import math
import time

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError
from fieldlib.factors import FixedBeliefs, FrameIntent, KernelTemporal
from fieldlib.factors.stored import check_finite_table, stored_coupling

from .asynchronous_step import local_update
from .base import Engine, Result, register_engine
from .messages import MessageStore

__all__ = ["AsynchronousMeanField", "ORDERS", "frame_potentials", "split_graph"]

ORDERS = ("forward", "backward", "random")

#: Engines that take any graph (named in the error for a graph without sequences).
OTHER_ENGINES = "meanfield, exact or bruteforce"


# -- the graph ----------------------------------------------------------------------------------
def split_graph(graph):
    """``(frames, KernelTemporal, FrameIntent or None, unary factors, {id(frame var): t})``
    of a graph the ``async`` engine takes; FieldlibError (naming the engines that apply)
    for any other graph."""
    temporal = [f for f in graph.factors if isinstance(f, KernelTemporal)]
    if not temporal:
        raise FieldlibError(
            "engine 'async' needs sequences: a VariableArray of frames with a coupled "
            "temporal factor (KernelTemporal), and this graph has none (a UAI or .fg "
            f"model has no sequences); use {OTHER_ENGINES}")
    if len(temporal) > 1 or len({id(f.frames) for f in temporal}) > 1:
        raise FieldlibError("engine 'async': one KernelTemporal factor is supported, got "
                            f"{len(temporal)}")
    kt = temporal[0]
    frames = kt.frames
    intents = [f for f in graph.factors if isinstance(f, FrameIntent)]
    if len(intents) > 1 or (intents and intents[0].frames is not frames):
        raise FieldlibError("engine 'async': at most one FrameIntent on the frames of the "
                            "KernelTemporal factor is supported")
    fi = intents[0] if intents else None
    position = {id(v): t for t, v in enumerate(frames)}
    unary = []
    for f in graph.factors:
        if f is kt or f is fi:
            continue
        if stored_coupling(f) is not None:
            raise FieldlibError(f"engine 'async': a second coupled factor {f.label} is not "
                                f"supported")
        for term in f.terms():
            ok = len(term.variables) == 1 and (
                id(term.variables[0]) in position
                or (fi is not None and term.variables[0] is fi.intent))
            if not ok:
                raise FieldlibError(
                    f"engine 'async': factor {f.label} couples "
                    f"{', '.join(v.name for v in term.variables)} and does not support "
                    f"stored messages (fieldlib.factors.stored); use {OTHER_ENGINES}")
        unary.append(f)
    others = [v for v in graph.standalone_variables()
              if fi is None or v is not fi.intent]
    if others:
        raise FieldlibError(f"engine 'async': variable {others[0].name} is not a frame of "
                            f"the sequence nor its intent; use {OTHER_ENGINES}")
    if len(graph.arrays) > 1:
        raise FieldlibError("engine 'async': one VariableArray of frames is supported, "
                            f"got {len(graph.arrays)}; use {OTHER_ENGINES}")
    return frames, kt, fi, unary, position


def frame_potentials(graph):
    """``(unary (N, T, S), intent_unary (N, N_I) or None)``: every frame's φX (the sum of
    the one-frame factors' tables on its states) and the intent's own log-potentials,
    differentiable in the factors' tensors (what :func:`~fieldlib.inference.
    asynchronous_step.asynchronous_step` takes as ``unary``)."""
    frames, kt, fi, unary_factors, position = split_graph(graph)
    n = graph.batch_size or 1
    unary = [torch.zeros((), dtype=graph.dtype, device=graph.device)] * frames.size
    intent_unary = None
    for f in unary_factors:
        for term in f.terms():
            v = term.variables[0]
            table = term.table.to(graph.dtype)
            table = table if term.batched else table.expand(n, *table.shape)
            if id(v) in position:
                unary[position[id(v)]] = unary[position[id(v)]] + table
            else:
                intent_unary = table if intent_unary is None else intent_unary + table
    shape = (n, frames.cardinality)
    unary = torch.stack([u.expand(shape) for u in unary], 1)
    if fi is not None and intent_unary is None:
        intent_unary = torch.zeros(n, fi.intent.cardinality, dtype=graph.dtype,
                                   device=graph.device)
    return unary, intent_unary


@register_engine("async")
class AsynchronousMeanField(Engine):
    """Asynchronous mean-field with a message store (Algorithm 1; module docstring).

    Args:
        discount: d in [0, 1] of Eq. 10 (1: plain average; the paper's training: 0.9).
        scale: h of Eq. 10: ``"count"`` (h = the number of messages averaged, so that with
            d = 1 the average is the plain sum), ``"frames"`` (h = the number of distinct
            other frames among them; the same as "count" while each frame has one stored
            message, as in this engine's passes) or a number.
        normalize: divide by Σ d^r (Eq. 10); False: h · Σ d^r k f.
        capacity: messages kept per sequence (None: the sequence's length, one per frame).
        inner_iterations: Q_i / Q_I alternations per visited frame (default 5).
        passes: maximum number of passes over the frames.
        tol: stop when no probability changed by more than ``tol`` in a pass.
        order: the order frames are visited in, the same in every pass (so that the last
            T messages of a sequence are one per frame): ``"forward"``, ``"backward"`` or
            ``"random"`` (one random permutation drawn per call).
        seed: seed of the ``"random"`` permutation.

    Raises:
        FieldlibError: a bad option; at call time a graph without a VariableArray with a
        ``KernelTemporal`` factor, or with a coupled factor that does not support stored
        messages; UnsupportedQueryError for MAP and factor marginals.
    """

    supports = frozenset({"marginals", "elbo"})

    def __init__(self, discount: float = 1.0, scale: str = "count", normalize: bool = True,
                 capacity: int | None = None, inner_iterations: int = 5, passes: int = 200,
                 tol: float = 1e-10, order: str = "forward", seed: int = 0):
        if not 0.0 <= float(discount) <= 1.0:
            raise FieldlibError(f"async: discount must lie in [0, 1], got {discount}")
        if isinstance(scale, str) and scale not in ("count", "frames"):
            try:
                scale = float(scale)
            except ValueError:
                raise FieldlibError(f"async: scale must be 'count', 'frames' or a number, got "
                                    f"{scale!r}") from None
        if order not in ORDERS:
            raise FieldlibError(f"async: order must be one of {ORDERS}, got {order!r}")
        if capacity is not None and int(capacity) < 1:
            raise FieldlibError(f"async: capacity must be >= 1, got {capacity}")
        if int(inner_iterations) < 1 or int(passes) < 1:
            raise FieldlibError("async: inner_iterations and passes must be >= 1")
        self.discount, self.scale, self.normalize = float(discount), scale, bool(normalize)
        self.capacity, self.inner_iterations = capacity, int(inner_iterations)
        self.passes, self.tol, self.order, self.seed = int(passes), float(tol), order, int(seed)

    def run(self, graph, evidence, *, marginals, factor_marginals, map) -> Result:
        if map or factor_marginals:
            raise UnsupportedQueryError("engine 'async' gives marginals and the ELBO only")
        start = time.perf_counter()
        frames, kt, fi, _, position = split_graph(graph)
        n = graph.batch_size or 1
        batched = graph.batch_size is not None
        dtype = graph.dtype
        device = graph.device
        t_len, s = frames.size, frames.cardinality
        with torch.no_grad():
            unary, intent_unary = frame_potentials(graph)
            unary = unary.clone()
            for v, value in graph.evidence(evidence).items():
                value = value.to(device).long().reshape(-1).expand(n)
                keep = torch.nn.functional.one_hot(value, v.cardinality).bool()
                if id(v) in position:
                    t = position[id(v)]
                    unary[:, t] = unary[:, t].masked_fill(~keep, float("-inf"))
                elif fi is not None and v is fi.intent:
                    intent_unary = intent_unary.masked_fill(~keep, float("-inf"))
            mu = kt.mu.detach().to(dtype).expand(n, *kt.mu.shape[-2:])
            times = kt.times.detach().to(torch.float64).expand(n, t_len)
            table = None
            if fi is not None:
                table = fi.table.detach().to(dtype).expand(n, *fi.table.shape[-3:])
                check_finite_table(table, f"engine 'async': {fi.label}")
            lengths = frames.lengths
            length = (torch.full((n,), t_len, device=device) if lengths is None
                      else torch.as_tensor(lengths, device=device).reshape(-1).expand(n))
        temporal = stored_coupling(kt)
        intent = stored_coupling(fi) if fi is not None else None
        fields = dict(temporal.fields())
        if intent is not None:
            fields.update(intent.fields())
        # one store per sequence length, so that the default capacity (the length) holds
        # one message a frame of every sequence (padded frames never write)
        groups = []
        for size in torch.unique(length).tolist():
            store = MessageStore({k: v[0] for k, v in fields.items()},
                                 temporal=[k for k, v in fields.items() if v[1]],
                                 capacity=self.capacity or max(int(size), 1), kernel=kt.kernel,
                                 discount=self.discount, scale=self.scale,
                                 normalize=self.normalize, dtype=dtype, device=device)
            groups.append((int(size), (length == size).nonzero().flatten(), store))
        seq = torch.arange(n, device=device)
        q = torch.zeros(n, t_len, s, dtype=dtype, device=device)
        q_intent_local = None
        order = self._order(t_len)
        iteration, converged, change, passes = 0, False, math.inf, 0
        trace = []
        with torch.no_grad():
            for p in range(self.passes):
                before = q.clone()
                for t, (size, rows, store) in ((t, g) for t in order for g in groups):
                    if t >= size:
                        continue
                    fr = torch.full((rows.numel(),), int(t), device=device)
                    inc = store.read(seq[rows], fr, times[rows, t])
                    q_t, q_i = local_update(
                        unary[rows, t], inc, temporal=temporal, mu=mu[rows], intent=intent,
                        table=None if table is None else table[rows, t],
                        intent_unary=None if intent_unary is None else intent_unary[rows],
                        inner_iterations=self.inner_iterations)
                    out = temporal.send(q_t)
                    if intent is not None:
                        out.update(intent.send(q_t, table=table[rows, t]))
                    store.write(seq[rows], fr, times[rows, t], out, iteration)
                    iteration += 1
                    q[rows, t] = q_t
                    q_intent_local = q_i
                change = float((q - before).abs().max())
                passes = p + 1
                trace.append({"pass": passes, "max_change": change})
                if change <= self.tol:
                    converged = True
                    break
        del q_intent_local
        marg = {frames.name: q}
        for v in frames:
            marg[v.name] = q[:, position[id(v)]]
        if fi is not None:
            h = intent.send(q.reshape(n * t_len, s),
                            table=table.reshape(n * t_len, *table.shape[-2:]))["H"]
            valid = (torch.arange(t_len, device=device)[None, :] < length[:, None])
            h = (h.reshape(n, t_len, -1) * valid[..., None]).sum(1)
            marg[fi.intent.name] = torch.softmax(h + intent_unary, -1)
        elbo = self._elbo(graph, marg, n, frames, fi)
        if not batched:
            marg = {k: v[0] for k, v in marg.items()}
            elbo = elbo[0]
        info = {"passes": passes, "converged": converged, "max_change": change,
                "iterations": iteration, "seconds": time.perf_counter() - start}
        return Result("async", elbo=elbo, marginals=marg if marginals else None, trace=trace,
                      info=info)

    def _order(self, t_len: int) -> list[int]:
        if self.order == "forward":
            return list(range(t_len))
        if self.order == "backward":
            return list(range(t_len))[::-1]
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(t_len, generator=gen).tolist()

    @staticmethod
    def _elbo(graph, marg, n, frames, fi) -> torch.Tensor:
        """E_Q[score] + H(Q) from the final marginals (each factor's expected energy)."""
        with torch.no_grad():
            beliefs = FixedBeliefs(marg, n)
            energy = sum(f.expected_energy(beliefs) for f in graph.factors)
            ent = -torch.special.xlogy(marg[frames.name], marg[frames.name]).sum((-1, -2))
            if fi is not None:
                qi = marg[fi.intent.name]
                ent = ent - torch.special.xlogy(qi, qi).sum(-1)
            return (energy + ent).reshape(n)
