"""Stored messages: how a coupled factor takes part in asynchronous mean-field (MATH.md §4-5).

In asynchronous training (Algorithm 2) and the ``async`` engine (Algorithm 1) a frame does
not see the other frames of its sequence; it sees the messages they sent earlier, combined
by a message store (Eq. 10). A coupled factor type joins through a :class:`StoredCoupling`
over a batch of B frames of S states, with the factor's tensors for those frames passed as
keyword arguments (``**params``, each with the batch axis first):

* what a frame SENDS: :meth:`~StoredCoupling.send` -> ``{field: (B, *shape)}``, the fields
  declared by :meth:`~StoredCoupling.fields` (``{field: (shape, temporal)}``; a temporal
  field is read kernel-weighted as ``past``/``future``, the others as ``total``);
* how the INCOMING ones combine into frame i's update:
  :meth:`~StoredCoupling.frame_message` -> ``(B, S)`` added to log Q_i (Eq. 5);
* for a factor with a latent variable of its own (the intent; ``latent_size`` = its number
  of states, None for a factor without one): :meth:`~StoredCoupling.latent_logits` ->
  ``(B, N_I)``, log Q_I up to a constant (Eq. 6), and :meth:`~StoredCoupling.target_logits`
  -> ``(B, N_I)``, the logits of P(I | x*) (Eq. 8's target);
* its per-frame surrogate energy :meth:`~StoredCoupling.frame_energy` -> ``(B,)``: with Q,
  Q_I and the target held fixed its autograd gradient is the factor's Eq. 7-9 row of the
  frame.

A factor type provides two methods: ``stored_coupling()`` (the coupling object) and, for
the ``async`` engine, ``stored_inputs(n)`` (a :class:`StoredInputs`: the frames it couples,
its tensors per frame ``(N, T, ...)`` and per sequence ``(N, ...)``, its kernel and frame
times, its latent variable). ``KernelTemporal`` gives a :class:`TemporalCoupling`,
``FrameIntent`` an :class:`IntentCoupling`; a user's coupled type defines its own
(examples/custom_factor.py). docs/asynchronous.md describes the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from fieldlib.errors import FieldlibError
from fieldlib.variables import run_length

__all__ = ["ComponentMap", "StoredCoupling", "StoredInputs", "TemporalCoupling", "IntentCoupling",
           "stored_coupling", "supports_stored_messages", "check_finite_table"]


@runtime_checkable
class StoredCoupling(Protocol):
    """What a coupled factor type provides for stored messages (module docstring).

    ``incoming`` is the :class:`~fieldlib.inference.messages.Incoming` of the coupling's
    own fields; ``latent`` the frame's Q of the coupling's latent ``(B, N_I)`` (None
    without one); ``target`` P(I | x*) ``(B, N_I)``; ``q`` ``(B, S)``; ``label`` ``(B,)``.
    """

    latent_size: int | None

    def fields(self) -> dict[str, tuple[tuple[int, ...], bool]]: ...

    def send(self, q: torch.Tensor, label: torch.Tensor | None, **params) -> dict: ...

    def frame_message(self, incoming, latent=None, **params) -> torch.Tensor: ...

    def frame_energy(self, q, label, incoming, latent=None, target=None,
                     **params) -> torch.Tensor: ...


@dataclass
class StoredInputs:
    """What the ``async`` engine needs of a coupled factor in a graph of N sequences.

    Attributes:
        frames: the VariableArray of T frames the factor couples.
        frame: ``{param: (N, T, ...)}``: tensors with one entry per frame (e.g. φXI).
        sequence: ``{param: (N, ...)}``: tensors shared by a sequence's frames (e.g. µ).
        times: ``(N, T)`` frame times for the kernel (None: positions 0..T-1).
        kernel: the kernel of the coupling's temporal fields (None: it has none).
        latent: the coupling's latent Variable (None: it has none).
    """

    frames: object
    frame: dict = field(default_factory=dict)
    sequence: dict = field(default_factory=dict)
    times: torch.Tensor | None = None
    kernel: object = None
    latent: object = None


class ComponentMap:
    """Each frame state's component value ``component (S,)`` (D values), with the two moves
    the couplings make: Q ``(B, S)`` summed onto the component ``(B, D)``
    (:meth:`project`) and a ``(B, D)`` message read back on the states (:meth:`expand`).

    When the map is constant on consecutive runs of r states (e.g. Charades frame states
    b * S + s, whose object depends on b only: r = the scenes), both go through the
    ``(B, S / r)`` blocks: a sum over each run, then an index over S / r instead of S
    (3-5x faster at Charades sizes). The results are the same sums.
    """

    def __init__(self, component: torch.Tensor, size: int):
        self.component, self.size = component.long(), int(size)
        c = self.component
        r = self.run = run_length(c)
        self.blocks = c[::r].contiguous() if r > 1 else c

    def project(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, D)``: Q ``(B, S)`` summed onto the component values."""
        if self.run > 1:
            q = q.reshape(q.shape[0], -1, self.run).sum(-1)
        out = q.new_zeros(q.shape[0], self.size)
        return out.index_add_(1, self.blocks.to(q.device), q)

    def expand(self, m: torch.Tensor) -> torch.Tensor:
        """``(B, S)``: a ``(B, D)`` message on each state's component value."""
        m = m.index_select(1, self.blocks.to(m.device))
        if self.run > 1:
            m = m[:, :, None].expand(-1, -1, self.run).reshape(m.shape[0], -1)
        return m

    def of(self, label: torch.Tensor) -> torch.Tensor:
        """The component values of states ``label (B,)``."""
        return self.component.to(label.device)[label]


def _onehot(label: torch.Tensor, cmap: ComponentMap, size: int, like: torch.Tensor):
    """``(B, D)``: onehot of the labels' component values."""
    return torch.nn.functional.one_hot(cmap.of(label), size).to(like.dtype)


class TemporalCoupling:
    """KernelTemporal's stored messages (MATH.md §4): a frame sends K_j (its marginal on the
    component µ acts on) and K*_j (the onehot of its label there); incoming past/future sums
    give FA_i = µ future_i, FB_i = µᵀ past_i with the CURRENT µ (Eq. 5 / Eq. 12-13).

    Args:
        component: ``LongTensor (S,)``: each frame state's component value.
        size: D, the component's cardinality.

    Params: ``mu ([B,] D, D)``.
    """

    latent_size = None

    def __init__(self, component: torch.Tensor, size: int):
        self.size = int(size)
        self.component = ComponentMap(component, self.size)

    def fields(self) -> dict:
        return {"K": ((self.size,), True), "K_star": ((self.size,), True)}

    def send(self, q, label=None, **params) -> dict:
        """``{"K": (B, D), "K_star": (B, D)}`` (K_star zero without labels)."""
        k = self.component.project(q)
        ks = k.new_zeros(k.shape) if label is None else _onehot(label, self.component,
                                                                self.size, k)
        return {"K": k, "K_star": ks}

    def frame_message(self, incoming, latent=None, *, mu) -> torch.Tensor:
        """``(B, S)``: FA_i + FB_i on the frame's states; ``mu ([B,] D, D)``."""
        fa, fb = incoming.kernel_messages(mu, "K")
        return self.component.expand(fa + fb)

    def frame_energy(self, q, label, incoming, latent=None, target=None, *,
                     mu) -> torch.Tensor:
        """``(B,)``: Σ_a K_i(a) (FA_i + FB_i)(a) - the same for K*_i, K*_j; its gradient in µ
        is Eq. 9's row of frame i: Q_i(a) Σ_{j>i} k Q_j(b) + Q_i(b) Σ_{j<i} k Q_j(a) minus
        the label term. ``q`` and the stored sums are constants here."""
        fa, fb = incoming.kernel_messages(mu, "K")
        fas, fbs = incoming.kernel_messages(mu, "K_star")
        k = self.component.project(q).to(fa.dtype)
        ks = _onehot(label, self.component, self.size, fa)
        return (k * (fa + fb)).sum(-1) - (ks * (fas + fbs)).sum(-1)


class IntentCoupling:
    """FrameIntent's stored messages (MATH.md §4): a frame sends H_j(I) = E_{Q_j} ψ_j(U, I)
    and H*_j(I) = ψ_j(x*_j, I); the reading frame's intent update is
    Q_I ∝ exp(Σ_{j≠i} H_j + H_i) (Eq. 6), its message to Q_i is Σ_I Q_I(I) ψ_i(x, I) (Eq. 5),
    and the target P(I | x*) = softmax(Σ_{j≠i} H*_j + H*_i) (Eq. 8).

    Args:
        component: ``LongTensor (S,)``: each frame state's value of the table's component.
        size: D, that component's cardinality; ``intents``: N_I.

    Params: ``table (B, D, N_I)``, ψ_i, finite (:func:`check_finite_table`).
    """

    def __init__(self, component: torch.Tensor, size: int, intents: int):
        self.size, self.intents = int(size), int(intents)
        self.component = ComponentMap(component, self.size)
        self.latent_size = self.intents

    def fields(self) -> dict:
        return {"H": ((self.intents,), False), "H_star": ((self.intents,), False)}

    def _own(self, q, table):
        # bmm: torch.einsum's parsing costs more than the product at these sizes
        return torch.bmm(self.component.project(q).to(table.dtype)[:, None, :], table)[:, 0]

    def _star(self, label, table):
        return table[torch.arange(label.shape[0], device=label.device),
                     self.component.of(label)]

    def send(self, q, label=None, *, table) -> dict:
        """``{"H": (B, N_I), "H_star": (B, N_I)}`` (H_star zero without labels)."""
        h = self._own(q, table)
        hs = h.new_zeros(h.shape) if label is None else self._star(label, table)
        return {"H": h, "H_star": hs}

    def latent_logits(self, incoming, q=None, *, table) -> torch.Tensor:
        """``(B, N_I)``: Σ_{j≠i} H_j (stored) + H_i (this frame's Q_i; left out when ``q`` is
        None, the first update): log Q_I up to a constant (Eq. 6)."""
        stored = incoming.total["H"].to(table.dtype)
        return stored if q is None else stored + self._own(q, table)

    def target_logits(self, incoming, label, *, table) -> torch.Tensor:
        """``(B, N_I)``: Σ_{j≠i} H*_j + ψ_i(x*_i, I), the logits of P(I | x*) (Eq. 8)."""
        return incoming.total["H_star"].to(table.dtype) + self._star(label, table)

    def frame_message(self, incoming, latent=None, *, table) -> torch.Tensor:
        """``(B, S)``: Σ_I Q_I(I) ψ_i(c(x), I) on the frame's states."""
        m = torch.bmm(table, latent.to(table.dtype)[:, :, None])[..., 0]
        return self.component.expand(m)

    def frame_energy(self, q, label, incoming, latent=None, target=None, *,
                     table) -> torch.Tensor:
        """``(B,)``: Σ_{u,I} (Q_i(u) Q_I(I) - 1[u = c(x*_i)] P(I | x*)) ψ_i(u, I); its
        gradient in ψ_i is Eq. 8's row (Q, Q_I, P(I | x*) constants)."""
        qc = self.component.project(q).to(table.dtype)
        ks = _onehot(label, self.component, self.size, table)
        w = qc[:, :, None] * latent[:, None, :] - ks[:, :, None] * target[:, None, :]
        return (w * table).sum((-1, -2))


def stored_coupling(factor):
    """The factor's :class:`StoredCoupling` (``factor.stored_coupling()``: ``KernelTemporal``
    and ``FrameIntent`` define one), or None: the factor cannot take part in asynchronous
    mean-field."""
    return factor.stored_coupling()


def supports_stored_messages(factor) -> bool:
    """Whether :func:`stored_coupling` knows the factor."""
    return stored_coupling(factor) is not None


def check_finite_table(table: torch.Tensor, what: str) -> None:
    """Stored intent messages need a finite φXI (a -inf entry times Q = 0 would be NaN)."""
    if not bool(torch.isfinite(table).all()):
        raise FieldlibError(f"{what}: φXI must be finite for stored messages (H_j = E_Q φXI)")
