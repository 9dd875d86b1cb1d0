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
from fieldlib.factors.stored import IntentCoupling, TemporalCoupling, check_finite_table

__all__ = ["AsyncStep", "asynchronous_step", "local_update"]


@dataclass
class AsyncStep:
    """What :func:`asynchronous_step` returns.

    Attributes:
        loss: scalar: Σ ``per_frame`` + the L2 pull (backward() it).
        per_frame: ``(B,)`` each frame's surrogate (without the pull).
        q: ``(B, S)`` Q_i after the inner iterations (no grad).
        q_intent: ``(B, N_I)`` the frame's Q_I (None without φXI).
        target_intent: ``(B, N_I)`` P(I | x*) (None without φXI).
        incoming: the store's :class:`~fieldlib.inference.messages.Incoming`.
        messages: ``{field: (B, *shape)}`` the outgoing messages (written when ``write``).
        iteration: the iteration they were (or would be) written with.
        timings: seconds of ``read``, ``update``, ``loss``, ``write``.
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


def _identity(n, device):
    return torch.arange(n, device=device)


def local_update(unary, incoming, *, temporal=None, mu=None, intent=None, table=None,
                 intent_unary=None, inner_iterations: int = 5):
    """Q_i and Q_I of B frames from their incoming messages (Eq. 5, 6), under no_grad.

    Args:
        unary: ``(B, S)`` φX_i on the frame's states (-inf allowed where a row keeps a
            finite entry).
        incoming: an :class:`~fieldlib.inference.messages.Incoming` for the B frames.
        temporal, mu: a :class:`TemporalCoupling` and µ ``([B,] D, D)``, or None.
        intent, table: an :class:`IntentCoupling` and ψ ``(B, D_I, N_I)``, or None.
        intent_unary: ``(B, N_I)`` log-potentials of the intent's own factors (or None).
        inner_iterations: alternations of Q_i then Q_I.

    Returns ``(q (B, S), q_intent (B, N_I) or None)``. The first Q_I is from the stored
    messages alone; each iteration updates Q_i, then Q_I.
    """
    with torch.no_grad():
        base = unary.detach()
        if temporal is not None:
            base = base + temporal.frame_message(incoming, mu=mu.detach()).to(base.dtype)
        if intent is None:
            return torch.softmax(base, -1), None
        table = table.detach()
        extra = 0.0 if intent_unary is None else intent_unary.detach()
        q_i = torch.softmax(incoming.total["H"].to(table.dtype) + extra, -1)
        q = torch.softmax(base + intent.frame_message(q_i, table=table), -1)
        for _ in range(max(int(inner_iterations), 1) - 1):
            q_i = torch.softmax(intent.latent_logits(incoming, q, table=table) + extra, -1)
            q = torch.softmax(base + intent.frame_message(q_i, table=table), -1)
        q_i = torch.softmax(intent.latent_logits(incoming, q, table=table) + extra, -1)
        return q, q_i


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def asynchronous_step(store, seq, frame, time_, unary, label, *, mu=None, mu_component=None,
                      phi_xi=None, xi_component=None, intent_unary=None,
                      iteration: int | None = None,
                      inner_iterations: int = 5, l2_intent: float = 0.0,
                      write: bool = True) -> AsyncStep:
    """Algorithm 2 on B sampled frames (module docstring).

    Args:
        store: a :class:`~fieldlib.inference.messages.MessageStore` (or distributed one)
            with fields ``K``, ``K_star`` (temporal, D) and ``H``, ``H_star`` (N_I), e.g.
            ``MessageStore.temporal_field(D, N_I, kernel=..., discount=0.9)``; its kernel
            is the model's.
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
            on I), added to log Q_I and to P(I | x*)'s logits; a constant of the step (no
            gradient flows to it).
        iteration: the iteration the outgoing messages are written with (default: the
            store's last iteration + 1).
        inner_iterations: Q_i / Q_I alternations (default 5).
        l2_intent: weight of the L2 pull of φXI toward zero (MATH.md §6).
        write: write the outgoing messages after the step (False: leave the store as it is,
            e.g. to check the step).

    Returns an :class:`AsyncStep`.

    Raises:
        ShapeError: tensors of inconsistent shapes; FieldlibError: a non-finite φXI; the
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
    temporal = intent = None
    if mu is not None:
        comp = _identity(s, device) if mu_component is None else torch.as_tensor(mu_component)
        temporal = TemporalCoupling(comp.long(), mu.shape[-1])
    if phi_xi is not None:
        if phi_xi.dim() != 3 or phi_xi.shape[0] != b:
            raise ShapeError(f"asynchronous_step: phi_xi must be ({b}, D, N_I), got "
                             f"{tuple(phi_xi.shape)}")
        check_finite_table(phi_xi.detach(), "asynchronous_step")
        comp = _identity(s, device) if xi_component is None else torch.as_tensor(xi_component)
        intent = IntentCoupling(comp.long(), phi_xi.shape[1], phi_xi.shape[2])
    if iteration is None:
        iteration = max(int(store.iteration), -1) + 1
    timings = {}

    _sync(device)
    t0 = time.perf_counter()
    inc = store.read(seq, frame, time_)
    _sync(device)
    t1 = time.perf_counter()
    if intent_unary is not None:
        intent_unary = torch.as_tensor(intent_unary).detach()
    q, q_i = local_update(unary, inc, temporal=temporal, mu=mu, intent=intent, table=phi_xi,
                          intent_unary=intent_unary, inner_iterations=inner_iterations)
    _sync(device)
    t2 = time.perf_counter()

    target = torch.nn.functional.one_hot(label, s).to(unary.dtype)
    per_frame = ((q.to(unary.dtype) - target) * _finite(unary)).sum(-1)  # Eq. 7
    pi = None
    if intent is not None:
        with torch.no_grad():
            pi = intent.target_latent(inc, label, table=phi_xi.detach(), extra=intent_unary)
        per_frame = per_frame + intent.frame_energy(q, q_i, label, pi, table=phi_xi)
    if temporal is not None:
        per_frame = per_frame + temporal.frame_energy(q, label, inc, mu=mu)
    loss = per_frame.sum()
    if phi_xi is not None and l2_intent:
        loss = loss + 0.5 * l2_intent * (phi_xi ** 2).sum()
    _sync(device)
    t3 = time.perf_counter()

    with torch.no_grad():
        messages = {}
        if temporal is not None:
            messages.update(temporal.send(q, label))
        if intent is not None:
            messages.update(intent.send(q, label, table=phi_xi.detach()))
        fields = getattr(store, "fields", None)
        if fields is not None:
            missing = [f for f in fields if f not in messages]
            if missing:
                raise FieldlibError(f"asynchronous_step: the store holds fields {missing} that "
                                    f"this step does not send (sent: {sorted(messages)})")
        dtype = getattr(store, "dtype", None)
        if dtype is not None:  # e.g. float64 potentials, a float32 store
            messages = {k: v.to(dtype) for k, v in messages.items()}
        if write:
            store.write(seq, frame, time_, messages, iteration)
    _sync(device)
    t4 = time.perf_counter()
    timings.update(read=t1 - t0, update=t2 - t1, loss=t3 - t2, write=t4 - t3)
    return AsyncStep(loss, per_frame, q, q_i, pi, inc, messages, int(iteration), timings)


def _finite(unary: torch.Tensor) -> torch.Tensor:
    """φX with -inf entries set to 0: there Q_i = 0 and the label never sits (the gradient
    of those entries is Q_i - 1[x*] = 0, and 0 · (-inf) would be NaN)."""
    return torch.where(torch.isfinite(unary), unary, torch.zeros((), dtype=unary.dtype,
                                                                 device=unary.device))
