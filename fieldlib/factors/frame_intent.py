"""The frame-intent factor φXI(x_t, I) = ψ_t(o_t, I) (MATH.md §2).

One table over (frame component) x (intent) per frame, predicted by a network. With a block
frame domain the table is gathered onto the frame's states through the chosen component
(the paper: object; the released code: object x progress), or given per state
(``component=None``). Its mean-field messages are one matrix product each, on a view of the
stacked (T, D, N_I) tables, -inf entries included (no per-frame term).
"""

from __future__ import annotations

import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors.base import (
    Factor,
    OnComponent,
    Term,
    check_log_potential,
    position_terms,
    register_factor,
)
from fieldlib.factors.beliefs import Beliefs, split_impossible, with_impossible
from fieldlib.factors.stored import IntentCoupling, StoredInputs, check_finite_table
from fieldlib.variables import BlockDomain, Variable, VariableArray

__all__ = ["FrameIntent", "component_map"]


def component_map(domain, component: str | None) -> tuple[torch.Tensor, int]:
    """``(LongTensor (S,), D)``: each state's value of ``component`` and that component's
    cardinality; the identity map when ``component`` is None."""
    if component is None:
        return torch.arange(domain.size), domain.size
    if not isinstance(domain, BlockDomain):
        raise FieldlibError(
            f"component {component!r} was given but the frame domain is not a BlockDomain"
        )
    return domain.component(component), domain.components[component].size


@register_factor("frame_intent")
class FrameIntent(Factor):
    """φXI: a (component x intent) log-table per frame.

    Args:
        frames: VariableArray of T frames.
        intent: the intent Variable (N_I states).
        table: ``Tensor ([N,] T, D, N_I)``, D the component's cardinality (the frames'
            cardinality when ``component`` is None).
        component: block component the table is over (e.g. ``"o"``), or None.
    """

    def __init__(self, frames: VariableArray, intent: Variable, table,
                 component: str | None = None, name: str | None = None):
        super().__init__([frames, intent], name)
        if not isinstance(frames, VariableArray) or not isinstance(intent, Variable):
            raise FieldlibError(f"{self.label}: expects (VariableArray, Variable)")
        self.frames, self.intent, self.component = frames, intent, component
        self.state_component, self.component_size = component_map(frames.domain, component)
        self.table = check_log_potential(table, self.label)
        core = (frames.size, self.component_size, intent.cardinality)
        self.batched = self._set_batch(self.table, core, "table")

    def tensors(self):
        return [self.table]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def state_table(self) -> torch.Tensor:
        """``([N,] T, S, N_I)``: the table on the frames' own states."""
        return self.table.index_select(-2, self.state_component.to(self.table.device))

    def dense_size(self) -> int:
        n = self.table.shape[0] if self.batched else 1
        return n * self.frames.size * self.frames.cardinality * self.intent.cardinality

    def coupling_arity(self) -> int:
        return 2

    def has_hard_zeros(self, q: Beliefs) -> bool:
        return self._split(q)[1] is not None

    def terms(self) -> list[Term]:
        return position_terms(self, [self.frames, self.intent], self.state_table(),
                              self.batched)

    # -- mean-field (MATH.md §3-4): messages on the component, all frames at once ----------
    # The table ``([N,] T, D, N_I)`` is used as the matrix ``([N,] T·D, N_I)`` (a view): each
    # message is one matrix product with a Q, the small operand first (the fast layout for
    # torch's CPU matmul); -inf entries through their indicator (0 · (-inf) = 0).
    def _split(self, q: Beliefs):
        """The table's finite part and -inf indicator as ``([N,] T·D, N_I)``, once per run."""
        def flat():
            finite, impossible = split_impossible(self.table)
            return tuple(None if t is None else t.reshape(*t.shape[:-3], -1, t.shape[-1])
                         for t in (finite, impossible))
        return q.constant((self, "split"), flat)

    def _to_frames(self, q: Beliefs) -> torch.Tensor:
        """``(N, T, D)``: Σ_I Q_I(I) φXI_t(u, I)   (Eq. 5)."""
        finite, impossible = self._split(q)
        qi = q.probs(self.intent).unsqueeze(-2)  # (N, 1, N_I)
        shape = (q.batch, self.frames.size, self.component_size)
        value = (qi @ finite.transpose(-1, -2)).view(shape)
        imp = None if impossible is None else (qi @ impossible.transpose(-1, -2)).view(shape)
        return with_impossible(value, imp, q.options.penalty)

    def expected_messages(self, q: Beliefs) -> dict:
        out: dict = {}
        if q.wants(self.frames):
            out[self.frames] = OnComponent(self.component, self._to_frames(q))
        if q.wants(self.intent):  # Σ_j H_j(I), H_j(I) = E_{Q_j} φXI(x, I)   (Eq. 6)
            finite, impossible = self._split(q)
            qc = q.component_marginal(self.frames, self.component)
            qc = qc.reshape(q.batch, 1, -1)  # (N, 1, T·D)
            value = (qc @ finite).view(q.batch, -1)
            imp = None if impossible is None else (qc @ impossible).view(q.batch, -1)
            out[self.intent] = with_impossible(value, imp, q.options.penalty)
        return out

    def position_energy(self, q: Beliefs) -> dict:
        qc = q.component_marginal(self.frames, self.component)
        finite, impossible = self._split(q)
        qi = q.probs(self.intent).unsqueeze(-2)
        shape = (q.batch, self.frames.size, self.component_size)
        value = ((qi @ finite.transpose(-1, -2)).view(shape) * qc).sum(-1)
        imp = None if impossible is None else (
            (qi @ impossible.transpose(-1, -2)).view(shape) * qc).sum(-1)
        return {self.frames: with_impossible(value, imp, q.options.penalty)}

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        return self.position_energy(q)[self.frames].sum(-1)

    def couplings(self) -> list:
        return [(v, self.intent) for v in self.frames]

    # -- closed-form gradient (MATH.md §6, Eq. 8) -------------------------------------------
    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"table": (N, T, D, N_I)}``: ∂ E_Q[log φXI] / ∂ψ_t(u, I) = Q_t(u) Q_I(I), Q_t
        on the component (the same in both forms: each term has one frame)."""
        qc = q.component_marginal(self.frames, self.component)
        return {"table": torch.einsum("ntd,ni->ntdi", qc, q.probs(self.intent))}

    # -- stored messages (asynchronous mean-field, MATH.md §4-5; fieldlib.factors.stored) ----
    def stored_coupling(self) -> IntentCoupling:
        """What a frame sends (H_j, H*_j) and how the incoming ones combine (Q_I's update,
        Σ_I Q_I ψ, P(I | x*)): docs/asynchronous.md."""
        return IntentCoupling(self.state_component, self.component_size,
                              self.intent.cardinality)

    def stored_inputs(self, n: int) -> StoredInputs:
        """φXI per frame ``(n, T, D, N_I)`` (finite: FieldlibError otherwise) and the intent
        variable."""
        check_finite_table(self.table.detach(), f"engine 'async': {self.label}")
        return StoredInputs(self.frames, frame={"table": self.table.expand(
            n, *self.table.shape[-3:])}, latent=self.intent)
