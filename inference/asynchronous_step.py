"""One asynchronous training step (MATH.md §5, Algorithm 2) on a batch of sampled frames.

For B frames drawn from any sequences (repeats allowed), each with its own potentials:

1. read the frames' incoming messages from the store, one call for the batch (Eq. 10);
2. update Q_i and the frame's Q_I alternately (``inner_iterations``, default 5; the released
   code's), vectorised over the batch (Eq. 5, 6):

       Q_I(I) ∝ exp( Σ_{j≠i} H_j(I) + Σ_u Q_i(u) ψ_i(u, I) )
       Q_i(x) ∝ exp( φX_i(x) + Σ_I Q_I(I) ψ_i(c(x), I) + FA_i(x) + FB_i(x) )

   with FA_i = µ Σ_{j>i} w_ij K_j and FB_i = µᵀ Σ_{j<i} w_ij K_j from the stored K_j and the
   CURRENT µ;
3. the loss: the per-frame surrogate (MATH.md §6) with Q, Q_I and the target held fixed,

       loss = Σ_i [ Σ_x (Q_i - 1[x*_i]) φX_i + Σ_{u,I} (Q_i Q_I - 1[x*_i] P(I|x*)) ψ_i
                    + Σ_a K_i (FA_i + FB_i) - Σ_a K*_i (FA*_i + FB*_i) ] + l2/2 Σ ψ_i²

   whose autograd gradients are Eq. 7 (φX), Eq. 8 (ψ = φXI) and Eq. 9's row of frame i (µ),
   plus the L2 pull ``l2_intent · ψ``; P(I | x*) = softmax(Σ_{j≠i} H*_j + ψ_i(x*_i, ·));
4. write the frames' outgoing messages K, K*, H, H* (computed under no_grad) with the step's
   iteration.

Frames of one batch read before any of them writes: two frames of one sequence in a batch do
not see each other's messages of this step. No Python loop over frames or messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors.stored import (
    IntentCoupling,
    StoredCoupling,
    TemporalCoupling,
    check_finite_table,
)

__all__ = ["AsyncStep", "Coupled", "asynchronous_step", "local_update"]


@dataclass
class Coupled:
    """One coupled factor of a step: its :class:`~fieldlib.factors.stored.StoredCoupling`
    and its tensors for the step's B frames.

    Attributes:
        coupling: the coupling (e.g. ``factor.stored_coupling()``).
        params: ``{name: (B, ...)}`` keyword arguments of the coupling's methods (e.g.
            ``{"mu": µ}``, ``{"table": ψ}``); differentiable where the loss should be.
        store: the store of its messages (None: the step's store; couplings that share a
            store must not send fields of the same name).
        latent_unary: ``(B, N_I)`` log-potentials of the coupling's latent variable's own
            factors (e.g. a prior on I), or None.
        latent_share: the share of the latent's own factors each frame's loss carries
            (a number or ``(B,)``; e.g. 1 / the frames of the sequence, so that a
            sequence's frames together carry its gradient Q_I - P(I | x*) once). None:
            ``latent_unary`` is a constant of the step.
    """

    coupling: StoredCoupling
    params: dict = field(default_factory=dict)
    store: object = None
    latent_unary: torch.Tensor | None = None
    latent_share: object = None

    def detached(self) -> dict:
        return {k: v.detach() for k, v in self.params.items()}


@dataclass
class AsyncStep:
    """What :func:`asynchronous_step` returns.

    Attributes:
        loss: scalar: Σ ``per_frame`` + the L2 pull (backward() it).
        per_frame: ``(B,)`` each frame's surrogate (without the pull).
        q: ``(B, S)`` Q_i after the inner iterations (no grad).
        q_intent: ``(B, N_I)`` the frame's Q_I of the first coupling with a latent (the
            intent; None without one); ``latents`` has every coupling's.
        target_intent: ``(B, N_I)`` P(I | x*) of that coupling (None without one).
        incoming: the step store's :class:`~fieldlib.inference.messages.Incoming`.
        messages: ``{field: (B, *shape)}`` the outgoing messages to the step's store
            (written when ``write``).
        iteration: the iteration they were (or would be) written with.
        timings: seconds of ``read``, ``update``, ``loss``, ``write``.
        latents, targets: ``[(B, N) or None]`` per coupling, in the order of ``couplings``.
    """

    loss: torch.Tensor
    per_frame: torch.Tensor
    q: torch.Tensor
    q_intent: torch.Tensor | None
    target_intent: torch.Tensor | None
    incoming: object
    messages: dict
    iteration: int
    timings: dict = field(default_factory=dict)
    latents: list = field(default_factory=list)
    targets: list = field(default_factory=list)


def _identity(n, device):
    return torch.arange(n, device=device)


def _extra(c: Coupled):
    return 0.0 if c.latent_unary is None else c.latent_unary.detach()


def local_update(unary, couplings, incoming, *, inner_iterations: int = 5, q_init=None):
    """Q_i and each coupling's Q of its latent for B frames from their incoming messages
    (Eq. 5, 6), under no_grad.

    Args:
        unary: ``(B, S)`` φX_i on the frame's states (-inf allowed where a row keeps a
            finite entry).
        couplings: a list of :class:`Coupled`.
        incoming: one :class:`~fieldlib.inference.messages.Incoming` per coupling (its
            store's read for the B frames).
        inner_iterations: alternations of Q_i then the latents' Q.
        q_init: ``(B, S)`` the frames' previous Q_i (e.g. from the last pass of the
            ``async`` engine), or None (a training step: the frame has none).

    Returns ``(q (B, S), [q_latent (B, N) or None per coupling])``. The first latent Q is
    from the stored messages alone, plus the frame's own part from ``q_init`` when given
    (so that a fixed point of the engine's passes is a fixed point of Eq. 5-6 whatever
    ``inner_iterations``); each iteration updates Q_i, then every latent Q.
    """
    with torch.no_grad():
        params = [c.detached() for c in couplings]
        base = unary.detach()
        latent = []
        for c, inc, p in zip(couplings, incoming, params):
            if c.coupling.latent_size is None:
                base = base + c.coupling.frame_message(inc, None, **p).to(base.dtype)
                latent.append(None)
            else:
                latent.append(torch.softmax(c.coupling.latent_logits(inc, q_init, **p)
                                            + _extra(c), -1))
        with_latent = [k for k, q_l in enumerate(latent) if q_l is not None]

        def frames():
            m = base
            for k in with_latent:
                m = m + couplings[k].coupling.frame_message(incoming[k], latent[k],
                                                            **params[k]).to(base.dtype)
            return torch.softmax(m, -1)

        def latents(q):
            for k in with_latent:
                c = couplings[k]
                latent[k] = torch.softmax(c.coupling.latent_logits(incoming[k], q, **params[k])
                                          + _extra(c), -1)

        q = frames()
        if with_latent:
            for _ in range(max(int(inner_iterations), 1) - 1):
                latents(q)
                q = frames()
            latents(q)
        return q, latent


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def builtin_couplings(s: int, device, *, mu=None, mu_component=None, phi_xi=None,
                      xi_component=None, intent_unary=None, sequence_frames=None,
                      what: str = "asynchronous_step") -> list[Coupled]:
    """The :class:`Coupled` of the built-in factors from a step's keyword arguments: φXX
    (µ, KernelTemporal's coupling) and φXI (ψ, FrameIntent's), in that order."""
    out = []
    if mu is not None:
        comp = _identity(s, device) if mu_component is None else torch.as_tensor(mu_component)
        out.append(Coupled(TemporalCoupling(comp.long(), mu.shape[-1]), {"mu": mu}))
    if phi_xi is not None:
        if phi_xi.dim() != 3:
            raise ShapeError(f"{what}: phi_xi must be (B, D, N_I), got {tuple(phi_xi.shape)}")
        check_finite_table(phi_xi.detach(), what)
        comp = _identity(s, device) if xi_component is None else torch.as_tensor(xi_component)
        share = None if sequence_frames is None else 1.0 / torch.as_tensor(
            sequence_frames, dtype=phi_xi.dtype, device=phi_xi.device)
        out.append(Coupled(IntentCoupling(comp.long(), phi_xi.shape[1], phi_xi.shape[2]),
                           {"table": phi_xi},
                           latent_unary=None if intent_unary is None else
                           torch.as_tensor(intent_unary, device=phi_xi.device),
                           latent_share=share))
    return out


def _check_batch(couplings: list[Coupled], b: int) -> None:
    for c in couplings:
        for name, t in c.params.items():
            if t.dim() >= 1 and t.shape[0] != b and not (name == "mu" and t.dim() == 2):
                raise ShapeError(f"asynchronous_step: {type(c.coupling).__name__} parameter "
                                 f"{name!r} has {t.shape[0]} rows for a batch of {b} frames")


def _stores(store, couplings: list[Coupled]):
    """``(stores, index)``: the distinct stores, and each coupling's position among them."""
    stores, index = [], []
    for c in couplings:
        s = store if c.store is None else c.store
        pos = next((k for k, t in enumerate(stores) if t is s), None)
        if pos is None:
            stores.append(s)
            pos = len(stores) - 1
        index.append(pos)
    return stores, index


def asynchronous_step(store, seq, frame, time_, unary, label, *, mu=None, mu_component=None,
                      phi_xi=None, xi_component=None, intent_unary=None,
                      sequence_frames=None, couplings=(), iteration: int | None = None,
                      inner_iterations: int = 5, l2_intent: float = 0.0,
                      write: bool = True, incoming=None) -> AsyncStep:
    """Algorithm 2 on B sampled frames (module docstring).

    Args:
        store: a :class:`~fieldlib.inference.messages.MessageStore` (or distributed one)
            holding the fields the couplings send, e.g. ``K``, ``K_star`` (temporal, D) and
            ``H``, ``H_star`` (N_I) from ``MessageStore.temporal_field(D, N_I, kernel=...,
            discount=0.9)``; its kernel is the model's.
        seq: B sequence ids; ``frame``: ``(B,)`` frame ids (position in the sequence);
            ``time_``: ``(B,)`` frame times.
        unary: ``(B, S)`` φX of each frame on its S states (e.g. the sum of the component
            tables gathered onto the states), differentiable.
        label: ``(B,)`` the frames' labelled states x*_i.
        mu: ``(D, D)`` (or ``(B, D, D)``) µ, differentiable; None: no temporal factor.
        mu_component: ``(S,)`` each state's value of µ's component (None: identity, D = S).
        phi_xi: ``(B, D_I, N_I)`` ψ_i = φXI of each frame, differentiable and finite; None:
            no intent.
        xi_component: ``(S,)`` each state's value of φXI's component (None: identity).
        intent_unary: ``(B, N_I)`` log-potentials of the intent's own factors (e.g. a prior
            on I), added to log Q_I and to P(I | x*)'s logits.
        sequence_frames: the number of frames of each row's sequence (an int or ``(B,)``):
            each frame carries 1 / that of the gradient of ``intent_unary``
            (Q_I - P(I | x*)), so a sequence's frames carry it once. None: ``intent_unary``
            is a constant of the step (no gradient flows to it).
        couplings: further :class:`Coupled` factors (a user's coupled factor types: each a
            :class:`~fieldlib.factors.stored.StoredCoupling` and its tensors), combined with
            the built-in ones (µ, φXI) in the same updates, loss and writes.
        iteration: the iteration the outgoing messages are written with (default: the
            store's last iteration + 1).
        inner_iterations: Q_i / Q_I alternations (default 5).
        l2_intent: weight of the L2 pull of φXI toward zero (MATH.md §6).
        write: write the outgoing messages after the step (False: leave the store as it is,
            e.g. to check the step, or to send them with the next batch's read: the step's
            ``messages`` and ``iteration`` are what :meth:`MessageStore.write` takes).
        incoming: ``store``'s read of these frames made by the caller (an
            :class:`~fieldlib.inference.messages.Incoming`), e.g. with the previous batch's
            write in one :meth:`~fieldlib.inference.messages.MessageStore.write_read` (one
            exchange of the distributed store instead of two); None: read here. Stores of
            other couplings are read here either way.

    Returns an :class:`AsyncStep`.

    Raises:
        ShapeError: tensors of inconsistent shapes; FieldlibError: a non-finite φXI, two
        couplings sending one field to one store, a store field no coupling sends; the
        store's errors (bad ids, times, messages).
    """
    if unary.dim() != 2:
        raise ShapeError(f"asynchronous_step: unary must be (B, S), got {tuple(unary.shape)}")
    b, s = unary.shape
    device = unary.device
    label = torch.as_tensor(label, device=device).long()
    if label.shape != (b,):
        raise ShapeError(f"asynchronous_step: label must be ({b},), got {tuple(label.shape)}")
    frame = torch.as_tensor(frame, device=device).long()
    time_ = torch.as_tensor(time_, dtype=torch.float64, device=device)
    bound = builtin_couplings(s, device, mu=mu, mu_component=mu_component, phi_xi=phi_xi,
                              xi_component=xi_component, intent_unary=intent_unary,
                              sequence_frames=sequence_frames) + list(couplings)
    _check_batch(bound, b)
    stores, where = _stores(store, bound)
    if iteration is None:
        iteration = max([int(st.iteration) for st in stores] + [-1]) + 1
    timings = {}

    _sync(device)
    t0 = time.perf_counter()
    reads = [incoming if incoming is not None and st is store else st.read(seq, frame, time_)
             for st in stores]
    incoming = [reads[k] for k in where]
    _sync(device)
    t1 = time.perf_counter()
    q, latent = local_update(unary, bound, incoming, inner_iterations=inner_iterations)
    _sync(device)
    t2 = time.perf_counter()

    target = torch.nn.functional.one_hot(label, s).to(unary.dtype)
    per_frame = ((q.to(unary.dtype) - target) * _finite(unary)).sum(-1)  # Eq. 7
    targets = []
    for c, inc, q_l in zip(bound, incoming, latent):
        pi = None
        if q_l is not None:
            with torch.no_grad():  # P(I | x*): exact, I is the only latent (Eq. 8)
                pi = torch.softmax(c.coupling.target_logits(inc, label, **c.detached())
                                   + _extra(c), -1)
            if c.latent_unary is not None and c.latent_share is not None:
                own = ((q_l - pi).to(c.latent_unary.dtype) * c.latent_unary).sum(-1)
                per_frame = per_frame + c.latent_share * own
        targets.append(pi)
        per_frame = per_frame + c.coupling.frame_energy(q, label, inc, q_l, pi,
                                                        **c.params).to(per_frame.dtype)
    loss = per_frame.sum()
    if phi_xi is not None and l2_intent:
        loss = loss + 0.5 * l2_intent * (phi_xi ** 2).sum()
    _sync(device)
    t3 = time.perf_counter()

    with torch.no_grad():
        out = [{} for _ in stores]
        for c, k in zip(bound, where):
            sent = c.coupling.send(q, label, **c.detached())
            clash = sorted(set(sent) & set(out[k]))
            if clash:
                raise FieldlibError(f"asynchronous_step: two couplings send field(s) {clash} "
                                    f"to one store; give one of them its own store")
            out[k].update(sent)
        for st, messages in zip(stores, out):
            missing = [f for f in st.fields if f not in messages]
            if missing:
                raise FieldlibError(f"asynchronous_step: the store holds fields {missing} that "
                                    f"this step does not send (sent: {sorted(messages)})")
        # e.g. float64 potentials, a float32 store
        out = [{k: v.to(st.dtype) for k, v in m.items()} for st, m in zip(stores, out)]
        if write:
            for st, messages in zip(stores, out):
                st.write(seq, frame, time_, messages, iteration)
    _sync(device)
    t4 = time.perf_counter()
    timings.update(read=t1 - t0, update=t2 - t1, loss=t3 - t2, write=t4 - t3)
    first = next((k for k, q_l in enumerate(latent) if q_l is not None), None)
    own = stores.index(store) if any(st is store for st in stores) else None
    return AsyncStep(loss, per_frame, q, None if first is None else latent[first],
                     None if first is None else targets[first],
                     None if own is None else reads[own],
                     out[own] if own is not None else {}, int(iteration), timings,
                     latent, targets)


def _finite(unary: torch.Tensor) -> torch.Tensor:
    """φX with -inf entries set to 0: there Q_i = 0 and the label never sits (the gradient
    of those entries is Q_i - 1[x*] = 0, and 0 · (-inf) would be NaN)."""
    # where's backward is one masked pass (nan_to_num's takes four); NaN and +inf cannot
    # reach here, so x > -inf is isfinite
    return torch.where(unary > float("-inf"), unary, 0.0)
