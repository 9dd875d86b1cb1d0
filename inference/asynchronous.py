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
fixed point) both engines reach it (tested to 1e-10; the engine warm-starts a frame's view
of Q_I from its previous Q_i, see local_update). With d < 1 or a small capacity it is
the paper's approximation.

The graph needs one VariableArray of frames and coupled factors that support stored messages
(``KernelTemporal``, ``FrameIntent``, or a user's type: ``stored_coupling()`` and
``stored_inputs(n)``, fieldlib.factors.stored), each with its own store and kernel; every
other factor is on one frame or on a coupled factor's latent variable (the intent). A UAI or
.fg model (no sequences) is refused with a FieldlibError naming the engines that apply. The
reported Q of a latent is the exact update from every frame's final Q_i (Eq. 6); the ELBO is
computed from the final marginals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError
from fieldlib.factors import FixedBeliefs
from fieldlib.factors.stored import stored_coupling

from .asynchronous_step import Coupled, local_update
from .base import Engine, Result, register_engine
from .messages import MessageStore

__all__ = ["AsynchronousMeanField", "ORDERS", "StoredGraph", "frame_potentials",
           "split_graph"]

ORDERS = ("forward", "backward", "random")

#: Engines that take any graph (named in the error for a graph without sequences).
OTHER_ENGINES = "meanfield, exact or bruteforce"


# -- the graph ----------------------------------------------------------------------------------
@dataclass
class StoredGraph:
    """A graph as the ``async`` engine sees it (:func:`split_graph`).

    Attributes:
        frames: the VariableArray of frames.
        coupled: ``[(factor, coupling, inputs)]``: each coupled factor, its
            :class:`~fieldlib.factors.stored.StoredCoupling` and its
            :class:`~fieldlib.factors.stored.StoredInputs` for the graph's N sequences.
        unary: the one-variable factors (on a frame, or on a coupling's latent variable).
        position: ``{id(frame variable): t}``.
        latents: the couplings' latent Variables, in the order of ``coupled`` (None where a
            coupling has none).
    """

    frames: object
    coupled: list
    unary: list
    position: dict
    latents: list


def split_graph(graph) -> StoredGraph:
    """The graph's frames, coupled factors and one-variable factors; FieldlibError (naming
    the engines that apply) for a graph the ``async`` engine cannot take: no coupled factor
    over a VariableArray (a UAI or .fg model has no sequences), coupled factors on different
    arrays or sharing a latent variable, a factor coupling variables without stored
    messages, a variable that is neither a frame nor a coupling's latent."""
    n = graph.batch_size or 1
    coupled = [(f, stored_coupling(f)) for f in graph.factors]
    coupled = [(f, c) for f, c in coupled if c is not None]
    if not coupled:
        raise FieldlibError(
            "engine 'async' needs sequences: a VariableArray of frames with a coupled "
            "factor that supports stored messages (KernelTemporal, FrameIntent), and this "
            f"graph has none (a UAI or .fg model has no sequences); use {OTHER_ENGINES}")
    entries, latents = [], []
    for f, c in coupled:
        inputs = f.stored_inputs(n)
        entries.append((f, c, inputs))
        if (c.latent_size is None) != (inputs.latent is None) or (
                inputs.latent is not None and inputs.latent.cardinality != c.latent_size):
            raise FieldlibError(f"engine 'async': {f.label}: its coupling's latent size "
                                f"{c.latent_size} does not match its latent variable")
        if inputs.latent is not None and any(v is inputs.latent for v in latents):
            raise FieldlibError(f"engine 'async': {f.label}: latent variable "
                                f"{inputs.latent.name} is coupled by two factors; one coupled "
                                f"factor a latent variable is supported")
        latents.append(inputs.latent)
        if c.latent_size is None and any(temporal for _, temporal in c.fields().values()) \
                and inputs.kernel is None:
            raise FieldlibError(f"engine 'async': {f.label} sends temporal fields but its "
                                f"stored_inputs() gives no kernel")
    frames = entries[0][2].frames
    if any(e[2].frames is not frames for e in entries):
        raise FieldlibError("engine 'async': the coupled factors must act on one "
                            f"VariableArray of frames; use {OTHER_ENGINES}")
    if len(graph.arrays) > 1:
        raise FieldlibError("engine 'async': one VariableArray of frames is supported, "
                            f"got {len(graph.arrays)}; use {OTHER_ENGINES}")
    position = {id(v): t for t, v in enumerate(frames)}
    latent_ids = {id(v) for v in latents if v is not None}
    unary = []
    for f in graph.factors:
        if any(f is e[0] for e in entries):
            continue
        for term in f.terms():
            ok = len(term.variables) == 1 and (id(term.variables[0]) in position
                                               or id(term.variables[0]) in latent_ids)
            if not ok:
                raise FieldlibError(
                    f"engine 'async': factor {f.label} couples "
                    f"{', '.join(v.name for v in term.variables)} and does not support "
                    f"stored messages (fieldlib.factors.stored); use {OTHER_ENGINES}")
        unary.append(f)
    others = [v for v in graph.standalone_variables() if id(v) not in latent_ids]
    if others:
        raise FieldlibError(f"engine 'async': variable {others[0].name} is not a frame of "
                            f"the sequence nor a coupled factor's latent; use {OTHER_ENGINES}")
    return StoredGraph(frames, entries, unary, position, latents)


def frame_potentials(graph, split: StoredGraph | None = None):
    """``(unary (N, T, S), {latent name: (N, N_I)})``: every frame's φX (the sum of the
    one-frame factors' tables on its states) and each latent variable's own log-potentials
    (zeros without any), differentiable in the factors' tensors (what
    :func:`~fieldlib.inference.asynchronous_step.asynchronous_step` takes as ``unary`` and
    ``intent_unary``)."""
    split = split_graph(graph) if split is None else split
    frames, position = split.frames, split.position
    n = graph.batch_size or 1
    zero = torch.zeros((), dtype=graph.dtype, device=graph.device)
    unary = [zero] * frames.size
    latent = {v.name: torch.zeros(n, v.cardinality, dtype=graph.dtype, device=graph.device)
              for v in split.latents if v is not None}
    for f in split.unary:
        for term in f.terms():
            v = term.variables[0]
            table = term.table.to(graph.dtype)
            table = table if term.batched else table.expand(n, *table.shape)
            if id(v) in position:
                unary[position[id(v)]] = unary[position[id(v)]] + table
            else:
                latent[v.name] = latent[v.name] + table
    shape = (n, frames.cardinality)
    return torch.stack([u.expand(shape) for u in unary], 1), latent


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
        coupled factor, or with a factor coupling variables that does not support stored
        messages (:func:`split_graph`); UnsupportedQueryError for MAP and factor marginals.
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

    def _store(self, coupling, kernel, size, dtype, device, **read) -> MessageStore:
        fields = coupling.fields()
        options = {"discount": self.discount, "scale": self.scale,
                   "normalize": self.normalize, **read}
        return MessageStore({k: v[0] for k, v in fields.items()},
                            temporal=[k for k, v in fields.items() if v[1]],
                            capacity=self.capacity or max(int(size), 1),
                            kernel=150.0 if kernel is None else kernel,
                            dtype=dtype, device=device, **options)

    def run(self, graph, evidence, *, marginals, factor_marginals, map) -> Result:
        if map or factor_marginals:
            raise UnsupportedQueryError("engine 'async' gives marginals and the ELBO only")
        start = time.perf_counter()
        split = split_graph(graph)
        frames, position = split.frames, split.position
        n = graph.batch_size or 1
        batched = graph.batch_size is not None
        dtype, device = graph.dtype, graph.device
        t_len, s = frames.size, frames.cardinality
        latent_pos = {id(v): k for k, v in enumerate(split.latents) if v is not None}
        with torch.no_grad():
            unary, latent_unary = frame_potentials(graph, split)
            unary = unary.clone()
            for v, value in graph.evidence(evidence).items():
                value = value.to(device).long().reshape(-1).expand(n)
                keep = torch.nn.functional.one_hot(value.clamp(min=0), v.cardinality).bool()
                keep = keep | (value < 0)[:, None]  # -1: unobserved in that element
                if id(v) in position:
                    t = position[id(v)]
                    unary[:, t] = unary[:, t].masked_fill(~keep, float("-inf"))
                elif id(v) in latent_pos:
                    latent_unary[v.name] = latent_unary[v.name].masked_fill(~keep,
                                                                            float("-inf"))
            coupled = []  # (coupling, frame params, sequence params, times, kernel, latent)
            for _, c, inputs in split.coupled:
                frame_p = {k: v.detach().to(dtype) for k, v in inputs.frame.items()}
                seq_p = {k: v.detach().to(dtype) for k, v in inputs.sequence.items()}
                times = (torch.arange(t_len, dtype=torch.float64, device=device)
                         if inputs.times is None else inputs.times.detach())
                times = times.to(torch.float64).expand(n, t_len)
                extra = None if inputs.latent is None else latent_unary[inputs.latent.name]
                coupled.append((c, frame_p, seq_p, times, inputs.kernel, extra))
            lengths = frames.lengths
            length = (torch.full((n,), t_len, device=device) if lengths is None
                      else torch.as_tensor(lengths, device=device).reshape(-1).expand(n))
        # one store per coupled factor and sequence length, so that the default capacity
        # (the length) holds one message a frame of every sequence (padded frames never
        # write), each with its factor's kernel
        groups = []
        for size in torch.unique(length).tolist():
            stores = [self._store(c, kernel, size, dtype, device)
                      for c, _, _, _, kernel, _ in coupled]
            groups.append((int(size), (length == size).nonzero().flatten(), stores))
        seq = torch.arange(n, device=device)
        q = torch.zeros(n, t_len, s, dtype=dtype, device=device)
        iteration, converged, change, passes = 0, False, math.inf, 0
        trace = []
        with torch.no_grad():
            for p in range(self.passes):
                before = q.clone()
                for t, (size, rows, stores) in ((t, g) for t in self._order(t_len)
                                                for g in groups):
                    if t >= size:
                        continue
                    fr = torch.full((rows.numel(),), int(t), device=device)
                    bound = _bound(coupled, rows, t)
                    incoming = [st.read(seq[rows], fr, c[3][rows, t])
                                for st, c in zip(stores, coupled)]
                    q_t, _ = local_update(unary[rows, t], bound, incoming,
                                          inner_iterations=self.inner_iterations,
                                          q_init=q[rows, t] if p else None)
                    for st, b, c in zip(stores, bound, coupled):
                        st.write(seq[rows], fr, c[3][rows, t],
                                 b.coupling.send(q_t, None, **b.params), iteration)
                    iteration += 1
                    q[rows, t] = q_t
                change = float((q - before).abs().max())
                passes = p + 1
                trace.append({"pass": passes, "max_change": change})
                if change <= self.tol:
                    converged = True
                    break
            marg = {frames.name: q}
            for v in frames:
                marg[v.name] = q[:, position[id(v)]]
            marg.update(self._latent_marginals(coupled, split.latents, q, groups, seq,
                                               dtype, device))
        elbo = self._elbo(graph, marg, n, frames, split.latents)
        if not batched:
            marg = {k: v[0] for k, v in marg.items()}
            elbo = elbo[0]
        info = {"passes": passes, "converged": converged, "max_change": change,
                "iterations": iteration, "seconds": time.perf_counter() - start}
        return Result("async", elbo=elbo, marginals=marg if marginals else None, trace=trace,
                      info=info)

    def _latent_marginals(self, coupled, latents, q, groups, seq, dtype, device) -> dict:
        """Each latent's Q (Eq. 6) from every frame's final Q_i: frame 0 reads the plain
        sum of the other frames' messages (d = 1, h = 1, no normalisation) and adds its own."""
        out = {}
        n = q.shape[0]
        for k, (c, _, _, times, kernel, extra) in enumerate(coupled):
            if latents[k] is None:
                continue
            logits = torch.zeros(n, c.latent_size, dtype=dtype, device=device)
            for size, rows, _ in groups:
                st = self._store(c, kernel, size, dtype, device, discount=1.0, scale=1.0,
                                 normalize=False)
                pos = torch.arange(size, device=device)
                r = rows.repeat_interleave(size)
                f = pos.repeat(rows.numel())
                every = _bound([coupled[k]], r, f)[0]
                st.write(seq[r], f, times[r, f], c.send(q[r, f], None, **every.params), 0)
                first = _bound([coupled[k]], rows, 0)[0]
                zero = torch.zeros(rows.numel(), dtype=torch.long, device=device)
                inc = st.read(seq[rows], zero, times[rows, 0])
                logits[rows] = c.latent_logits(inc, q[rows, 0], **first.params).to(dtype)
            out[latents[k].name] = torch.softmax(logits + extra, -1)
        return out

    def _order(self, t_len: int) -> list[int]:
        if self.order == "forward":
            return list(range(t_len))
        if self.order == "backward":
            return list(range(t_len))[::-1]
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(t_len, generator=gen).tolist()

    @staticmethod
    def _elbo(graph, marg, n, frames, latents) -> torch.Tensor:
        """E_Q[score] + H(Q) from the final marginals (each factor's expected energy)."""
        with torch.no_grad():
            beliefs = FixedBeliefs(marg, n)
            energy = sum(f.expected_energy(beliefs) for f in graph.factors)
            ent = -torch.special.xlogy(marg[frames.name], marg[frames.name]).sum((-1, -2))
            for v in latents:
                if v is not None:
                    ent = ent - torch.special.xlogy(marg[v.name], marg[v.name]).sum(-1)
            return (energy + ent).reshape(n)


def _bound(coupled, rows, t) -> list[Coupled]:
    """The couplings' :class:`Coupled` for the frames ``(rows, t)`` (``t`` an int or a
    tensor like ``rows``): per-frame tensors at those frames, per-sequence ones of ``rows``."""
    out = []
    for c, frame_p, seq_p, _, _, extra in coupled:
        params = {k: v[rows, t] for k, v in frame_p.items()}
        params.update({k: v[rows] for k, v in seq_p.items()})
        out.append(Coupled(c, params, latent_unary=None if extra is None else extra[rows]))
    return out
